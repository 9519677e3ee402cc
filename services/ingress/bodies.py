"""A request body from bytes to a JSON value, or a 400 saying why not.

What json.loads takes but nothing after it can: nesting deeper than the parser recurses (it
raises RecursionError, not ValueError), and strings holding an unpaired surrogate (`"\\ud800"`
is valid JSON, but no UTF-8 encoder, tokenizer or wire format takes the string it makes).
"""

import json
from typing import Any

from duetserve.services.ingress.errors import ApiError


def parse_json_body(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ApiError.bad_request(f"Invalid JSON body: {err}") from None
    except RecursionError:
        raise ApiError.bad_request("Invalid JSON body: nested too deeply.") from None
    # A surrogate can only come from a \u escape (UTF-8 bytes cannot encode one): look for
    # one only in bodies that have such an escape.
    if (b"\\ud" in raw or b"\\uD" in raw) and has_unpaired_surrogate(body):
        raise ApiError.bad_request("Invalid JSON body: a string holds an unpaired surrogate.")
    return body


def has_unpaired_surrogate(value: Any) -> bool:
    """Whether any string in `value` (keys too) cannot be encoded as UTF-8. Iterative: the
    value may be nested as deeply as json.loads allows."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
