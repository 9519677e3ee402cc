"""Typed, versioned messages over msgpack.

A message class is a frozen dataclass registered under a wire name and a version:

    @message("tokens.chunk", version=1)
    @dataclass(frozen=True, slots=True)
    class TokenChunk: ...

On the wire a message is the msgpack array [name, version, {field: value}]. Nested dataclasses
travel as maps, enums as their values, tuples as arrays. `decode` refuses, with a typed error
and never a guess: bytes that are not msgpack, an unknown name, another version, a message of a
type the caller did not expect, a missing or unknown field, or a value of the wrong type.
"""

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

import msgpack

T = TypeVar("T")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
_REGISTRY: dict[str, type] = {}


class ProtoError(ValueError):
    """A message that cannot be accepted. `code` is what an error reply carries."""

    code = "invalid_message"


class UnknownMessageError(ProtoError):
    code = "unknown_message"


class VersionMismatchError(ProtoError):
    code = "version_mismatch"


class InvalidMessageError(ProtoError):
    code = "invalid_message"


def message(name: str, version: int = 1) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as a wire message."""

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if name in _REGISTRY:
            raise TypeError(f"wire name {name!r} registered twice")
        cls.__wire_name__ = name  # type: ignore[attr-defined]
        cls.__wire_version__ = version  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return register


def wire_name(cls: type) -> str:
    return str(cls.__wire_name__)  # type: ignore[attr-defined]


def encode(msg: object) -> bytes:
    cls = type(msg)
    if getattr(cls, "__wire_name__", None) is None:
        raise TypeError(f"{cls.__name__} is not a registered message")
    body = _to_wire(msg)
    packed: bytes = msgpack.packb(
        [cls.__wire_name__, cls.__wire_version__, body],  # type: ignore[attr-defined]
        use_bin_type=True,
    )
    return packed


@overload
def decode(data: bytes, /) -> object: ...
@overload
def decode(data: bytes, e1: type[T], /) -> T: ...
@overload
def decode(data: bytes, e1: type[T], e2: type[T2], /) -> T | T2: ...
@overload
def decode(data: bytes, e1: type[T], e2: type[T2], e3: type[T3], /) -> T | T2 | T3: ...
def decode(data: bytes, /, *expected: type[Any]) -> Any:
    """The message in `data`, which must be one of `expected` (any registered type if none)."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types
        raise InvalidMessageError(f"not a msgpack message: {err}") from None
    if not (isinstance(envelope, list) and len(envelope) == 3):
        raise InvalidMessageError("a message is [name, version, body]")
    name, version, body = envelope
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownMessageError(f"unknown message type {name!r}")
    if version != cls.__wire_version__:  # type: ignore[attr-defined]
        raise VersionMismatchError(
            f"{name} version {version!r} not supported (this side speaks {cls.__wire_version__})"  # type: ignore[attr-defined]
        )
    if expected and cls not in expected:
        wanted = ", ".join(wire_name(e) for e in expected)
        raise InvalidMessageError(f"expected {wanted}, got {name}")
    return _build(cls, body, name)


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _build(cls: type, body: Any, path: str) -> Any:
    if not isinstance(body, dict):
        raise InvalidMessageError(f"{path}: expected a map, got {type(body).__name__}")
    hints = _hints(cls)
    unknown = set(body) - set(hints)
    if unknown:
        raise InvalidMessageError(f"{path}: unknown field(s) {sorted(unknown)}")
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in body:
            values[field.name] = _coerce(
                hints[field.name], body[field.name], f"{path}.{field.name}"
            )
        elif _has_default(field):
            continue
        else:
            raise InvalidMessageError(f"{path}: missing field '{field.name}'")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # __post_init__ validation
        raise InvalidMessageError(f"{path}: {err}") from None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _has_default(field: dataclasses.Field[Any]) -> bool:
    return (
        field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    )


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, path)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise InvalidMessageError(f"{path}: {value!r} not one of {typing.get_args(tp)}")
    if origin in (tuple, list):
        return _coerce_sequence(tp, origin, value, path)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise InvalidMessageError(f"{path}: expected a map")
        return {
            _coerce(key_type, k, path): _coerce(value_type, v, f"{path}[{k!r}]")
            for k, v in value.items()
        }
    return _coerce_scalar(tp, value, path)


def _coerce_union(options: tuple[Any, ...], value: Any, path: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(option, value, path)
        except InvalidMessageError as err:
            errors.append(str(err))
    if len(errors) == 1:  # X | None: the one real error says more than "matches none"
        raise InvalidMessageError(errors[0])
    raise InvalidMessageError(f"{path}: {value!r} matches none of: {'; '.join(errors)}")


def _coerce_sequence(tp: Any, origin: type, value: Any, path: str) -> Any:
    if not isinstance(value, list | tuple):
        raise InvalidMessageError(f"{path}: expected an array, got {type(value).__name__}")
    args = typing.get_args(tp)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            raise InvalidMessageError(f"{path}: expected {len(args)} items")
        return tuple(
            _coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    item = args[0] if args else Any
    items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)  # type: ignore[arg-type]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise InvalidMessageError(f"{path}: {value!r} is not a {tp.__name__}") from None
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise InvalidMessageError(f"{path}: expected int, got bool")
    if tp is type(None):
        if value is None:
            return None
        raise InvalidMessageError(f"{path}: expected nil")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise InvalidMessageError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
