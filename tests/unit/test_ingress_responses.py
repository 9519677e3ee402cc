"""Response bodies parse with the official openai client's own types (the reference)."""

import json

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from duetserve.proto.tokens import TokenLogprob, TopLogprob
from duetserve.services.ingress import responses as r

HEAD = r.ResponseHead("cmpl-1", "tiny", 1732400000)
USAGE = r.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)
LOGPROBS = [
    TokenLogprob(7, -0.1, (TopLogprob(7, -0.1), TopLogprob(8, -2.5))),
    TokenLogprob(9, -0.7, (TopLogprob(9, -0.7), TopLogprob(3, -1.0))),
]


def test_completion_body_is_an_openai_completion() -> None:
    logprobs = r.completion_logprobs(["he", "llo"], LOGPROBS, [["he", "ha"], ["llo", "!"]])
    body = r.completion_body(HEAD, "hello", "length", USAGE, logprobs)
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].text == "hello" and parsed.choices[0].finish_reason == "length"
    assert parsed.usage is not None and parsed.usage.total_tokens == 8
    assert parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 2
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.text_offset == [0, 2]
    assert parsed.choices[0].logprobs.top_logprobs == [
        {"he": -0.1, "ha": -2.5},
        {"llo": -0.7, "!": -1.0},
    ]


def test_chat_body_and_chunks_are_openai_types() -> None:
    logprobs = r.chat_logprobs(["hé", "!"], LOGPROBS, [["hé", "x"], ["!", "?"]])
    parsed = ChatCompletion.model_validate(r.chat_body(HEAD, "hé!", "stop", USAGE, logprobs))
    assert parsed.choices[0].message.content == "hé!"
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].bytes == list("hé".encode())
    first = ChatCompletionChunk.model_validate(
        r.chat_chunk(HEAD, {"role": "assistant", "content": ""})
    )
    assert first.choices[0].delta.role == "assistant"
    last = ChatCompletionChunk.model_validate(r.chat_chunk(HEAD, {}, finish_reason="stop"))
    assert last.choices[0].finish_reason == "stop"
    usage = ChatCompletionChunk.model_validate(r.chat_usage_chunk(HEAD, USAGE))
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 3
    stream_usage = Completion.model_validate(r.completion_usage_chunk(HEAD, USAGE))
    assert stream_usage.choices == [] and stream_usage.usage is not None


def test_sse_framing() -> None:
    frame = r.sse({"a": "é"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {"a": "é"}
    assert r.SSE_DONE == b"data: [DONE]\n\n"
