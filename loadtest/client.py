"""The live load generator: sends RequestSpecs to an OpenAI-compatible server at their arrival
times, streams every answer and records when each token came.

A run has three phases. Sending: each spec is launched at its `arrival_s`; it is sent once a
concurrency slot is free (when `max_concurrency` is set) and, for a turn of a multi-turn
conversation, once the conversation's previous turn has finished. Sending stops at the request
limit, at the duration limit, or when everything launched has been sent; specs not sent by then
are dropped and have no result. Draining: requests in flight get `drain_timeout_s` to finish.
Cancelling: those still running are cut off and recorded with an error."""

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from duetserve.loadtest.progress import Progress
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.loadtest.streaming import (
    ENDPOINT_PATHS,
    BodyOptions,
    Endpoint,
    request_body,
    stream_request,
)

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 600.0  # the longest silence within one stream
CANCELLED = "cancelled: still running when the run's drain timeout ran out"


@dataclass(frozen=True, slots=True)
class RunLimits:
    max_concurrency: int | None = None  # requests in flight at once; None: as arrivals come
    duration_limit_s: float | None = None  # stop sending this long after the start
    request_limit: int | None = None  # send at most this many (the earliest arrivals)
    drain_timeout_s: float = 60.0  # after sending stops, how long in-flight requests get


async def run_requests(
    base_url: str,
    model: str,
    specs: Sequence[RequestSpec],
    *,
    api_key: str | None = None,
    endpoint: Endpoint = "completions",
    max_concurrency: int | None = None,
    duration_limit_s: float | None = None,
    request_limit: int | None = None,
    drain_timeout_s: float = 60.0,
    force_length: bool = True,
    send_duet_slo: bool = True,
    progress: bool = True,
) -> list[RequestResult]:
    """Run `specs` against the server at `base_url` (`http://host:port/v1`); one result per
    request sent, ordered by spec index. Times are seconds since the run's start."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    limits = RunLimits(max_concurrency, duration_limit_s, request_limit, drain_timeout_s)
    body_options = BodyOptions(model, endpoint, force_length, send_duet_slo)
    todo = sorted(specs, key=lambda spec: spec.arrival_s)[:request_limit]
    url = base_url.rstrip("/") + ENDPOINT_PATHS[endpoint]
    async with open_session(api_key) as session:
        run = _Run(session, url, body_options, limits, Progress(len(todo), progress))
        results = await run.run(todo)
    return sorted(results, key=lambda result: result.spec.index)


def open_session(api_key: str | None) -> aiohttp.ClientSession:
    """No connection limit (aiohttp's default of 100 would cap concurrency silently), no
    overall timeout (a long answer is not an error), a bound on silence."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout, headers=headers
    )


async def fetch_model(base_url: str, api_key: str | None = None) -> str:
    """The first model the server lists at /models."""
    async with (
        open_session(api_key) as session,
        session.get(base_url.rstrip("/") + "/models") as response,
    ):
        response.raise_for_status()
        listing = await response.json()
    models = listing.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/models lists no model")
    return str(models[0]["id"])


class _Run:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body_options: BodyOptions,
        limits: RunLimits,
        progress: Progress,
    ) -> None:
        self.session, self.url, self.body_options = session, url, body_options
        self.limits, self.progress = limits, progress
        self.started = time.monotonic()
        self.slots = asyncio.Semaphore(limits.max_concurrency or 1)
        self.results: list[RequestResult] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.unsent: set[asyncio.Task[None]] = set()
        self.all_sent = asyncio.Event()
        self.last_turn: dict[str, asyncio.Event] = {}  # conversation -> its latest turn's end

    def clock(self) -> float:
        return time.monotonic() - self.started

    async def run(self, specs: Sequence[RequestSpec]) -> list[RequestResult]:
        self.started = time.monotonic()
        try:
            await self._launch(specs)
            await self._wait_until_sent()
            for task in self.unsent:  # the duration limit came first
                task.cancel()
            await self._drain()
        finally:  # also when the run itself is cancelled (Ctrl-C)
            for task in self.tasks:
                task.cancel()
            outcomes = await asyncio.gather(*self.tasks, return_exceptions=True)
            self.progress.close()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome  # a bug here, not the server's doing (that is result.error)
        return self.results

    async def _launch(self, specs: Sequence[RequestSpec]) -> None:
        for spec in specs:
            if not await self._sleep_until(spec.arrival_s):
                break
            previous_turn, own_turn = self._turn_events(spec)
            task = asyncio.create_task(self._one(spec, previous_turn, own_turn))
            self.all_sent.clear()
            self.unsent.add(task)
            self.tasks.append(task)
        if not self.unsent:
            self.all_sent.set()

    async def _sleep_until(self, at_s: float) -> bool:
        """Sleep until `at_s`; False (at once) when that is past the duration limit."""
        limit = self.limits.duration_limit_s
        if limit is not None and at_s > limit:
            await asyncio.sleep(max(0.0, limit - self.clock()))  # sending ends at the limit
            return False
        await asyncio.sleep(max(0.0, at_s - self.clock()))
        return True

    def _turn_events(self, spec: RequestSpec) -> tuple[asyncio.Event | None, asyncio.Event]:
        own = asyncio.Event()
        if spec.conversation is None:
            return None, own
        previous = self.last_turn.get(spec.conversation)
        self.last_turn[spec.conversation] = own
        return previous, own

    async def _one(
        self, spec: RequestSpec, previous_turn: asyncio.Event | None, own_turn: asyncio.Event
    ) -> None:
        try:
            if previous_turn is not None:
                await previous_turn.wait()
            async with self._slot():
                result = RequestResult(spec, sent_s=self.clock())
                self.results.append(result)
                self._mark_sent()
                self.progress.sent()
                try:
                    body = request_body(spec, self.body_options)
                    await stream_request(self.session, self.url, body, result, self.clock)
                finally:
                    self.progress.finished(failed=not result.ok)
        finally:
            own_turn.set()

    def _slot(self) -> contextlib.AbstractAsyncContextManager[object]:
        if self.limits.max_concurrency is None:
            return contextlib.nullcontext()
        return self.slots

    def _mark_sent(self) -> None:
        current = asyncio.current_task()
        if current is not None:
            self.unsent.discard(current)
        if not self.unsent:
            self.all_sent.set()

    async def _wait_until_sent(self) -> None:
        """Until every launched request is sent, or the duration limit."""
        limit = self.limits.duration_limit_s
        timeout = None if limit is None else max(0.0, limit - self.clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_sent.wait(), timeout)

    async def _drain(self) -> None:
        """In-flight requests get the drain timeout; those still running are cut off."""
        if not self.tasks:
            return
        _, still_running = await asyncio.wait(self.tasks, timeout=self.limits.drain_timeout_s)
        for task in still_running:
            task.cancel()
        await asyncio.wait(self.tasks)
        for result in self.results:
            if result.done_s is None and result.error is None:
                result.error = CANCELLED
