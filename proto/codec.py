"""Typed, versioned messages over msgpack.

A message class is a frozen dataclass registered under a wire name and a version:

    @message("tokens.chunk", version=1)
    @dataclass(frozen=True, slots=True)
    class TokenChunk: ...

On the wire a message is the msgpack array [name, version, {field: value}]. Nested dataclasses
travel as maps, enums as their values, tuples as arrays. `decode` refuses, with a typed error
and never a guess: bytes that are not msgpack, an unknown name, another version, a message of a
type the caller did not expect, a missing or unknown field, or a value of the wrong type.

Fields at their default are left off the wire (the decoder restores them), so a token chunk with
nothing but its tokens costs its tokens. Decoding runs a reader compiled once per message type
from its type hints, which accepts exactly the values of the exact types it expects; anything
else (a wrong type, a subclass, a value __post_init__ refuses) goes to the general reader, which
either accepts it by the same rules or refuses it with the path of the offending value. Tokens
and prompts cross the bus every step, and the general reader took ~10 us a token chunk.
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
    body = _message_to_wire(msg)
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
    try:
        return _reader(cls)(body)
    except _Unread:
        return _build(cls, body, name)  # accepts by the same rules, or says what is wrong


# --- writing ---------------------------------------------------------------------------------

_SCALARS = frozenset({int, float, str, bool, bytes, type(None)})
# Per dataclass: (field name, its default or _NO_DEFAULT) in field order.
_WIRE_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}
_NO_DEFAULT = object()


def _wire_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    fields = _WIRE_FIELDS.get(cls)
    if fields is None:
        fields = tuple(
            (f.name, f.default if f.default is not dataclasses.MISSING else _NO_DEFAULT)
            for f in dataclasses.fields(cls)
        )
        _WIRE_FIELDS[cls] = fields
    return fields


def _message_to_wire(value: Any) -> dict[str, Any]:
    """A dataclass as a map of its fields, those at their default left off."""
    body = {}
    for name, default in _wire_fields(type(value)):
        item = getattr(value, name)
        if default is _NO_DEFAULT or not _is_default(item, default):
            body[name] = _to_wire(item)
    return body


def _is_default(item: Any, default: Any) -> bool:
    """Whether `item` is its field's default: the same value of the same type (1 is not 1.0,
    and an enum is not its value), so leaving it off the wire changes nothing."""
    if item is default:
        return True
    try:
        return type(item) is type(default) and bool(item == default)
    except Exception:  # an exotic __eq__: keep the field
        return False


def _to_wire(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is tuple or kind is list:
        return [_to_wire(v) for v in value]
    if kind in _WIRE_FIELDS or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return _message_to_wire(value)
    return _to_wire_general(value)


def _to_wire_general(value: Any) -> Any:
    """Enums as their values; subclasses of the containers and scalars as those."""
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


# --- the compiled readers --------------------------------------------------------------------


class _Unread(Exception):
    """The compiled reader met a value off its happy path: the general reader takes over."""


_READERS: dict[Any, Callable[[Any], Any]] = {}


def _reader(tp: Any) -> Callable[[Any], Any]:
    """A function that turns a wire value of type hint `tp` into its Python value exactly as
    `_coerce` would, or raises _Unread where `_coerce` would have to look closer."""
    reader = _READERS.get(tp)
    if reader is None:
        reader = _compile(tp)
        _READERS[tp] = reader
    return reader


def _compile(tp: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(others) == 1:
            inner = _reader(others[0])
            return lambda v: None if v is None else inner(v)
        return _unread  # several real options: the general reader tries each
    if origin is typing.Literal:
        return lambda v: v if v in args else _unread(v)
    if origin in (tuple, list):
        return _compile_sequence(origin, args)
    if origin is dict:
        read_key, read_value = _reader(args[0]), _reader(args[1])
        return lambda v: (
            {read_key(k): read_value(x) for k, x in v.items()} if type(v) is dict else _unread(v)
        )
    if tp is Any:
        return lambda v: v
    if dataclasses.is_dataclass(tp):
        return _compile_dataclass(tp)  # type: ignore[arg-type]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {member.value: member for member in tp}
        return lambda v: members[v] if type(v) in _SCALARS and v in members else _unread(v)
    if tp is float:
        return lambda v: v if type(v) is float else float(v) if type(v) is int else _unread(v)
    if tp is type(None):
        return lambda v: None if v is None else _unread(v)
    if isinstance(tp, type):
        return lambda v: v if type(v) is tp else _unread(v)
    return _unread


def _compile_sequence(origin: type, args: tuple[Any, ...]) -> Callable[[Any], Any]:
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        readers = [_reader(a) for a in args]

        def read_fixed(v: Any) -> Any:
            if type(v) is not list or len(v) != len(readers):
                _unread(v)
            return tuple(read(x) for read, x in zip(readers, v, strict=True))

        return read_fixed
    item = args[0] if args else Any
    make = tuple if origin is tuple else list
    if item in (int, str, bool):  # the common case, tokens and ids: one pass, no call a value

        def read_scalars(v: Any) -> Any:
            if type(v) is not list or not all(type(x) is item for x in v):
                _unread(v)
            return make(v)

        return read_scalars
    read = _reader(item)

    def read_items(v: Any) -> Any:
        if type(v) is not list:
            _unread(v)
        return make([read(x) for x in v])

    return read_items


def _compile_dataclass(cls: type) -> Callable[[Any], Any]:
    hints = _hints(cls)
    fields = [(f.name, _reader(hints[f.name]), _has_default(f)) for f in dataclasses.fields(cls)]
    names = frozenset(name for name, _, _ in fields)

    def read(body: Any) -> Any:
        if type(body) is not dict or not names.issuperset(body):
            _unread(body)
        values = {}
        for name, read_field, has_default in fields:
            if name in body:
                values[name] = read_field(body[name])
            elif not has_default:
                _unread(body)
        try:
            return cls(**values)
        except (TypeError, ValueError):  # __post_init__ refuses: the general reader says why
            raise _Unread from None

    return read


def _unread(_: Any = None) -> Any:
    raise _Unread
