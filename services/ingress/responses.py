"""Response bodies in OpenAI's shapes: whole completions, stream chunks, usage, logprobs, SSE.

Pure functions of what a request produced; the HTTP shell only serialises and sends them."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from duetserve.proto.tokens import TokenLogprob
from duetserve.services.ingress.attainment import SloOutcome

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    slo: SloOutcome | None = None  # known once the request finished

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.slo is not None:  # Duet's extension, named as the request's `duet` object
            body["duet"] = {"slo": self.slo.body()}
        return body


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What every body of one response shares."""

    id: str
    model: str
    created: int


def completion_body(
    head: ResponseHead,
    text: str,
    finish_reason: str | None,
    usage: Usage | None,
    logprobs: dict[str, Any] | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    body: dict[str, Any] = {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [choice],
    }
    if usage is not None or not stream:
        body["usage"] = usage.body() if usage is not None else None
    return body


def chat_body(
    head: ResponseHead,
    text: str,
    finish_reason: str,
    usage: Usage,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [choice],
        "usage": usage.body(),
    }


def chat_chunk(
    head: ResponseHead,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "choices": [choice],
    }


def chat_usage_chunk(head: ResponseHead, usage: Usage) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, only usage."""
    return {**chat_chunk(head, {}), "choices": [], "usage": usage.body()}


def completion_usage_chunk(head: ResponseHead, usage: Usage) -> dict[str, Any]:
    return {**completion_body(head, "", None, usage, stream=True), "choices": []}


def completion_logprobs(
    token_texts: Sequence[str], logprobs: Sequence[TokenLogprob], top_texts: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """The legacy completions format: parallel lists, top alternatives as {text: logprob}."""
    offsets, position = [], 0
    for text in token_texts:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": list(token_texts),
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [
            {text: top.logprob for text, top in zip(texts, lp.top, strict=True)}
            for texts, lp in zip(top_texts, logprobs, strict=True)
        ],
        "text_offset": offsets,
    }


def chat_logprobs(
    token_texts: Sequence[str], logprobs: Sequence[TokenLogprob], top_texts: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """The chat format: one entry per token with its bytes and its top alternatives."""
    content = []
    for text, lp, texts in zip(token_texts, logprobs, top_texts, strict=True):
        top = [
            {"token": t, "logprob": alt.logprob, "bytes": list(t.encode())}
            for t, alt in zip(texts, lp.top, strict=True)
        ]
        content.append(
            {
                "token": text,
                "logprob": lp.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": top,
            }
        )
    return {"content": content}
