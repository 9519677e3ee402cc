"""Reading plain msgpack-decoded maps field by field: every value is type-checked, and a bad one
is a WireFormatError that names the field. Nothing here guesses or coerces."""

from collections.abc import Mapping

from duetserve.services.kv_manager.errors import WireFormatError

WireMap = Mapping[str, object]


def require_map(value: object, what: str) -> WireMap:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise WireFormatError(
            f"{what}: expected a map with string keys, got {type(value).__name__}"
        )
    return value


def require_int(wire: WireMap, key: str, minimum: int = 0) -> int:
    value = require_field(wire, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireFormatError(f"{key}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise WireFormatError(f"{key}: {value} is below {minimum}")
    return value


def require_str(wire: WireMap, key: str) -> str:
    value = require_field(wire, key)
    if not isinstance(value, str):
        raise WireFormatError(f"{key}: expected a string, got {type(value).__name__}")
    return value


def require_bytes(wire: WireMap, key: str, length: int) -> bytes:
    value = require_field(wire, key)
    if not isinstance(value, bytes | bytearray):
        raise WireFormatError(f"{key}: expected bytes, got {type(value).__name__}")
    if len(value) != length:
        raise WireFormatError(f"{key}: expected exactly {length} bytes, got {len(value)}")
    return bytes(value)


def require_list(wire: WireMap, key: str) -> list[object]:
    value = require_field(wire, key)
    if not isinstance(value, list | tuple):
        raise WireFormatError(f"{key}: expected an array, got {type(value).__name__}")
    return list(value)


def refuse_unknown(wire: WireMap, known: frozenset[str], what: str) -> None:
    unknown = sorted(set(wire) - known)
    if unknown:
        raise WireFormatError(f"{what}: unknown field(s) {unknown}")


def require_kind(wire: WireMap, kind: str, version: int) -> None:
    """The map must say it is `kind` at `version`; another kind or version is refused."""
    found = require_str(wire, "kind")
    if found != kind:
        raise WireFormatError(f"expected kind {kind!r}, got {found!r}")
    found_version = require_int(wire, "version")
    if found_version != version:
        raise WireFormatError(f"{kind} version {found_version} not supported (this is {version})")


def require_field(wire: WireMap, key: str) -> object:
    if key not in wire:
        raise WireFormatError(f"missing field {key!r}")
    return wire[key]
