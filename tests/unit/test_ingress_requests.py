"""OpenAI request validation: strict types, ranges, extensions, errors in OpenAI's shape."""

from typing import Any

import pytest
from pydantic import ValidationError

from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import SloKind, SubmitRequest
from duetserve.services.ingress.api_models import (
    MAX_COUNT,
    MAX_LOGPROBS,
    ChatCompletionRequest,
    CompletionRequest,
)
from duetserve.services.ingress.bodies import parse_json_body
from duetserve.services.ingress.errors import ApiError


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "tiny", "prompt": "hi", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def api_error(build: Any, **fields: Any) -> ApiError:
    with pytest.raises(ValidationError) as info:
        build(**fields)
    return ApiError.from_validation(info.value)


def test_defaults_and_sampling_translation() -> None:
    req = completion(temperature=0, top_k=-1, stop="\n", seed=3, logprobs=2, max_tokens=5)
    sampling = req.sampling(req.max_tokens, req.logprobs)
    assert (sampling.temperature, sampling.top_k, sampling.seed) == (0.0, None, 3)
    assert (sampling.max_tokens, sampling.logprobs) == (5, 2)
    assert req.stop_strings == ("\n",)
    assert completion(prompt=[1, 2, 3]).prompt_text_or_ids == [1, 2, 3]
    assert completion(prompt=["only one"]).prompt_text_or_ids == "only one"


def test_unknown_fields_are_ignored_like_vllm() -> None:
    req = completion(best_of=None, user="x", some_client_extra={"a": 1})
    assert req.model == "tiny"


# Fields that change what a correct answer is: each one, when it asks for something, is a 400
# that names it; its no-op default (what clients send without being asked) is accepted.
ANSWER_CHANGING_FIELDS = [
    ("response_format", {"type": "json_object"}, {"type": "text"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, None),
    ("tools", [{"type": "function", "function": {"name": "f"}}], []),
    ("tool_choice", "required", "none"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}, None),
    ("functions", [{"name": "f"}], None),
    ("function_call", "auto", "none"),
    ("logit_bias", {"50256": -100}, {}),
    ("best_of", 2, 1),
    ("prompt_logprobs", 1, None),
    ("min_p", 0.1, 0.0),
    ("use_beam_search", True, False),
    ("guided_json", {"type": "object"}, None),
    ("guided_regex", "[a-z]+", None),
    ("guided_choice", ["yes", "no"], None),
    ("guided_grammar", "root ::= 'a'", None),
    ("structured_outputs", {"json": {}}, None),
    ("audio", {"voice": "alloy", "format": "wav"}, None),
    ("modalities", ["text", "audio"], ["text"]),
]


@pytest.mark.parametrize("build", [completion, chat], ids=["completion", "chat"])
@pytest.mark.parametrize(("field", "asks", "harmless"), ANSWER_CHANGING_FIELDS)
def test_fields_that_change_the_answer_are_refused_not_ignored(
    build: Any, field: str, asks: Any, harmless: Any
) -> None:
    error = api_error(build, **{field: asks})
    assert (error.status, error.param) == (400, field)
    assert error.message.startswith(f"{field}: ")
    assert error.body()["error"]["type"] == "invalid_request_error"
    build(**{field: harmless})  # the default value is accepted


@pytest.mark.parametrize(
    ("build", "fields", "param"),
    [
        (completion, {"n": 2}, "n"),
        (chat, {"n": 3}, "n"),
        (completion, {"echo": True}, "echo"),
        (chat, {"echo": True}, "echo"),
        (completion, {"suffix": "tail"}, "suffix"),
        (completion, {"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        (chat, {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    ],
)
def test_n_echo_suffix_and_logprobs_beyond_the_supported_are_refused(
    build: Any, fields: dict[str, Any], param: str
) -> None:
    error = api_error(build, **fields)
    assert error.status == 400 and error.param == param, error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"stream": "yes"}, "stream"),
        ({"n": 2}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"stop": ["a", ""]}, "stop"),
        ({"echo": True}, "echo"),
        ({"duet": {"slo": {"kind": "latency", "ttft_ms": -1}}}, "duet.slo.ttft_ms"),
        ({"duet": {"cache": {"public_prefix_tokens": -3}}}, "duet.cache.public_prefix_tokens"),
    ],
)
def test_bad_completion_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    error = api_error(completion, **fields)
    assert error.status == 400
    assert error.param is not None and error.param.startswith(param)
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"


def test_chat_content_parts_and_max_completion_tokens() -> None:
    req = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=7,
        logprobs=True,
        top_logprobs=3,
    )
    assert req.template_messages()[1] == {"role": "user", "content": "ab"}
    assert (req.requested_max_tokens, req.logprobs_count) == (7, 3)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_chat_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    error = api_error(chat, **fields)
    assert error.param is not None and error.param.startswith(param)


def test_duet_slo_extension_becomes_the_wire_slo() -> None:
    req = completion(duet={"slo": {"kind": "deadline", "deadline_ms": 8000}})
    assert req.duet is not None and req.duet.slo is not None
    slo = req.duet.slo.to_proto()
    assert (slo.kind, slo.deadline_ms) == (SloKind.DEADLINE, 8000.0)
    incomplete = completion(duet={"slo": {"kind": "latency", "ttft_ms": 100}})
    assert incomplete.duet is not None and incomplete.duet.slo is not None
    with pytest.raises(ValueError, match="needs tpot_ms"):
        incomplete.duet.slo.to_proto()


# Found by the HTTP fuzzer: each of these was a 500 (msgpack cannot carry an int past 64 bits).
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": 2**70}, "top_k"),
        ({"min_tokens": 2**70}, "min_tokens"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"prompt": [2**70]}, "prompt"),
        ({"duet": {"cache": {"public_prefix_tokens": 2**70}}}, "duet.cache.public_prefix_tokens"),
    ],
)
def test_counts_past_what_the_wire_carries_are_a_400(fields: dict[str, Any], param: str) -> None:
    error = api_error(completion, **fields)
    assert error.status == 400
    assert error.param is not None and error.param.startswith(param)


def test_the_largest_counts_accepted_fit_on_the_wire() -> None:
    most = {"top_k": MAX_COUNT, "min_tokens": MAX_COUNT, "stop_token_ids": [MAX_COUNT]}
    sampling = completion(**most, seed=2**63 - 1).sampling(MAX_COUNT, None)
    submit = SubmitRequest("r", "t", (MAX_COUNT,), sampling, 0.0, "s")
    assert decode(encode(submit), SubmitRequest) == submit  # encode raises if one does not fit


# Found by the HTTP fuzzer: JSON nested past the parser's recursion, and strings with unpaired
# surrogates (which no tokenizer or UTF-8 encoder takes), were 500s.
@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"model": "tiny", "prompt": "\\ud800"}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x\\uDFFF"}]}',
        b'{"\\udc00": 1}',
        b"{",
        b"\xff\xfe",
    ],
)
def test_bodies_json_loads_takes_but_nothing_after_it_can_are_a_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_json_body(raw)
    assert info.value.status == 400
    assert info.value.message.startswith("Invalid JSON body")


def test_paired_surrogates_are_one_character_and_accepted() -> None:
    assert parse_json_body(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}
