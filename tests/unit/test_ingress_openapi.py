"""The OpenAPI document ingress serves: valid OpenAPI 3.1, every route described, request
bodies exactly the pydantic models that validate them, errors in OpenAI's shape."""

from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from duetserve.services.ingress.api_models import ChatCompletionRequest, CompletionRequest
from duetserve.services.ingress.errors import ApiError, not_found_model
from duetserve.services.ingress.handlers import SSE_HEADERS, Handlers
from duetserve.services.ingress.openapi import build_openapi

MODEL = "tiny"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi(MODEL)


def resolved(document: dict[str, Any], name: str) -> dict[str, Any]:
    """Component `name` as a standalone JSON schema (its references resolved against the
    document)."""
    return {**document["components"]["schemas"][name], "components": document["components"]}


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_route_is_described() -> None:
    handlers = Handlers.__new__(Handlers)  # routes() reads no state
    served = {(route.method.lower(), route.path) for route in handlers.routes()}
    paths = build_openapi(MODEL)["paths"]
    described = {(method, path) for path, item in paths.items() for method in item}
    assert served == described


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_request_bodies_are_the_pydantic_models(document: dict[str, Any], model: Any) -> None:
    schema = document["components"]["schemas"][model.__name__]
    expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
    expected.pop("$defs", None)
    expected["properties"]["model"] = {"type": "string", "enum": [MODEL]}  # the served one
    assert schema == expected


@pytest.mark.parametrize(
    "error",
    [
        ApiError.bad_request("prompt: Field required", "prompt"),
        not_found_model("other"),
        ApiError(503, "draining", "server_error", code="shutting_down"),
    ],
)
def test_errors_match_the_documented_shape(document: dict[str, Any], error: ApiError) -> None:
    jsonschema.validate(error.body(), resolved(document, "Error"))


def test_429_and_503_document_retry_after(document: dict[str, Any]) -> None:
    for item in document["paths"].values():
        for operation in item.values():
            for status in ("429", "503"):
                if status in operation["responses"]:
                    assert "Retry-After" in operation["responses"][status]["headers"]


def test_generation_routes_document_their_stream(document: dict[str, Any]) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert SSE_HEADERS["Content-Type"] in content
