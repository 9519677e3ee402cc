"""The ingress service end to end: a real nats-server, a real aiohttp server on loopback, the
official openai client, and a scripted scheduler (a real NATS subscriber on the unit's submit
subject that accepts each request and plays back a script of TokenChunks for it)."""

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

from duetserve.common.health import serve_health
from duetserve.common.lengths import LengthPredictor
from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.settings import CommonSettings
from duetserve.common.tracing import setup_tracing, shutdown_tracing
from duetserve.common.unit_role import units_bucket
from duetserve.proto.common import ErrorReply, HealthStatus
from duetserve.proto.scheduling import CancelReason, CancelRequest, SchedulerStats, SloKind
from duetserve.proto.units import card_key
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.ingress.openapi import build_openapi
from duetserve.services.ingress.service import IngressService
from duetserve.services.ingress.settings import IngressSettings
from duetserve.services.scheduler.card import PrefixSummary, publish_cards
from tests.conftest import ModelDirs
from tests.integration.scripted_scheduler import FakeCore, Script, ScriptedScheduler
from tests.model_specs import TINY

# CJK, an emoji and accents: byte-level tokens split these characters.
TEXT = " Hello 世界! 🎉 café — naïve 😀 done."
CONTEXT_LEN = TINY.max_context_len
StartIngress = Callable[..., Awaitable[IngressService]]


@pytest.fixture(scope="session")
def tiny_dir(model_dirs: ModelDirs) -> Path:
    return model_dirs.get(TINY)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture
def text_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode(TEXT, add_special_tokens=False))


@pytest.fixture
async def start_ingress(nats_server: NatsServer, tiny_dir: Path) -> AsyncIterator[StartIngress]:
    started: list[IngressService] = []

    async def start(**overrides: Any) -> IngressService:
        fields: dict[str, Any] = {
            "model": tiny_dir,
            "nats_url": nats_server.url,
            "port": 0,
            "submit_timeout_s": 1.0,
            "health_timeout_s": 0.3,
            "stop_timeout_s": 2.0,
            **overrides,
        }
        service = IngressService(IngressSettings(**fields))
        started.append(service)
        await service.start()
        return service

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
async def ingress(start_ingress: StartIngress) -> IngressService:
    return await start_ingress()


@pytest.fixture
async def scheduler(bus: Bus, text_ids: tuple[int, ...]) -> AsyncIterator[ScriptedScheduler]:
    scripted = ScriptedScheduler(bus, Script(text_ids))
    await scripted.start()
    yield scripted
    scripted.stop()


@pytest.fixture
async def client(ingress: IngressService) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{ingress.port}/v1", api_key="unused", max_retries=0, timeout=10
    ) as connected:
        yield connected


@pytest.fixture
async def http(ingress: IngressService) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{ingress.port}") as session:
        yield session


def model_id(ingress: IngressService) -> str:
    return ingress.settings.model_id


async def test_completion_and_chat_return_the_scripted_text(
    ingress: IngressService,
    client: openai.AsyncOpenAI,
    scheduler: ScriptedScheduler,
    tokenizer: Tokenizer,
    text_ids: tuple[int, ...],
) -> None:
    completion = await client.completions.create(model=model_id(ingress), prompt="Say it")
    assert completion.choices[0].text == TEXT
    assert completion.choices[0].finish_reason == "length"
    assert completion.id.startswith("cmpl-")
    submit = scheduler.submits[-1]
    assert submit.prompt_token_ids == tuple(tokenizer.encode("Say it"))
    assert submit.tenant == "default" and submit.slo is not None
    assert submit.slo.kind == SloKind.LATENCY
    # The predicted bound of its output, from the prompt's text (common/lengths.py).
    assert submit.output_bound == LengthPredictor().bound("Say it", submit.sampling.max_tokens)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(submit.prompt_token_ids)
    assert completion.usage.completion_tokens == len(text_ids)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 3

    messages: Any = [{"role": "user", "content": "Say it 😀"}]
    chat = await client.chat.completions.create(model=model_id(ingress), messages=messages)
    assert chat.choices[0].message.content == TEXT
    assert chat.choices[0].message.role == "assistant"
    submit = scheduler.submits[-1]
    assert submit.request_id.startswith("chatcmpl-")
    assert submit.prompt_token_ids == tuple(tokenizer.encode_chat(messages))
    assert submit.sampling.max_tokens == CONTEXT_LEN - len(submit.prompt_token_ids)


async def test_streamed_text_equals_the_whole_text(
    ingress: IngressService, client: openai.AsyncOpenAI, scheduler: ScriptedScheduler
) -> None:
    stream = await client.completions.create(model=model_id(ingress), prompt="Hi", stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert "".join(pieces) == TEXT and len(pieces) > 5

    chat_stream = await client.chat.completions.create(
        model=model_id(ingress),
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in chat_stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(scheduler.script.token_ids)


async def test_stop_string_truncates_and_cancels_at_the_scheduler(
    ingress: IngressService, client: openai.AsyncOpenAI, scheduler: ScriptedScheduler
) -> None:
    scheduler.script = replace(scheduler.script, finish=None)  # only the cancel ends it
    stop = "café"
    expected = TEXT[: TEXT.index(stop)]
    completion = await client.completions.create(
        model=model_id(ingress), prompt="Hi", stop=[stop, "never"]
    )
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason == "stop"
    cancel = await scheduler.next_cancel()
    assert cancel == CancelRequest(completion.id, CancelReason.STOP_STRING)

    stream = await client.completions.create(
        model=model_id(ingress), prompt="Hi", stop="🎉", stream=True
    )
    pieces = [chunk.choices[0] async for chunk in stream]
    assert "".join(p.text for p in pieces) == TEXT[: TEXT.index("🎉")]
    assert pieces[-1].finish_reason == "stop"
    assert (await scheduler.next_cancel()).reason == CancelReason.STOP_STRING


async def test_logprobs_name_each_token(
    ingress: IngressService,
    client: openai.AsyncOpenAI,
    scheduler: ScriptedScheduler,
    tokenizer: Tokenizer,
    text_ids: tuple[int, ...],
) -> None:
    scheduler.script = replace(scheduler.script, logprobs=True, chunk_size=4)
    completion = await client.completions.create(model=model_id(ingress), prompt="Hi", logprobs=1)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.tokens == [tokenizer.decode([i]) for i in text_ids]
    assert logprobs.token_logprobs == [-0.5] * len(text_ids)
    chat = await client.chat.completions.create(
        model=model_id(ingress),
        messages=[{"role": "user", "content": "Hi"}],
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs and chat.choices[0].logprobs.content
    assert content and len(content) == len(text_ids)
    assert [alt.logprob for alt in content[0].top_logprobs] == [-0.5, -1.5]


async def post(http: aiohttp.ClientSession, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(path, data=data, **kw) as response:
        return response.status, await response.json()


async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    ingress: IngressService, http: aiohttp.ClientSession, scheduler: ScriptedScheduler
) -> None:
    model = model_id(ingress)
    good = {"model": model, "prompt": "Hi", "max_tokens": 5}
    cases: list[tuple[Any, int, str | None]] = [
        (b"{not json", 400, None),
        ({**good, "max_tokens": "5"}, 400, "max_tokens"),
        ({**good, "model": "gpt-9"}, 404, "model"),
        ({**good, "n": 2}, 400, "n"),
        ({**good, "prompt": [5] * CONTEXT_LEN}, 400, "prompt"),
        ({**good, "prompt": [5, 6], "max_tokens": CONTEXT_LEN}, 400, "max_tokens"),
        ({**good, "prompt": [5, TINY.vocab_size]}, 400, "prompt"),
    ]
    for body, status, param in cases:
        got_status, error = await post(http, "/v1/completions", body)
        assert got_status == status, (body, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["param"] == param, error
    _, too_long = await post(http, "/v1/completions", cases[5][0])
    assert "maximum context length is 2048 tokens" in too_long["error"]["message"]
    assert (await post(http, "/v1/chat/completions", {"model": model, "messages": []}))[0] == 400
    async with http.get("/v1/nothing") as response:
        assert response.status == 404 and "error" in await response.json()
    status, body = await post(http, "/v1/completions", good)
    assert status == 200 and body["choices"][0]["text"]


async def test_the_official_client_gets_a_400_for_each_field_that_would_change_the_answer(
    ingress: IngressService, client: openai.AsyncOpenAI, scheduler: ScriptedScheduler
) -> None:
    model, messages = model_id(ingress), [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat_cases: list[tuple[str, dict[str, Any]]] = [
        ("response_format", {"response_format": {"type": "json_object"}}),
        ("tools", {"tools": [tool]}),
        ("tool_choice", {"tool_choice": "required"}),
        ("logit_bias", {"logit_bias": {"5": 100}}),
        ("n", {"n": 2}),
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ]
    submitted = len(scheduler.submits)
    for param, fields in chat_cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=model, messages=messages, **fields)
        error = info.value.body
        assert isinstance(error, dict) and error["param"] == param, error
        assert error["message"].startswith(f"{param}: "), error
    completion_cases: list[tuple[str, dict[str, Any]]] = [
        ("best_of", {"best_of": 3}),
        ("echo", {"echo": True}),
        ("suffix", {"suffix": "end"}),
        ("logprobs", {"logprobs": 21}),
        ("logit_bias", {"logit_bias": {"5": -100}}),
    ]
    for param, fields in completion_cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=model, prompt="Hi", **fields)
        assert isinstance(info.value.body, dict) and info.value.body["param"] == param
    assert len(scheduler.submits) == submitted  # nothing reached the scheduler
    plain = await client.chat.completions.create(
        model=model, messages=messages, response_format={"type": "text"}, logit_bias={}
    )
    assert plain.choices[0].message.content == TEXT  # the no-op defaults are served


async def test_api_keys_are_required_when_configured(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    ingress = await start_ingress(api_keys="secret-1:tenant-a", max_body_bytes=4096)
    base = f"http://127.0.0.1:{ingress.port}"
    body = {"model": model_id(ingress), "prompt": "Hi"}
    async with aiohttp.ClientSession(base) as http:
        status, error = await post(http, "/v1/completions", body)
        assert status == 401 and error["error"]["type"] == "authentication_error"
        wrong = {"Authorization": "Bearer secret-2"}
        assert (await post(http, "/v1/completions", body, headers=wrong))[0] == 401
        huge = {**body, "prompt": "x" * 5000}
        status, error = await post(
            http, "/v1/completions", huge, headers={"Authorization": "Bearer secret-1"}
        )
        assert status == 413 and error["error"]["type"] == "invalid_request_error"
        async with http.get("/health") as response:
            assert response.status == 503  # no key needed; no services are up
            assert response.headers["Retry-After"] == "1"
        async with http.get("/openapi.json") as response:
            assert response.status == 200
            assert await response.json() == build_openapi(model_id(ingress))
        async with http.get("/metrics") as response:
            assert response.status == 200
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="secret-1", max_retries=0) as c:
        completion = await c.completions.create(model=model_id(ingress), prompt="Hi")
    assert completion.choices[0].text == TEXT
    assert scheduler.submits[-1].tenant == "tenant-a"


async def test_client_disconnect_mid_stream_cancels_the_request(
    ingress: IngressService, http: aiohttp.ClientSession, scheduler: ScriptedScheduler
) -> None:
    # Every token at once, then silence: only the closed connection can end the request.
    scheduler.script = replace(scheduler.script, finish=None)
    body = {"model": model_id(ingress), "prompt": "Hi", "stream": True}
    response = await http.post("/v1/completions", data=json.dumps(body))
    assert response.status == 200
    line = b""
    while not line.startswith(b"data: "):
        line = await response.content.readline()
    assert json.loads(line[len(b"data: ") :])["choices"][0]["text"]
    response.close()
    cancel = await scheduler.next_cancel()
    assert cancel == CancelRequest(scheduler.submits[-1].request_id, CancelReason.CLIENT_GONE)
    await _until(lambda: ingress.admission.in_flight == 0)
    assert ingress.metrics.in_flight._value.get() == 0

    # A client that gives up on a whole (non-streamed) answer.
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            "/v1/completions",
            data=json.dumps({**body, "stream": False}),
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    cancel = await scheduler.next_cancel()
    assert cancel == CancelRequest(scheduler.submits[-1].request_id, CancelReason.CLIENT_GONE)
    await _until(lambda: ingress.admission.in_flight == 0)
    text = await _metrics(http)
    assert 'duet_ingress_requests_total{endpoint="/v1/completions",status="499"} 2.0' in text


async def test_a_client_gone_while_its_submit_is_in_flight_is_cancelled_too(
    ingress: IngressService, http: aiohttp.ClientSession, scheduler: ScriptedScheduler
) -> None:
    scheduler.script = replace(scheduler.script, accept_delay_s=0.6, finish=None)
    body = {"model": model_id(ingress), "prompt": "Hi"}
    with pytest.raises(asyncio.TimeoutError):  # gone before the scheduler has answered
        await http.post(
            "/v1/completions", data=json.dumps(body), timeout=aiohttp.ClientTimeout(total=0.2)
        )
    cancel = await scheduler.next_cancel()
    assert cancel == CancelRequest(scheduler.submits[-1].request_id, CancelReason.CLIENT_GONE)
    await _until(lambda: ingress.admission.in_flight == 0)


async def _until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_no_scheduler_is_a_503_and_an_overloaded_one_a_429_both_with_retry_after(
    ingress: IngressService, client: openai.AsyncOpenAI, bus: Bus, text_ids: tuple[int, ...]
) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model=model_id(ingress), prompt="Hi")
    assert info.value.status_code == 503
    assert "scheduler" in info.value.message
    assert info.value.response.headers["Retry-After"] == "1"
    busy = ErrorReply("overloaded", "the first token would take 9.0s", retry_after_s=7.2)
    refusing = ScriptedScheduler(bus, Script(text_ids, refuse=busy))
    await refusing.start()
    with pytest.raises(openai.RateLimitError) as limited:
        await client.completions.create(model=model_id(ingress), prompt="Hi")
    assert limited.value.status_code == 429 and "would take 9.0s" in limited.value.message
    assert limited.value.response.headers["Retry-After"] == "8"
    assert isinstance(limited.value.body, dict) and limited.value.body["code"] == "overloaded"
    refusing.script = replace(refusing.script, refuse=ErrorReply("no_worker", "none"))
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model=model_id(ingress), prompt="Hi")
    assert info.value.status_code == 503 and "Retry-After" in info.value.response.headers
    refusing.script = replace(refusing.script, refuse=ErrorReply("invalid_request", "bad"))
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=model_id(ingress), prompt="Hi")
    assert ingress.admission.in_flight == 0


async def test_an_error_chunk_is_a_503_with_retry_after_or_an_error_event(
    ingress: IngressService, http: aiohttp.ClientSession, scheduler: ScriptedScheduler
) -> None:
    """The request was valid (ingress checked it): what the server could not finish is its
    own trouble, worth retrying later, never a 500."""
    scheduler.script = replace(scheduler.script, error="worker lost its KV")
    body = {"model": model_id(ingress), "prompt": "Hi"}
    async with http.post("/v1/completions", json=body) as response:
        status, error = response.status, await response.json()
        assert response.headers["Retry-After"] == "1"
    assert status == 503
    assert error["error"]["type"] == "server_error"
    assert error["error"]["message"] == "worker lost its KV"
    async with http.post("/v1/completions", data=json.dumps({**body, "stream": True})) as stream:
        events = [line async for line in stream.content if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]\n"
    assert json.loads(events[-2][len(b"data: ") :])["error"]["message"] == "worker lost its KV"


async def test_two_units_share_one_nats_and_each_request_runs_on_its_own_unit(
    start_ingress: StartIngress, bus: Bus, text_ids: tuple[int, ...]
) -> None:
    """A unit's scheduler answers its unit's subjects only: with two units on one bus, each
    request runs once, on the unit its ingress sends it to (never on both), and its cancel
    and status queries go there too."""
    units = {u: ScriptedScheduler(bus, Script(text_ids, finish=None), unit=u) for u in "ab"}
    for scheduler in units.values():
        await scheduler.start()
    try:
        for unit, scheduler in units.items():
            ingress = await start_ingress(unit=unit, stream_quiet_s=0.2)
            base = f"http://127.0.0.1:{ingress.port}/v1"
            async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as api:
                request = asyncio.create_task(
                    api.completions.create(model=model_id(ingress), prompt=f"to {unit}")
                )
                await _until(partial(_count_at_least, scheduler.submits, 1))
                await _until(partial(_count_at_least, scheduler.status_queries, 1))
                request.cancel()
            cancel = await scheduler.next_cancel()
            assert cancel.request_id == scheduler.submits[0].request_id
        assert [len(s.submits) for s in units.values()] == [1, 1]
        assert all(s.cancels.empty() for s in units.values())
    finally:
        for scheduler in units.values():
            scheduler.stop()


@asynccontextmanager
async def units_on_the_bus(
    bus: Bus,
    schedulers: dict[str, ScriptedScheduler],
    cores: dict[str, FakeCore],
    summaries: dict[str, PrefixSummary] | None = None,
) -> AsyncIterator[dict[str, asyncio.Task[None]]]:
    """Scripted units: each one's scheduler answering, and its card written every 0.1 s from
    its FakeCore as a real scheduler writes it (the writers, by unit, to cancel one: its unit
    died). Afterwards the cards are purged (the next tests' ingresses must not route to these
    units) and everything stops."""
    writers = {
        unit: asyncio.create_task(
            publish_cards(bus, core, unit, f"s-{unit}", 0.1, (summaries or {}).get(unit))  # type: ignore[arg-type]
        )
        for unit, core in cores.items()
    }
    for scheduler in schedulers.values():
        await scheduler.start()
    try:
        yield writers
    finally:
        for writer in writers.values():
            writer.cancel()
        await asyncio.gather(*writers.values(), return_exceptions=True)
        bucket = await units_bucket(bus)
        for unit in cores:
            await bucket.purge(card_key(unit))
        for scheduler in schedulers.values():
            scheduler.stop()


async def test_ingress_routes_each_request_to_the_least_loaded_live_unit(
    start_ingress: StartIngress, bus: Bus, text_ids: tuple[int, ...]
) -> None:
    """Units write their cards to the registry (as their schedulers do, every period); ingress
    follows them and sends each request to the least loaded live unit, whichever unit it was
    configured with; a unit whose card stops coming is not chosen once it is stale."""
    units = {u: ScriptedScheduler(bus, Script(text_ids), unit=u) for u in ("ua", "ub")}
    cores = {
        "ua": FakeCore(waiting=5, running=4, limit=4),
        "ub": FakeCore(waiting=0, running=1, limit=4),
    }
    async with units_on_the_bus(bus, units, cores) as writers:
        ingress = await start_ingress(unit="ua")
        await _until(lambda: len(ingress.units.live()) == 2, timeout=5.0)
        base = f"http://127.0.0.1:{ingress.port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as api:
            await api.completions.create(model=model_id(ingress), prompt="Hi")
            assert [len(units[u].submits) for u in ("ua", "ub")] == [0, 1]
            cores["ua"].running, cores["ua"].waiting = 0, 0
            cores["ub"].waiting = 9
            await asyncio.sleep(0.4)  # the next cards
            await api.completions.create(model=model_id(ingress), prompt="Hi")
            assert [len(units[u].submits) for u in ("ua", "ub")] == [1, 1]
            async with aiohttp.ClientSession() as http, http.get(base[:-3] + "/metrics") as r:
                text = await r.text()
            assert "duet_units_live 2.0" in text
            assert 'duet_unit_load{unit="ub"} 2.5' in text  # (9 + 1) / 4
            # The schedulers' gauges are the sum over the live units.
            units["ua"].stats = SchedulerStats(1, 0, 2, 30, 100, 3)
            units["ub"].stats = SchedulerStats(9, 1, 3, 10, 100, 4)
            async with aiohttp.ClientSession() as http, http.get(base[:-3] + "/metrics") as r:
                text = await r.text()
            model = model_id(ingress)
            assert f'vllm:num_requests_waiting{{model_name="{model}"}} 10.0' in text
            assert f'vllm:num_requests_running{{model_name="{model}"}} 6.0' in text
            assert f'vllm:kv_cache_usage_perc{{model_name="{model}"}} 0.8' in text
            assert f'vllm:num_preemptions_total{{model_name="{model}"}} 7.0' in text
            # ua stops writing (its scheduler died): once stale, ub gets the requests.
            writers["ua"].cancel()
            ingress.units.stale_s = 0.5
            await _until(lambda: [c.unit for c in ingress.units.live()] == ["ub"], timeout=5.0)
            await api.completions.create(model=model_id(ingress), prompt="Hi")
            assert [len(units[u].submits) for u in ("ua", "ub")] == [1, 2]


async def test_a_prompt_goes_to_the_unit_whose_card_lists_its_prefix(
    start_ingress: StartIngress, bus: Bus, text_ids: tuple[int, ...], tokenizer: Tokenizer
) -> None:
    """KV-aware routing: a prompt whose prefix ua's card lists goes to ua although ub is
    idler; a prompt no card lists goes to the idler ub."""
    document = "A long shared system prompt about the routing of requests to units. " * 4
    summary = PrefixSummary()
    summary.add("default", tokenizer.encode(document, add_special_tokens=True), 4, 0)
    units = {u: ScriptedScheduler(bus, Script(text_ids), unit=u) for u in ("ua", "ub")}
    cores = {"ua": FakeCore(0, 1, 4), "ub": FakeCore(0, 0, 4)}
    async with units_on_the_bus(bus, units, cores, {"ua": summary}):
        ingress = await start_ingress(unit="ub")
        await _until(lambda: len(ingress.units.live()) == 2, timeout=5.0)
        base = f"http://127.0.0.1:{ingress.port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as api:
            await api.completions.create(model=model_id(ingress), prompt=document + "Question?")
            await api.completions.create(model=model_id(ingress), prompt="Something else.")
        assert [len(units[u].submits) for u in ("ua", "ub")] == [1, 1]
        assert units["ua"].submits[0].prompt_token_ids[:8] == tuple(
            tokenizer.encode(document, add_special_tokens=True)[:8]
        )


async def test_a_request_its_unit_refuses_for_load_is_offered_to_the_next_unit(
    start_ingress: StartIngress, bus: Bus, text_ids: tuple[int, ...]
) -> None:
    """The idlest unit by its card refuses (overloaded: its card lags its queue); the next
    best takes the request, and the client never sees the refusal. When every unit refuses,
    the client gets the 429."""
    busy = ErrorReply("overloaded", "queued too long", retry_after_s=2.0)
    units = {
        "ua": ScriptedScheduler(bus, Script(text_ids, refuse=busy), unit="ua"),
        "ub": ScriptedScheduler(bus, Script(text_ids), unit="ub"),
    }
    cores = {"ua": FakeCore(0, 0, 4), "ub": FakeCore(0, 2, 4)}
    async with units_on_the_bus(bus, units, cores):
        ingress = await start_ingress(unit="ua")
        await _until(lambda: len(ingress.units.live()) == 2, timeout=5.0)
        base = f"http://127.0.0.1:{ingress.port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as api:
            answer = await api.completions.create(model=model_id(ingress), prompt="Hi")
            assert answer.usage is not None and answer.usage.completion_tokens > 0
            assert [len(units[u].submits) for u in ("ua", "ub")] == [1, 1]
            assert units["ua"].submits[0].request_id == units["ub"].submits[0].request_id
            units["ub"].script = replace(units["ub"].script, refuse=busy)
            with pytest.raises(openai.RateLimitError):
                await api.completions.create(model=model_id(ingress), prompt="Hi")
            assert [len(units[u].submits) for u in ("ua", "ub")] == [2, 2]  # each once


async def test_a_request_whose_unit_dies_goes_on_in_another_unit(
    start_ingress: StartIngress, bus: Bus, text_ids: tuple[int, ...]
) -> None:
    """Its unit streams two tokens and dies (its scheduler silent, its card no longer
    written); once the card is stale the request is submitted to the live unit with the two
    tokens its client has, and the client gets the whole answer, each token once."""
    dying = ScriptedScheduler(bus, Script(text_ids[:2], finish=None), unit="ua")
    alive = ScriptedScheduler(bus, Script(text_ids), unit="ub")
    cores = {"ua": FakeCore(0, 0, 4), "ub": FakeCore(9, 4, 4)}  # ua looks idlest
    async with units_on_the_bus(bus, {"ua": dying, "ub": alive}, cores) as writers:
        ingress = await start_ingress(unit="ua", stream_quiet_s=0.3, stream_unreachable_s=30)
        await _until(lambda: len(ingress.units.live()) == 2, timeout=5.0)
        ingress.units.stale_s = 1.0
        base = f"http://127.0.0.1:{ingress.port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as api:
            request = asyncio.create_task(
                api.completions.create(model=model_id(ingress), prompt="Hi", max_tokens=64)
            )
            await _until(partial(_count_at_least, dying.submits, 1))
            await asyncio.sleep(0.3)  # its two tokens reach the client
            dying.stop()
            dying.knows = None  # no answer to status queries: its scheduler is gone
            writers["ua"].cancel()
            started = time.monotonic()
            answer = await asyncio.wait_for(request, 15)
        assert time.monotonic() - started < 8.0
        assert answer.choices[0].finish_reason == "length"
        [moved] = alive.submits
        assert moved.request_id == dying.submits[0].request_id
        assert moved.output_token_ids == text_ids[:2]  # what its client had
        assert answer.usage is not None and answer.usage.completion_tokens == len(text_ids)


def _count_at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_models_and_metrics(
    ingress: IngressService,
    client: openai.AsyncOpenAI,
    http: aiohttp.ClientSession,
    scheduler: ScriptedScheduler,
) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [model_id(ingress)]
    assert models.data[0].owned_by == "duet"
    async with http.get("/v1/models") as response:
        assert (await response.json())["data"][0]["max_model_len"] == CONTEXT_LEN

    before = _ttft_count(await _metrics(http))
    await client.completions.create(model=model_id(ingress), prompt="Hi")
    text = await _metrics(http)
    assert _ttft_count(text) == before + 1
    assert 'duet_ingress_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "duet_ingress_requests_in_flight 0.0" in text


async def test_usage_and_metrics_say_whether_each_request_met_its_slo(
    ingress: IngressService,
    client: openai.AsyncOpenAI,
    http: aiohttp.ClientSession,
    scheduler: ScriptedScheduler,
) -> None:
    # ~20 tokens, 30 ms apart: TPOT ~30 ms, the whole answer > 0.5 s.
    scheduler.script = replace(scheduler.script, delay_s=0.03)
    slos = {
        "loose": {"kind": "latency", "ttft_ms": 60_000, "tpot_ms": 10_000},
        "tpot": {"kind": "latency", "ttft_ms": 60_000, "tpot_ms": 5},
        "deadline_met": {"kind": "deadline", "deadline_ms": 60_000},
        "deadline_missed": {"kind": "deadline", "deadline_ms": 100},
    }

    async def slo_of(slo: dict[str, Any] | None) -> dict[str, Any]:
        extra = {} if slo is None else {"duet": {"slo": slo}}
        completion = await client.completions.create(
            model=model_id(ingress), prompt="Hi", extra_body=extra
        )
        assert completion.usage is not None and completion.usage.model_extra is not None
        return completion.usage.model_extra["duet"]["slo"]

    async def group(name: str, deadline_ms: float) -> list[dict[str, Any]]:
        slo = {"kind": "compound", "group": name, "group_size": 2, "deadline_ms": deadline_ms}
        return list(await asyncio.gather(slo_of(slo), slo_of(slo)))

    before = await _metrics(http)
    outcomes = await asyncio.gather(*(slo_of(slo) for slo in slos.values()), slo_of(None))
    judged = dict(zip([*slos, "default"], outcomes, strict=True))
    assert judged["loose"] == {"kind": "latency", "met": True, "default": False}
    assert judged["tpot"] == {"kind": "latency", "met": False, "default": False}
    assert judged["deadline_met"] == {"kind": "deadline", "met": True, "default": False}
    assert judged["deadline_missed"] == {"kind": "deadline", "met": False, "default": False}
    assert judged["default"]["kind"] == "latency" and judged["default"]["default"] is True
    # A compound member counts from its group's first arrival; the group when its last is done.
    assert [o["met"] for o in await group("fast", 60_000)] == [True, True]
    assert [o["met"] for o in await group("slow", 300)] == [False, False]
    # The scheduler hears how long before each member its group began (its deadline's start).
    lagged = {"kind": "compound", "group": "lagged", "group_size": 2, "deadline_ms": 60_000}
    first = asyncio.ensure_future(slo_of(lagged))
    await asyncio.sleep(0.3)
    await asyncio.gather(first, slo_of(lagged))
    ages = [s.group_age_s for s in scheduler.submits if s.slo and s.slo.group == "lagged"]
    assert ages[0] == 0.0 and 0.3 <= ages[1] < 5.0, ages

    after = await _metrics(http)
    counted = {
        ("latency", "met"): 1 + judged["default"]["met"],
        ("latency", "missed"): 1 + (not judged["default"]["met"]),
        ("deadline", "met"): 1,
        ("deadline", "missed"): 1,
        ("compound", "met"): 4,
        ("compound", "missed"): 2,
    }
    for (kind, result), count in counted.items():
        name = f'duet_ingress_slo_requests_total{{kind="{kind}",result="{result}"}}'
        assert _sample(after, name) - _sample(before, name) == count, name
    for result, groups in (("met", 2), ("missed", 1)):
        name = f'duet_ingress_slo_groups_total{{result="{result}"}}'
        assert _sample(after, name) - _sample(before, name) == groups, name

    # A stream says it in its last chunk with a choice, and in its usage chunk.
    stream = await client.chat.completions.create(
        model=model_id(ingress),
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"duet": {"slo": slos["tpot"]}},
    )
    chunks = [chunk async for chunk in stream]
    last_choice = next(c for c in reversed(chunks) if c.choices)
    assert last_choice.model_extra is not None
    assert last_choice.model_extra["duet"]["slo"]["met"] is False
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    assert usage.model_extra["duet"]["slo"] == judged["tpot"]


async def test_vllm_named_metrics_count_tokens_gaps_finishes_and_aborts(
    ingress: IngressService, http: aiohttp.ClientSession, scheduler: ScriptedScheduler
) -> None:
    """Operators' dashboards read vLLM's names: each inter-token gap is shared by the tokens
    that arrived at its end; an answer counts by its finish reason, a client gone as aborted."""
    scheduler.script = replace(scheduler.script, chunk_size=2, out_of_order=False, delay_s=0.02)
    tokens = len(scheduler.script.token_ids)
    assert tokens >= 4
    label = f'{{model_name="{model_id(ingress)}"}}'

    def success(reason: str) -> str:
        return f'vllm:request_success_total{{finished_reason="{reason}",model_name="{model}"}}'

    model = model_id(ingress)
    before = await _metrics(http)
    body = {"model": model_id(ingress), "prompt": "Hi", "max_tokens": 64}
    status, answer = await post(http, "/v1/completions", body)
    assert status == 200
    after = await _metrics(http)

    def delta(name: str) -> float:
        return _sample(after, name) - _sample(before, name)

    usage = answer["usage"]
    assert usage["completion_tokens"] == tokens
    # Chunks of two: every token after the first chunk follows a gap.
    assert delta(f"vllm:inter_token_latency_seconds_count{label}") == tokens - 2
    gaps = delta(f"vllm:inter_token_latency_seconds_sum{label}")
    assert 0.02 * (tokens // 2 - 1) * 0.9 <= gaps < 5.0
    assert delta(f"vllm:prompt_tokens_total{label}") == usage["prompt_tokens"]
    assert delta(f"vllm:generation_tokens_total{label}") == tokens
    assert delta(f"vllm:prefix_cache_hits_total{label}") == scheduler.script.cached_tokens
    assert delta(f"vllm:time_to_first_token_seconds_count{label}") == 1
    assert delta(success("length")) == 1 and delta(success("abort")) == 0

    # A client that goes away before the end: aborted, and nothing else counted for it.
    scheduler.script = replace(scheduler.script, finish=None)
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            "/v1/completions", data=json.dumps(body), timeout=aiohttp.ClientTimeout(total=0.3)
        )
    await scheduler.next_cancel()
    await _until(lambda: ingress.admission.in_flight == 0)
    before, after = after, await _metrics(http)
    assert delta(success("abort")) == 1 and delta(success("length")) == 0
    assert delta(f"vllm:e2e_request_latency_seconds_count{label}") == 0


def _sample(text: str, name: str) -> float:
    """A sample's value in a /metrics page; 0 when absent (a counter not yet incremented)."""
    line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
    return 0.0 if line is None else float(line.split()[-1])


async def _metrics(http: aiohttp.ClientSession) -> str:
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


def _ttft_count(text: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith("duet_ingress_ttft_seconds_count"))
    return float(line.split()[-1])


async def test_health_aggregates_the_required_services(
    start_ingress: StartIngress, bus: Bus
) -> None:
    # A timeout far beyond the server's instant "no responders" answer, so a busy machine
    # cannot turn that answer into a timeout.
    ingress = await start_ingress(health_services="scheduler,kv_manager", health_timeout_s=5.0)
    ready = lambda: HealthStatus.READY  # noqa: E731
    await serve_health(bus, "scheduler", "scheduler-0", ready)
    kv_manager = await serve_health(bus, "kv_manager", "kv-0", ready)
    await bus.flush()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{ingress.port}") as http:
        # Asked until the answer settles: on a loaded machine the suite's shared nats-server
        # has been seen to answer "no responders" just after a subscription was flushed.
        status, body = await _health_until(http, lambda status, _: status == 200)
        assert status == 200, body
        assert set(body["services"]) == {"ingress", "scheduler", "kv_manager"}
        assert body["services"]["scheduler"] == {"status": "ready", "instance": "scheduler-0"}
        await kv_manager.unsubscribe()
        await bus.flush()
        status, body = await _health_until(http, lambda status, _: status == 503)
        assert status == 503, body
        unreachable = {"status": "unreachable", "detail": "no responders"}
        assert body["services"]["kv_manager"] == unreachable
        assert body["services"]["scheduler"]["status"] == "ready"


async def _health_until(
    http: aiohttp.ClientSession, settled: Callable[[int, Any], bool], timeout: float = 10.0
) -> tuple[int, Any]:
    """/health's status and body, asked again until `settled` (or `timeout` has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get("/health") as response:
            status, body = response.status, await response.json()
        if settled(status, body) or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(0.1)


async def test_drain_refuses_new_requests_and_waits_for_running_ones(
    ingress: IngressService, client: openai.AsyncOpenAI, scheduler: ScriptedScheduler
) -> None:
    scheduler.script = replace(scheduler.script, delay_s=0.01)
    running = asyncio.create_task(client.completions.create(model=model_id(ingress), prompt="Hi"))
    await _until(lambda: ingress.admission.in_flight == 1)
    drain = asyncio.create_task(ingress.drain())
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model=model_id(ingress), prompt="Hi")
    assert info.value.status_code == 503
    assert not drain.done()
    assert (await running).choices[0].text == TEXT
    await asyncio.wait_for(drain, 3.0)


async def test_requests_still_running_at_the_drain_deadline_end_as_shutting_down(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    ingress = await start_ingress(drain_timeout_s=1.0)
    scheduler.script = replace(scheduler.script, finish=None)  # tokens, then never an end
    base = f"http://127.0.0.1:{ingress.port}/v1"
    client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10)
    model = model_id(ingress)
    whole = asyncio.create_task(client.completions.create(model=model, prompt="Hi"))

    async def streamed() -> list[str]:
        events = []
        async with aiohttp.ClientSession() as http:
            body = {"model": model, "prompt": "Hi", "stream": True}
            async with http.post(f"{base}/completions", json=body) as response:
                async for line in response.content:
                    events.append(line.decode().strip())
        return [e for e in events if e]

    stream = asyncio.create_task(streamed())
    await _until(lambda: ingress.admission.in_flight == 2)
    started = time.monotonic()
    await asyncio.wait_for(ingress.drain(), 3.0)  # returns: nothing waits for ever
    assert 0.7 < time.monotonic() - started < 2.0  # patience (0.8 of the drain time), then ended
    with pytest.raises(openai.InternalServerError) as info:
        await whole
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "shutting_down"
    events = await stream
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    assert any('"text"' in e for e in events[:-2])  # it had streamed tokens before the end
    cancelled = {(await scheduler.next_cancel()).request_id for _ in range(2)}
    assert cancelled == {s.request_id for s in scheduler.submits[-2:]}  # freed at the scheduler
    await client.close()


async def test_one_request_is_one_trace_from_http_to_the_scheduler(
    ingress: IngressService, client: openai.AsyncOpenAI, scheduler: ScriptedScheduler
) -> None:
    exporter = InMemorySpanExporter()
    setup_tracing("ingress", CommonSettings(), span_processor=SimpleSpanProcessor(exporter))
    try:
        completion = await client.completions.create(model=model_id(ingress), prompt="Hi")
        chat = await client.chat.completions.create(
            model=model_id(ingress), messages=[{"role": "user", "content": "Hi"}]
        )
    finally:
        shutdown_tracing()
    [chat_span] = [
        s for s in exporter.get_finished_spans() if s.name == "POST /v1/chat/completions"
    ]
    assert chat_span.attributes is not None
    assert chat_span.attributes["gen_ai.operation.name"] == "chat"
    assert chat_span.attributes["gen_ai.response.id"] == chat.id
    [span] = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/completions"]
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    # The GenAI semantic conventions, as the response itself tells them.
    assert span.attributes["gen_ai.operation.name"] == "text_completion"
    assert span.attributes["gen_ai.request.model"] == model_id(ingress)
    assert span.attributes["gen_ai.request.max_tokens"] == 16
    assert span.attributes["gen_ai.response.id"] == completion.id
    assert completion.usage is not None
    assert span.attributes["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert span.attributes["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
    ttft = span.attributes["gen_ai.server.time_to_first_token"]
    assert span.end_time is not None and span.start_time is not None
    assert isinstance(ttft, float) and 0 < ttft < (span.end_time - span.start_time) / 1e9
    traceparent = scheduler.traceparents[-2]  # the completion's submit (the chat's is last)
    assert traceparent is not None
    assert traceparent.split("-")[1] == format_trace_id(span.context.trace_id)


async def test_a_request_the_scheduler_no_longer_knows_is_resubmitted_then_ends_as_lost(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    """A scheduler that restarted knows nothing of the requests its predecessor accepted. Each
    is submitted again, from the output its client has and with the seed ingress drew; one
    that stays unknown after 3 resubmissions ends with a 503 `request_lost` (and a cancel goes
    out, in case), never a wait for ever."""
    ingress = await start_ingress(stream_quiet_s=0.2)
    scheduler.script = replace(scheduler.script, token_ids=scheduler.script.token_ids[:2])
    scheduler.script = replace(scheduler.script, finish=None)  # two tokens, then silence
    scheduler.knows = False
    base = f"http://127.0.0.1:{ingress.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10) as api:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            await api.completions.create(model=model_id(ingress), prompt="Hi")
    assert time.monotonic() - started < 6.0
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "request_lost"
    assert "does not know it, resubmitted 3 times" in info.value.body["message"]
    first, *again = scheduler.submits[-4:]
    assert first.output_token_ids == () and first.sampling.seed is not None
    assert [s.request_id for s in again] == [first.request_id] * 3
    assert all(s.output_token_ids == scheduler.script.token_ids for s in again)
    assert all(s.sampling == first.sampling for s in again)  # the same seed: the same draws
    assert (await scheduler.next_cancel()).request_id == first.request_id


async def test_a_quiet_request_the_scheduler_still_runs_waits_on(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    ingress = await start_ingress(stream_quiet_s=0.2)
    scheduler.script = replace(scheduler.script, finish=None)
    base = f"http://127.0.0.1:{ingress.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10) as api:
        request = asyncio.create_task(api.completions.create(model=model_id(ingress), prompt="Hi"))
        await asyncio.sleep(1.5)  # several rounds of the watch
        assert not request.done()
        assert len(scheduler.status_queries) >= 3  # it was asked after, and is still waited on
        request.cancel()
    assert (await scheduler.next_cancel()).request_id == scheduler.submits[-1].request_id


async def test_a_request_whose_scheduler_never_answers_ends_as_lost(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    ingress = await start_ingress(stream_quiet_s=0.2, stream_unreachable_s=1.0)
    scheduler.script = replace(scheduler.script, finish=None)
    scheduler.knows = None
    base = f"http://127.0.0.1:{ingress.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10) as api:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            await api.completions.create(model=model_id(ingress), prompt="Hi")
    assert 1.0 < time.monotonic() - started < 4.0
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "request_lost"
    assert "no scheduler has answered" in info.value.body["message"]


async def test_a_batch_lost_mid_stream_is_asked_for_again(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    """Core NATS delivers at most once: a token batch lost on its way leaves a hole. The next
    batch's number (and the hole in the indexes) give it away, ingress asks the producers
    again, and the stream goes on with nothing missing, long before the quiet-stream watch
    (30 s here) would have looked."""
    ingress = await start_ingress(stream_quiet_s=30.0)
    scheduler.script = replace(scheduler.script, out_of_order=False, lose=frozenset({2, 5}))
    base = f"http://127.0.0.1:{ingress.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10) as api:
        completion = await asyncio.wait_for(
            api.completions.create(model=model_id(ingress), prompt="Hi"), 5.0
        )
    assert completion.choices[0].text == TEXT
    assert scheduler.outbox.publish_failures == 2  # both were lost, and both came back
    assert scheduler.outbox.replays_answered >= 1
    assert len(scheduler.submits) == 1  # not resubmitted: replayed


async def test_a_lost_last_batch_comes_back_when_the_stream_is_found_quiet(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    """The batch with a stream's end is lost and nothing follows it: no hole shows. The watch
    finds the stream quiet and asks the producers again; the stream ends as it would have,
    without resubmitting the request."""
    ingress = await start_ingress(stream_quiet_s=0.3)
    last = len(scheduler.script.chunks("r")) - 1
    scheduler.script = replace(scheduler.script, out_of_order=False, lose=frozenset({last}))
    base = f"http://127.0.0.1:{ingress.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10) as api:
        completion = await asyncio.wait_for(
            api.completions.create(model=model_id(ingress), prompt="Hi"), 5.0
        )
    assert completion.choices[0].text == TEXT
    assert completion.choices[0].finish_reason == "length"
    assert len(scheduler.submits) == 1
    metrics = ingress.metrics.render().decode()
    assert 'duet_ingress_token_replays_total{cause="quiet"} 1.0' in metrics


async def test_a_tenant_over_its_quota_gets_a_429_with_retry_after(
    start_ingress: StartIngress, scheduler: ScriptedScheduler
) -> None:
    ingress = await start_ingress(api_keys="sk-q:acme max_in_flight=1, sk-o:other")
    scheduler.script = replace(scheduler.script, finish=None)  # runs until cancelled
    base = f"http://127.0.0.1:{ingress.port}/v1"
    model = model_id(ingress)
    async with (
        openai.AsyncOpenAI(base_url=base, api_key="sk-q", max_retries=0, timeout=10) as acme,
        openai.AsyncOpenAI(base_url=base, api_key="sk-o", max_retries=0, timeout=10) as other,
    ):
        running = asyncio.create_task(acme.completions.create(model=model, prompt="Hi"))
        await _until(lambda: len(scheduler.submits) == 1)
        with pytest.raises(openai.RateLimitError) as info:
            await acme.completions.create(model=model, prompt="Hi")
        assert info.value.response.headers["Retry-After"] == "1"
        assert isinstance(info.value.body, dict)
        assert info.value.body["code"] == "rate_limit_exceeded"
        assert "1 requests in flight" in info.value.body["message"]
        assert len(scheduler.submits) == 1  # refused at ingress: the scheduler never saw it
        another = asyncio.create_task(other.completions.create(model=model, prompt="Hi"))
        await _until(lambda: len(scheduler.submits) == 2)  # another tenant is not held back
        running.cancel()
        await scheduler.next_cancel()
        again = asyncio.create_task(acme.completions.create(model=model, prompt="Hi"))
        await _until(lambda: len(scheduler.submits) == 3)  # its place came back
        for task in (another, again):
            task.cancel()
    metrics = ingress.metrics.render().decode()
    assert 'duet_ingress_quota_refusals_total{limit="requests",tenant="acme"} 1.0' in metrics


async def test_tokenizing_a_huge_prompt_does_not_stop_the_event_loop(
    ingress: IngressService,
    http: aiohttp.ClientSession,
    scheduler: ScriptedScheduler,
    tokenizer: Tokenizer,
) -> None:
    """Ingress serves every client from one event loop: a prompt that takes a second to
    tokenize must not hold the others up for that second."""
    text = TEXT * 60_000  # about 2 MB
    started = time.perf_counter()
    await asyncio.to_thread(tokenizer.encode, text)
    tokenizing_s = time.perf_counter() - started
    body = json.dumps({"model": model_id(ingress), "prompt": text})
    ticks = [time.perf_counter()]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.005)
            ticks.append(time.perf_counter())

    ticker = asyncio.create_task(tick())
    try:
        async with http.post("/v1/completions", data=body) as response:
            answer = await response.json()
    finally:
        ticks.append(time.perf_counter())  # the gap still open counts too
        ticker.cancel()
    longest_stop = max(b - a for a, b in itertools.pairwise(ticks))
    assert response.status == 400, answer  # far past the context: tokenized, then refused
    assert answer["error"]["code"] == "context_length_exceeded"
    assert tokenizing_s > 0.2, tokenizing_s  # long enough to matter
    assert longest_stop < tokenizing_s / 2, (longest_stop, tokenizing_s)
