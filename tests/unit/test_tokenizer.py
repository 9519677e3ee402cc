"""The committed BPE tokenizers, the runtime Tokenizer and its chat templates against transformers,
and the streaming detokenizer."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import tokenizers.processors

from duetserve.runtime.errors import UnsupportedModelError
from duetserve.runtime.generator import assets, train_tokenizer
from duetserve.runtime.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\n\tx = {'k': [1, 2.5e-3]}\n",
    "Emoji: 😀🚀👩‍👩‍👧‍👦 🇯🇵 ✨",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트",
    "  leading and trailing spaces  \n\n\n\t\r\n mixed\u00a0whitespace\u2003here  ",
    "Ünïcödé àccents, Ελληνικά, русский, עברית, العربية, हिन्दी",
    "",
]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
    ],
    [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello. 你好"},
        {"role": "user", "content": "Again,\n  with   spaces."},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Part one, "},
                {"type": "image_url", "image_url": {"url": "http://x"}},
                {"type": "text", "text": "part two."},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": None},
    ],
]
# Exercises what transformers adds to jinja2: namespace, loop controls, tojson, the generation
# tag, strftime_now, and the special tokens as variables.
FEATURE_TEMPLATE = (
    "{%- set ns = namespace(count=0) -%}\n"
    "{{ bos_token }}{% for m in messages %}\n"
    "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "  {% set ns.count = ns.count + 1 %}\n"
    "{% generation %}{{ m.role }}={{ m.content | tojson }}{% endgeneration %}\n"
    "{% endfor %}\n"
    "{{ tools | tojson(indent=2) if tools else 'no tools' }}|{{ ns.count }}|{{ eos_token }}"
    "|{{ strftime_now('%Y') }}|{{ dict(a=1) | tojson }}{{ extra_flag | default('') }}"
)
SPECIAL_IDS = {token: i for i, token in enumerate(assets.SPECIAL_TOKENS)}


def write_model_dir(
    directory: Path,
    vocab_size: int = 4096,
    config_template: Any = assets.CHAT_TEMPLATE,
    template_file: str | None = None,
    **config: Any,
) -> Path:
    """A model directory with our tokenizer, as the generator writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets.tokenizer_json_path(vocab_size), directory / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": assets.BOS_TOKEN,
        "eos_token": assets.IM_END_TOKEN,
        "pad_token": assets.PAD_TOKEN,
        "add_bos_token": False,
        **config,
    }
    if config_template is not None:
        tokenizer_config["chat_template"] = config_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    eos_ids = [SPECIAL_IDS[assets.EOS_TOKEN], SPECIAL_IDS[assets.IM_END_TOKEN]]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    if template_file is not None:
        (directory / "chat_template.jinja").write_text(template_file)
    return directory


@pytest.fixture(scope="module", params=assets.VOCAB_SIZES)
def committed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    directory = tmp_path_factory.mktemp(f"bpe{request.param}")
    return Tokenizer.from_dir(write_model_dir(directory, vocab_size=request.param))


def transformers_tokenizer(template: str, vocab_size: int = 4096) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(assets.tokenizer_json_path(vocab_size)),
        bos_token=assets.BOS_TOKEN,
        eos_token=assets.IM_END_TOKEN,
        pad_token=assets.PAD_TOKEN,
        chat_template=template,
    )


# --- the committed tokenizers ------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_byte_exact(committed: Tokenizer, text: str) -> None:
    ids = committed.encode(text, add_special_tokens=False)
    assert committed.decode(ids).encode("utf-8") == text.encode("utf-8")
    assert committed.encode(text) == ids  # add_bos_token false and no post-processor


def test_special_tokens_are_single_ids(committed: Tokenizer) -> None:
    for token, token_id in SPECIAL_IDS.items():
        assert committed.encode(token, add_special_tokens=False) == [token_id]
        assert committed.decode([token_id], skip_special_tokens=False) == token
        assert committed.decode([token_id]) == ""
    assert committed.bos_token_id == SPECIAL_IDS[assets.BOS_TOKEN]
    assert committed.pad_token_id == SPECIAL_IDS[assets.PAD_TOKEN]
    assert committed.eos_token_ids == {
        SPECIAL_IDS[assets.EOS_TOKEN],
        SPECIAL_IDS[assets.IM_END_TOKEN],
    }


def test_vocab_sizes_are_exact(tmp_path: Path) -> None:
    for vocab_size in assets.VOCAB_SIZES:
        directory = write_model_dir(tmp_path / str(vocab_size), vocab_size)
        assert Tokenizer.from_dir(directory).vocab_size == vocab_size


def test_training_is_deterministic() -> None:
    start = time.monotonic()
    corpus = train_tokenizer.build_corpus(cap_bytes=300_000)
    assert corpus
    first = train_tokenizer.to_json(train_tokenizer.train(corpus, vocab_size=600))
    second = train_tokenizer.to_json(train_tokenizer.train(list(corpus), vocab_size=600))
    assert first == second
    assert json.loads(first)["added_tokens"][0]["content"] == assets.BOS_TOKEN
    assert time.monotonic() - start < 10


# --- Tokenizer against transformers ------------------------------------------------------------


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tmp_path: Path, conversation: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    ours = Tokenizer.from_dir(write_model_dir(tmp_path))
    reference = transformers_tokenizer(assets.CHAT_TEMPLATE)
    expected = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.startswith(assets.BOS_TOKEN + assets.IM_START_TOKEN)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False
    )
    assert ours.encode_chat(conversation, add_generation_prompt) == reference.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(committed: Tokenizer, text: str) -> None:
    reference = transformers_tokenizer(assets.CHAT_TEMPLATE, committed.vocab_size)
    assert committed.encode(text) == reference.encode(text)
    assert committed.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False
    )


def test_chat_template_file_wins_as_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = write_model_dir(
        tmp_path, config_template="{{ 'from the config' }}", template_file=FEATURE_TEMPLATE
    )
    ours = Tokenizer.from_dir(directory)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "ü"}}}]
    variants: list[dict[str, Any]] = [{}, {"tools": tools, "extra_flag": "!"}]
    for conversation in CONVERSATIONS[:3]:
        for kwargs in variants:
            expected = reference.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True, **kwargs
            )
            assert ours.apply_chat_template(conversation, **kwargs) == expected
            assert "from the config" not in expected


def test_named_templates_in_config(tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": "default:{{ messages | length }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    ours = Tokenizer.from_dir(write_model_dir(tmp_path, config_template=named))
    assert ours.apply_chat_template(CONVERSATIONS[1]) == "default:2"
    assert ours.apply_chat_template(CONVERSATIONS[1], tools=[{"name": "f"}]) == "tools:1"


def test_add_bos_token_prepends_bos_once(tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(write_model_dir(tmp_path, add_bos_token=True))
    bos = SPECIAL_IDS[assets.BOS_TOKEN]
    assert ours.encode("hi") == [bos, *ours.encode("hi", add_special_tokens=False)]
    assert ours.encode_chat(CONVERSATIONS[0])[:2] == [bos, SPECIAL_IDS[assets.IM_START_TOKEN]]
    # A post-processor that already adds BOS is not doubled.
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{assets.BOS_TOKEN} $A", special_tokens=[(assets.BOS_TOKEN, bos)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path).encode("hi")[:2].count(bos) == 1


def test_special_tokens_from_special_tokens_map(tmp_path: Path) -> None:
    write_model_dir(tmp_path, bos_token=None, eos_token=None, pad_token=None)
    special_map = {
        "bos_token": {"content": assets.BOS_TOKEN, "lstrip": False},
        "eos_token": assets.EOS_TOKEN,
    }
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.bos_token_id == SPECIAL_IDS[assets.BOS_TOKEN]
    assert ours.pad_token_id is None
    assert ours.eos_token_ids == {SPECIAL_IDS[assets.EOS_TOKEN], 3}


def test_imports_without_torch() -> None:
    # Each module first on its own (a circular import fails here too), then the re-exports.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import duetserve.runtime.detokenizer\n"
        "import duetserve.runtime.chat_template\n"
        "import duetserve.runtime.tokenizer\n"
        "from duetserve.runtime import chat_template, detokenizer, tokenizer\n"
        "assert tokenizer.ChatTemplateError is chat_template.ChatTemplateError\n"
        "assert tokenizer.IncrementalDetokenizer is detokenizer.IncrementalDetokenizer\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- errors --------------------------------------------------------------------------------------


def test_missing_tokenizer_json_names_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_errors(tmp_path: Path) -> None:
    refusing = "{{ raise_exception('roles must alternate') if messages | length > 1 else 'ok' }}"
    ours = Tokenizer.from_dir(write_model_dir(tmp_path, config_template=refusing))
    assert ours.apply_chat_template(CONVERSATIONS[0]) == "ok"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.apply_chat_template(CONVERSATIONS[1])
    with pytest.raises(ChatTemplateError, match="at least one message"):
        ours.apply_chat_template([])
    with pytest.raises(UnsupportedModelError, match="does not compile"):
        Tokenizer.from_dir(write_model_dir(tmp_path / "bad", config_template="{% for %}"))
    without = Tokenizer.from_dir(write_model_dir(tmp_path / "none", config_template=None))
    with pytest.raises(UnsupportedModelError, match="no chat template"):
        without.apply_chat_template(CONVERSATIONS[0])


def test_sandbox_refuses_underscore_attributes(tmp_path: Path) -> None:
    escape = "{% set ns = namespace() %}{% set ns.__class__ = 1 %}"
    ours = Tokenizer.from_dir(write_model_dir(tmp_path, config_template=escape))
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(CONVERSATIONS[0])


# --- streaming ---------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detokenizer.feed(token_id) for token_id in ids]
    return [*pieces, detokenizer.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode(committed: Tokenizer, text: str) -> None:
    ids = committed.encode(text, add_special_tokens=False)
    pieces = stream(committed, ids)
    assert "".join(pieces) == committed.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_holds_split_characters(committed: Tokenizer) -> None:
    text = "猫😀🇯🇵 ok"
    ids = committed.encode(text, add_special_tokens=False)
    assert any(committed.decode([token_id]).endswith("\ufffd") for token_id in ids), "no split"
    pieces = stream(committed, ids)
    assert "".join(pieces) == text
    assert pieces.count("") > 1  # held back while a character was incomplete


def test_streaming_cut_mid_character_and_special_tokens(committed: Tokenizer) -> None:
    im_end = SPECIAL_IDS[assets.IM_END_TOKEN]
    ids = [*committed.encode("a 😀", add_special_tokens=False), im_end]
    cut = [*ids[:-2], im_end]  # the emoji's last byte missing, then a special token
    for sequence in (ids, cut):
        for skip in (True, False):
            pieces = stream(committed, sequence, skip_special_tokens=skip)
            assert "".join(pieces) == committed.decode(sequence, skip_special_tokens=skip)


def test_streaming_after_a_prompt(committed: Tokenizer) -> None:
    prompt = committed.encode("Question: what is 2+2?", add_special_tokens=False)
    answer = committed.encode(" It is four. 四 😀", add_special_tokens=False)
    pieces = stream(committed, answer, prompt_ids=prompt)
    assert "".join(pieces) == " It is four. 四 😀"
