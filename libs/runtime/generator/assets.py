"""Files a generated model ships: the committed tokenizers, their special tokens, the chat template.

The tokenizers are byte-level BPE trained by `train_tokenizer` and committed under `tokenizers/`,
so that every machine builds the same model without a model hub. In both of them the special
tokens hold ids 0 to 4, in the order of `SPECIAL_TOKENS`; the 256 byte symbols follow, then the
merges.
"""

from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

# Id order is this order: BOS is 0, EOS 1, <|im_start|> 2, <|im_end|> 3, PAD 4.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)

# Total vocabulary sizes, special tokens included.
VOCAB_SIZES: tuple[int, ...] = (4096, 16384)

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizers"


def tokenizer_json_path(vocab_size: int) -> Path:
    """The committed tokenizer.json with `vocab_size` ids in all."""
    if vocab_size not in VOCAB_SIZES:
        raise ValueError(f"no committed tokenizer with {vocab_size} ids; there are {VOCAB_SIZES}")
    return TOKENIZER_DIR / f"bpe-{vocab_size}.json"


# ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message after one BOS. Content is a
# string or OpenAI's list of parts, whose text parts are joined with nothing between them.
CHAT_TEMPLATE = (
    "{{- bos_token if bos_token is defined else '' -}}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- elif message['content'] is defined -%}\n"
    "{%- for part in message['content'] if part['type'] == 'text' -%}\n"
    "{{- part['text'] -}}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)
