"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

A 429 or 503 always says when to come back (`Retry-After`, whole seconds): a client that backs
off by it finds the server able to serve, instead of adding to what overloaded it.
"""

import math
from typing import Any

from pydantic import ValidationError

DEFAULT_RETRY_AFTER_S = 1.0  # a 429 or 503 that knows no better


class ApiError(Exception):
    """An error the client gets as {"error": {...}} with `status`. A plain exception class (not
    a frozen dataclass) so it can carry a traceback through context managers."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        if retry_after_s is None and status in (429, 503):
            retry_after_s = DEFAULT_RETRY_AFTER_S
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> "ApiError":
        return cls(400, message, param=param)

    @classmethod
    def from_validation(cls, err: ValidationError) -> "ApiError":
        """The first problem pydantic found, named by its field path (`messages.0.content`)."""
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        if param is None and ": " in message:  # a model-level check names its field itself
            param = message.split(": ", 1)[0]
            return cls(400, message, param=param)
        return cls(400, f"{param}: {message}" if param else message, param=param)


def not_found_model(model: str) -> ApiError:
    return ApiError(
        404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found"
    )


def unauthorized() -> ApiError:
    return ApiError(
        401, "Invalid or missing API key.", "authentication_error", None, "invalid_api_key"
    )
