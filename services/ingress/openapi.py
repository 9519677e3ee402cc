"""The OpenAPI 3.1 document ingress serves at /openapi.json, built once at start-up.

Request bodies come from the pydantic models that validate them (api_models.py), so the
document cannot drift from what is checked; the one change is `model`, which names the served
model (any other is a 404). Responses are written here: OpenAI's bodies, their stream chunks,
and the error shape every 4xx and 503 answers with. A 429 or 503 always carries Retry-After.
Checks the models make beyond their fields (unsupported features, n=1, a prompt that fits the
context) are 400s, so a body the schema allows may still be refused with one.
"""

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from duetserve.services.ingress.api_models import ChatCompletionRequest, CompletionRequest

OPENAPI_VERSION = "3.1.0"
REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest)
_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


_STRING, _INT, _NUMBER = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_LOGPROBS = _nullable({"type": "object"})  # the completions or the chat format
_FINISH = _nullable({"type": "string", "enum": ["stop", "length", "abort"]})


def response_schemas() -> dict[str, dict[str, Any]]:
    """What the routes answer with, by component name."""
    slo_outcome = _object(
        {
            "kind": {"enum": ["latency", "deadline", "compound"]},
            "met": {"type": "boolean"},
            "default": {"type": "boolean"},
        }
    )
    duet = _object({"slo": slo_outcome})  # Duet's extension: did the request meet its SLO
    usage = _object(
        {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
        {"prompt_tokens_details": _object({"cached_tokens": _INT}), "duet": duet},
    )
    head = {"id": _STRING, "created": _INT, "model": _STRING}
    text_choice = _object(
        {"index": _INT, "text": _STRING, "logprobs": _LOGPROBS, "finish_reason": _FINISH}
    )
    message = _object({"role": {"const": "assistant"}, "content": _STRING})
    chat_choice = _object(
        {"index": _INT, "message": message, "logprobs": _LOGPROBS, "finish_reason": _FINISH}
    )
    delta = _object({}, {"role": {"const": "assistant"}, "content": _STRING})
    chunk_choice = _object(
        {"index": _INT, "delta": delta, "logprobs": _LOGPROBS, "finish_reason": _FINISH}
    )
    choices = {"type": "array", "maxItems": 1}
    return {
        "Error": _object(
            {
                "error": _object(
                    {
                        "message": _STRING,
                        "type": _STRING,
                        "param": _nullable(_STRING),
                        "code": _nullable(_STRING),
                    }
                )
            }
        ),
        "Usage": usage,
        "Completion": _object(
            {
                **head,
                "object": {"const": "text_completion"},
                "choices": {**choices, "items": text_choice},
            },
            {"usage": _nullable(_ref("Usage")), "duet": duet},
        ),
        "ChatCompletion": _object(
            {
                **head,
                "object": {"const": "chat.completion"},
                "choices": {**choices, "items": chat_choice},
                "usage": _ref("Usage"),
            }
        ),
        "ChatCompletionChunk": _object(
            {
                **head,
                "object": {"const": "chat.completion.chunk"},
                "choices": {**choices, "items": chunk_choice},
            },
            {"usage": _ref("Usage"), "duet": duet},
        ),
        "ModelList": _object(
            {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": _object(
                        {"id": _STRING, "object": {"const": "model"}, "owned_by": _STRING},
                        {"created": _INT, "root": _STRING, "max_model_len": _INT},
                    ),
                },
            }
        ),
        "Health": _object(
            {
                "status": {"enum": ["ready", "unavailable"]},
                "services": {
                    "type": "object",
                    "additionalProperties": _object({"status": _STRING}),
                },
            }
        ),
    }


def request_schemas(model_id: str) -> dict[str, dict[str, Any]]:
    """The request models' JSON schemas (and the models they use), with `model` the served
    one."""
    keyed: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation") for m in REQUEST_MODELS
    ]
    _, defs = models_json_schema(keyed, ref_template=_REF)
    schemas: dict[str, dict[str, Any]] = defs["$defs"]
    for model in REQUEST_MODELS:
        schemas[model.__name__]["properties"]["model"] = {"type": "string", "enum": [model_id]}
    return schemas


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    response = _json(_ref("Error"), description)
    if retry:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return response


def _errors(*statuses: str) -> dict[str, Any]:
    described = {
        "400": _error("The body is not JSON, or a field is missing, mistyped or out of range."),
        "401": _error("API keys are configured and this request has none that is valid."),
        "404": _error("The model is not the one served."),
        "413": _error("The body is larger than the server takes."),
        "429": _error("The tenant's quota is used up for now.", retry=True),
        "503": _error("The server is draining or overloaded, or could not finish.", retry=True),
    }
    return {status: described[status] for status in statuses}


def _generation(request: str, answer: str, chunk: str, summary: str) -> dict[str, Any]:
    ok = _json(_ref(answer), f"The whole answer; with `stream: true`, {chunk} server-sent events.")
    events = f'`data: <{chunk}>` events (or one `data: <Error>`), then "data: [DONE]".'
    ok["content"]["text/event-stream"] = {"schema": {"type": "string", "description": events}}
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {"200": ok, **_errors("400", "401", "404", "413", "429", "503")},
        }
    }


def _paths() -> dict[str, Any]:
    plain = {"text/plain": {"schema": {"type": "string"}}}
    public: list[dict[str, list[Any]]] = []  # no API key needed
    return {
        "/v1/completions": _generation(
            "CompletionRequest", "Completion", "Completion", "A completion of a prompt."
        ),
        "/v1/chat/completions": _generation(
            "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "A chat answer."
        ),
        "/v1/models": {
            "get": {
                "summary": "The model served.",
                "responses": {"200": _json(_ref("ModelList"), "One model."), **_errors("401")},
            }
        },
        "/health": {
            "get": {
                "summary": "Whether every service is ready.",
                "security": public,
                "responses": {
                    "200": _json(_ref("Health"), "Every service is ready."),
                    "503": {
                        **_json(_ref("Health"), "Some service is not ready."),
                        "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                "security": public,
                "responses": {"200": {"description": "Text exposition format.", "content": plain}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "security": public,
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    }


def build_openapi(model_id: str) -> dict[str, Any]:
    retry_after = {
        "description": "Whole seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Duet", "version": "1", "description": __doc__.split("\n\n")[1]},
        "paths": _paths(),
        "components": {
            "schemas": {**request_schemas(model_id), **response_schemas()},
            "headers": {"RetryAfter": retry_after},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}, {}],  # a key only when the server has keys configured
    }
