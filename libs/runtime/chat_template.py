"""A model's chat templates: read from its directory, compiled and rendered as transformers does.

Imports no torch. Templates are compiled in a sandboxed jinja2 environment with transformers'
options, filters and globals, and rendered with the same variables, so a prompt here is
character for character the prompt transformers would build.
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

from duetserve.runtime.errors import RuntimeInputError, UnsupportedModelError

Message = Mapping[str, Any]

# Names under which a message's reasoning arrives; templates read the first or "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(RuntimeInputError):
    """The chat template refused these messages (its raise_exception) or failed on them."""


class ChatTemplates:
    """A model's named chat templates ("default", "tool_use", ...), compiled. Immutable."""

    def __init__(self, templates: Mapping[str, str], source: str = "<memory>") -> None:
        """Compile every template; UnsupportedModelError names one that does not compile."""
        self._source = source
        environment = _chat_environment()
        self._templates = {
            name: _compile_template(environment, text, f"{source} ({name} chat template)")
            for name, text in templates.items()
        }

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._templates)

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        special_tokens: Mapping[str, str],
        **extra: Any,
    ) -> str:
        """The conversation as prompt text, rendered as transformers' apply_chat_template does.

        special_tokens (bos_token, eos_token, ...) and extra (documents, enable_thinking, ...)
        become template variables; extra overrides a special token of the same name."""
        template = self._select(tools)
        variables: dict[str, Any] = {"documents": None, **special_tokens, **extra}
        variables |= {
            "messages": _prepare_messages(messages),
            "tools": [dict(tool) for tool in tools] if tools is not None else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**variables)
        except Exception as error:  # the template is code from the model's author
            raise ChatTemplateError(f"chat template of {self._source} failed: {error}") from error

    def _select(self, tools: Sequence[Mapping[str, Any]] | None) -> jinja2.Template:
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if not self._templates:
            raise UnsupportedModelError(f"{self._source} has no chat template")
        raise UnsupportedModelError(
            f"{self._source} has chat templates {sorted(self._templates)} but none named default"
        )


# --- loading ----------------------------------------------------------------------------------


def read_chat_templates(config: Mapping[str, Any], directory: Path) -> dict[str, str]:
    """Named chat template texts of a model directory whose tokenizer_config.json holds config.
    Template files (chat_template.jinja as "default", and additional_chat_templates/NAME.jinja)
    replace the config's chat_template, as in transformers."""
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


# --- rendering --------------------------------------------------------------------------------


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


# --- the sandboxed environment ----------------------------------------------------------------


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
