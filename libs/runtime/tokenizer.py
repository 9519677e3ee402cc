"""Text to token ids and back for any Hugging Face model directory, with its chat template.

Imports no torch: ingress tokenizes and renders chats without running a model. The encoding is
the `tokenizers` library's, driven by the directory's tokenizer.json; the chat template is
rendered as transformers renders it (see chat_template.py), so a prompt here is token for token
the prompt transformers would build. ChatTemplateError and IncrementalDetokenizer (streaming, see
detokenizer.py) are re-exported from here.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from duetserve.runtime.chat_template import (
    ChatTemplateError,
    ChatTemplates,
    Message,
    read_chat_templates,
)
from duetserve.runtime.detokenizer import IncrementalDetokenizer
from duetserve.runtime.errors import InvalidTokenError, UnsupportedModelError

__all__ = [
    "SPECIAL_TOKEN_NAMES",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "Message",
    "Tokenizer",
]

# The named special tokens transformers passes to every chat template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """A model's tokenizer: encode, decode, and render its chat template. Immutable once built."""

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str],
        eos_token_ids: frozenset[int],
        chat_templates: Mapping[str, str],
        add_bos_token: bool = False,
        source: str = "<memory>",
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._eos_token_ids = eos_token_ids
        self._source = source
        self._chat_templates = ChatTemplates(chat_templates, source)
        self._bos_token_id = self._special_token_id("bos_token")
        self._pad_token_id = self._special_token_id("pad_token")
        # BOS that encode prepends itself: only where the tokenizer.json post-processor does not.
        self._bos_prefix: list[int] = []
        bos = self._bos_token_id
        if add_bos_token and bos is not None and not self._post_processor_adds(bos):
            self._bos_prefix = [bos]

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a Hugging Face model directory; UnsupportedModelError names what is wrong."""
        directory = Path(path)
        backend = _load_backend(directory / "tokenizer.json")
        config = _read_json_object(directory / "tokenizer_config.json")
        special_tokens = _special_tokens(config, directory)
        eos_ids = _generation_eos_ids(directory / "generation_config.json")
        eos_id = backend.token_to_id(special_tokens.get("eos_token", ""))
        return cls(
            backend,
            special_tokens,
            frozenset(eos_ids if eos_id is None else eos_ids | {eos_id}),
            read_chat_templates(config, directory),
            add_bos_token=config.get("add_bos_token") is True,
            source=str(directory),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added and special tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: generation_config's eos ids and the tokenizer's EOS."""
        return self._eos_token_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (bos_token, eos_token, ...) that the model defines."""
        return dict(self._special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_templates.names)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with add_special_tokens, what the model adds (BOS, say) as well.
        (encode_batch, not encode: the same ids, and it lets go of the GIL while it works, so
        a long text tokenized in a thread does not stop the event loop's thread.)"""
        [encoding] = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)
        ids: list[int] = encoding.ids
        return [*self._bos_prefix, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; an incomplete UTF-8 sequence decodes to U+FFFD."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise InvalidTokenError(f"token id {bad} outside the vocabulary of {self.vocab_size}")
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The conversation as prompt text, rendered as transformers' apply_chat_template does.

        extra becomes template variables (documents, enable_thinking, ...) and overrides the
        special tokens of the same name."""
        return self._chat_templates.render(
            messages, add_generation_prompt, tools, self._special_tokens, **extra
        )

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation; the template writes BOS, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **extra)
        return self.encode(text, add_special_tokens=False)

    def _special_token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return self._backend.token_to_id(token) if token is not None else None

    def _post_processor_adds(self, bos_id: int) -> bool:
        """Whether the tokenizer.json post-processor starts every encoding with bos_id."""
        return bool(self._backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id])


# --- loading ----------------------------------------------------------------------------------


def _load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise UnsupportedModelError(f"{path.parent} has no tokenizer.json ({path} is missing)")
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as error:
        raise UnsupportedModelError(f"cannot load {path}: {error}") from error


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in path, {} where the file is absent."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UnsupportedModelError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise UnsupportedModelError(f"{path} does not hold a JSON object")
    return content


def _token_text(value: Any) -> str | None:
    """A special token as written in the configs: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(config: Mapping[str, Any], directory: Path) -> dict[str, str]:
    """Named special tokens from tokenizer_config.json; special_tokens_map.json overrides them
    unless the config has added_tokens_decoder (transformers reads the map only then)."""
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(_read_json_object(directory / "special_tokens_map.json"))
    tokens: dict[str, str] = {}
    for source in sources:
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_text(source.get(name))
            if token is not None:
                tokens[name] = token
    return tokens


def _generation_eos_ids(path: Path) -> set[int]:
    eos = _read_json_object(path).get("eos_token_id")
    candidates = eos if isinstance(eos, list) else [eos]
    ids = {token_id for token_id in candidates if isinstance(token_id, int)}
    if eos is not None and len(ids) != len(candidates):
        raise UnsupportedModelError(f"{path}: eos_token_id must be an int or a list of ints")
    return ids
