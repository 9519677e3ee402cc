"""The load generator's reading of what a server streams back, against a scripted local server:
servers that ignore forced lengths, streams cut short, errors in the stream and outside it."""

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from aiohttp import web

from duetserve.loadtest.client import fetch_model, run_requests
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.streaming import BodyOptions, request_body

Script = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
SPEC = RequestSpec(0, "Hello there", 2, 4, 0.0, SloSpec("latency", ttft_ms=100, tpot_ms=10))


def chunk(text: str) -> bytes:
    body = {"object": "text_completion", "choices": [{"index": 0, "text": text}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage(completion_tokens: int) -> bytes:
    body = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": completion_tokens}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def ignores_eos(request: web.Request, response: web.StreamResponse) -> None:
    """Stops at EOS after two tokens whatever was asked (a server without vLLM's extensions);
    one chunk carries no text and is not a token."""
    for piece in (b": keep-alive\n\n", chunk("a"), chunk(""), chunk("b"), usage(2)):
        await response.write(piece)
    await response.write(b"data: [DONE]\n\n")


async def drops(request: web.Request, response: web.StreamResponse) -> None:
    await response.write(chunk("a"))


async def fails_midway(request: web.Request, response: web.StreamResponse) -> None:
    await response.write(chunk("a"))
    error = {"error": {"message": "worker lost", "type": "server_error"}}
    await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    """A scripted server on loopback: the URL path names the script; bodies are recorded."""
    scripts: dict[str, Script] = {"ignores": ignores_eos, "drops": drops, "fails": fails_midway}
    bodies: list[dict[str, object]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        script = request.match_info["script"]
        if script == "broken":
            return web.Response(status=502, text="<html>bad gateway</html>")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await scripts[script](request, response)
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted"}]})

    app = web.Application()
    app.router.add_post("/{script}/v1/completions", completions)
    app.router.add_get("/{script}/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", bodies
    await runner.cleanup()


async def test_a_server_that_ignores_forced_lengths_is_detected(
    server: tuple[str, list[dict[str, object]]],
) -> None:
    url, bodies = server
    [result] = await run_requests(f"{url}/ignores/v1", "m", [SPEC], progress=False)
    assert result.ok and result.output_tokens == 2 and len(result.token_times_s) == 2
    assert not result.forced_length
    assert bodies[0]["ignore_eos"] is True and bodies[0]["min_tokens"] == 4
    assert bodies[0]["duet"] == {"slo": {"kind": "latency", "ttft_ms": 100, "tpot_ms": 10}}


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ("drops", "stream dropped: ended without [DONE]"),
        ("fails", "stream error: worker lost"),
        ("broken", "HTTP 502: <html>bad gateway</html>"),
    ],
)
async def test_failures_become_errors(
    server: tuple[str, list[dict[str, object]]], script: str, error: str
) -> None:
    url, _ = server
    [result] = await run_requests(f"{url}/{script}/v1", "m", [SPEC], progress=False)
    assert result.error == error and not result.ok and result.done_s is None


async def test_model_is_read_from_the_listing(server: tuple[str, list[dict[str, object]]]) -> None:
    url, _ = server
    assert await fetch_model(f"{url}/any/v1") == "scripted"


def test_bodies_for_chat_without_forcing_or_slo() -> None:
    options = BodyOptions("m", "chat", force_length=False, send_duet_slo=False)
    body = request_body(SPEC, options)
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert body["max_tokens"] == 4 and body["stream_options"] == {"include_usage": True}
    assert not {"ignore_eos", "min_tokens", "duet", "prompt"} & body.keys()


def test_a_seeded_spec_with_an_oracle_length_sends_both() -> None:
    spec = replace(SPEC, seed=7, expected_output_tokens=3)
    body = request_body(spec, BodyOptions("m", force_length=False))
    assert body["seed"] == 7
    assert body["duet"] == {"slo": SPEC.slo.to_request(), "expected_output_tokens": 3}
    plain = request_body(replace(spec, slo=None), BodyOptions("m", send_duet_slo=False))
    assert plain["duet"] == {"expected_output_tokens": 3}
