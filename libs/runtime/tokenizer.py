"""Text to token ids and back for any Hugging Face model directory, with its chat template.

Imports no torch: ingress tokenizes and renders chats without running a model. The encoding is
the `tokenizers` library's, driven by the directory's tokenizer.json; the chat template is
rendered as transformers renders it (a sandboxed jinja2 environment with the same options,
filters and globals, and the same variables), so a prompt here is token for token the prompt
transformers would build.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from jinja2.parser import Parser
from jinja2.utils import Namespace
from tokenizers import Tokenizer as BackendTokenizer

from duetserve.runtime.errors import InvalidTokenError, RuntimeInputError, UnsupportedModelError

Message = Mapping[str, Any]

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
# Names under which a message's reasoning arrives; templates read the first or "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Prompt tokens kept as context for the first streamed piece (vLLM keeps the same number).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateError(RuntimeInputError):
    """The chat template refused these messages (its raise_exception) or failed on them."""


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
        environment = _chat_environment()
        self._templates = {
            name: _compile_template(environment, text, f"{source} ({name} chat template)")
            for name, text in chat_templates.items()
        }
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
            _chat_templates(config, directory),
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
        return bool(self._templates)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with add_special_tokens, what the model adds (BOS, say) as well."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
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
        template = self._select_template(tools)
        variables: dict[str, Any] = {"documents": None, **self._special_tokens, **extra}
        variables |= {
            "messages": _prepare_messages(messages),
            "tools": [dict(tool) for tool in tools] if tools is not None else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**variables)
        except Exception as error:  # the template is code from the model's author
            raise ChatTemplateError(f"chat template of {self._source} failed: {error}") from error

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

    def _select_template(self, tools: Sequence[Mapping[str, Any]] | None) -> jinja2.Template:
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if not self._templates:
            raise UnsupportedModelError(f"{self._source} has no chat template")
        raise UnsupportedModelError(
            f"{self._source} has chat templates {sorted(self._templates)} but none named default"
        )

    def _special_token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return self._backend.token_to_id(token) if token is not None else None

    def _post_processor_adds(self, bos_id: int) -> bool:
        """Whether the tokenizer.json post-processor starts every encoding with bos_id."""
        return bool(self._backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id])


class IncrementalDetokenizer:
    """Text of one request's tokens as they arrive, never a partial character.

    vLLM's scheme: text is decoded over a short window of ids, ids[prefix_offset:], and only
    what lies past ids[prefix_offset:read_offset] is new. Decoding with that left context keeps
    the spacing decoders give a word in mid-sentence; holding back while the window ends in
    U+FFFD keeps a character split over several tokens whole. Without prompt_ids the pieces of
    feed then flush join to exactly tokenizer.decode(all ids).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only a few prompt ids matter, as left context for the first generated ones.
        self._ids: list[int] = list(prompt_ids[max(len(prompt_ids) - _PROMPT_CONTEXT_TOKENS, 0) :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def feed(self, token_id: int) -> str:
        """The text that token_id completes; "" while a character is still incomplete."""
        self._ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end, as U+FFFD)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text):
            return ""
        if hold_incomplete and window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # The window's left context is no longer needed: keep ids from the old read offset on.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


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


def _chat_templates(config: Mapping[str, Any], directory: Path) -> dict[str, str]:
    """Named chat templates. Template files (chat_template.jinja as "default", and
    additional_chat_templates/NAME.jinja) replace the config's chat_template, as in transformers."""
    templates: dict[str, str] = {}
    default_file = directory / "chat_template.jinja"
    if default_file.is_file():
        templates["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    return _config_chat_templates(config.get("chat_template"), directory)


def _config_chat_templates(value: Any, directory: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(_is_named_template(item) for item in value):
        return {item["name"]: item["template"] for item in value}
    raise UnsupportedModelError(
        f"{directory / 'tokenizer_config.json'}: chat_template must be a string or a list of "
        '{"name", "template"} objects'
    )


def _is_named_template(item: Any) -> bool:
    fields = ("name", "template")
    return isinstance(item, dict) and all(isinstance(item.get(field), str) for field in fields)


# --- chat template rendering ------------------------------------------------------------------


def _prepare_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Copies of the messages as transformers hands them to the template: keys whose value is
    None dropped, reasoning also under reasoning_content and thinking."""
    if not messages:
        raise ChatTemplateError("a conversation needs at least one message")
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message must be an object, not {message!r}")
        plain = {key: value for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def _compile_template(environment: jinja2.Environment, text: str, source: str) -> jinja2.Template:
    try:
        return environment.from_string(text)
    except jinja2.TemplateError as error:
        raise UnsupportedModelError(f"{source} does not compile: {error}") from error


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The jinja2 environment transformers renders chat templates in."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _DictFactory()
    environment.globals["namespace"] = _TemplateNamespace
    return environment


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
    serving it renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 reads tags off the class)

    def parse(self, parser: Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """json.dumps, without the HTML escaping of jinja2's own tojson."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _DictFactory:
    """dict() for templates, without the dict type's attributes to reach through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """namespace() that refuses underscore-prefixed attributes, the way into CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # self in args, as Namespace does it
        self, positional = args[0], args[1:]
        attributes = dict(*positional, **kwargs)
        for name in attributes:
            _check_namespace_name(name)
        Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with _")
