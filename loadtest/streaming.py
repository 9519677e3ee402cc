"""One streamed request to an OpenAI-compatible server: the body it sends and what it records.

Works against any server that speaks OpenAI's SSE: `ignore_eos` and `min_tokens` are vLLM's
extensions (servers without them ignore them) and `duet` is ours (ignored elsewhere). Whether the
length was honoured is read back from `usage.completion_tokens`."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from duetserve.loadtest.spec import RequestResult, RequestSpec

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[Endpoint, str] = {
    "completions": "/completions",
    "chat": "/chat/completions",
}
Clock = Callable[[], float]  # seconds since the run's start


@dataclass(frozen=True, slots=True)
class BodyOptions:
    model: str
    endpoint: Endpoint = "completions"
    force_length: bool = True  # ignore_eos + min_tokens, so every answer is as long as asked
    send_duet_slo: bool = True  # the spec's SLO as Duet's `duet.slo`


def request_body(spec: RequestSpec, options: BodyOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": options.model,
        "max_tokens": spec.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.endpoint == "chat":
        body["messages"] = _messages(spec.prompt)
    else:
        body["prompt"] = _text(spec.prompt)
    if options.force_length:
        body["ignore_eos"] = True
        body["min_tokens"] = spec.output_tokens
    if spec.seed is not None:
        body["seed"] = spec.seed
    duet: dict[str, Any] = {}
    if options.send_duet_slo and spec.slo is not None:
        duet["slo"] = spec.slo.to_request()
    if spec.expected_output_tokens is not None:
        duet["expected_output_tokens"] = spec.expected_output_tokens
    if duet:
        body["duet"] = duet
    return body


def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _text(prompt: str | list[dict[str, str]]) -> str:
    """A chat workload sent to the completions endpoint: its turns' contents, one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


async def stream_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    result: RequestResult,
    clock: Clock,
) -> None:
    """Send one request and fill `result` in as its stream arrives. Never raises for what the
    server or the network did: those become `result.error`."""
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = await _http_error(response)
                return
            await _read_stream(response, result, clock, bool(body.get("ignore_eos")))
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        result.error = f"request failed: {detail}"


async def _http_error(response: aiohttp.ClientResponse) -> str:
    """`HTTP 404: <OpenAI error message>`, or the start of whatever body came instead."""
    text = await response.text(errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text.strip()[:200] or response.reason or ""
    return f"HTTP {response.status}: {message}"


async def _read_stream(
    response: aiohttp.ClientResponse, result: RequestResult, clock: Clock, forced: bool
) -> None:
    usage_tokens: int | None = None
    async for raw in response.content:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            _finish(result, usage_tokens, clock(), forced)
            return
        event = json.loads(data)
        if isinstance(event, dict) and event.get("error") is not None:
            result.error = f"stream error: {_event_error(event['error'])}"
            return
        if _event_text(event):
            now = clock()
            result.token_times_s.append(now)
            if result.first_token_s is None:
                result.first_token_s = now
        usage_tokens = _usage_tokens(event, usage_tokens)
    result.error = "stream dropped: ended without [DONE]"


def _finish(result: RequestResult, usage_tokens: int | None, now: float, forced: bool) -> None:
    result.done_s = now
    counted = len(result.token_times_s)
    result.output_tokens = usage_tokens if usage_tokens is not None else counted
    result.forced_length = forced and result.output_tokens == result.spec.output_tokens


def _event_text(event: Any) -> str:
    """The text of a completions or chat chunk; "" for role-only, usage and finish chunks."""
    choices = event.get("choices") if isinstance(event, dict) else None
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return str((choice["delta"] or {}).get("content") or "")
    return str(choice.get("text") or "")


def _usage_tokens(event: Any, previous: int | None) -> int | None:
    usage = event.get("usage") if isinstance(event, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return previous


def _event_error(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
