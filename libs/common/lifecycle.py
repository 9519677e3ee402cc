"""The one lifecycle of every Duet service, after NVIDIA Dynamo's graceful shutdown.

A service is started, serves until SIGTERM or SIGINT, then is drained and stopped:

    start (start_timeout_s) -> ready -> wait for a signal -> drain (drain_timeout_s)
                                                           -> stop (stop_timeout_s)

Each step runs under its own timeout. A step that raises or overruns is logged and cut off,
and the steps after it still run: a drain that hangs does not keep `stop` from releasing
resources. The exit code is 0 when every step succeeded and 1 otherwise (a start that failed,
timed out or was interrupted by a signal; a drain or stop that failed or timed out).

Once a service process is ready, the objects it started with (a model, a tokenizer, the
imported modules) are frozen out of the garbage collector's sight (`settle_heap`), as vLLM's
engine does: a full collection would otherwise walk them all, about 100 ms on a model worker's
heap of ~230k objects, stalling whatever step or stream it lands in.

A service's `__main__` is three lines: settings, service, run:

    settings = SchedulerSettings()
    raise SystemExit(run_service(SchedulerService(settings), settings, "scheduler"))
"""

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import uvloop

from duetserve.common.logs import setup_logging
from duetserve.common.processes import die_with
from duetserve.common.settings import CommonSettings
from duetserve.common.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

_READY_POLL_S = 0.05
# How long a step that was cut off gets to unwind after it is cancelled.
_CANCEL_GRACE_S = 1.0


class Service(Protocol):
    """What `run_service` drives. Construct it without touching the event loop.

    - `start`: connect, subscribe, load; return once the service can begin serving.
    - `ready`: whether it serves now (also what a health check reports).
    - `drain`: stop taking new work and finish (or hand off) the work in flight.
    - `stop`: release everything. Runs even after a failed start or drain, may run twice,
      and must tolerate resources that were never acquired.
    """

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def drain(self) -> None: ...

    async def stop(self) -> None: ...


def run_service(service: Service, settings: CommonSettings, name: str) -> int:
    """Run `service` under uvloop from start to stop; returns the process exit code."""
    if settings.parent_pid is not None:
        die_with(settings.parent_pid)  # never outlive the process that started this one
    setup_logging(name, settings.log_level, settings.log_format)
    setup_tracing(name, settings)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(serve(service, settings, name, settle_heap_when_ready=True))
    finally:
        shutdown_tracing()
    return _exit_past_stuck_threads(code)


def _exit_past_stuck_threads(code: int) -> int:
    """`code`, or, when a thread the service started is still running after its stop (a
    model thread spinning in a kernel that never returns), exit now without it: the
    interpreter would join it at exit, and the process would never end."""
    stuck = [
        thread.name
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and thread.is_alive() and not thread.daemon
    ]
    if not stuck:
        return code
    logger.error("threads still running at exit", extra={"threads": stuck})
    logging.shutdown()
    os._exit(code or 1)


async def serve(
    service: Service,
    settings: CommonSettings,
    name: str,
    stop_requested: asyncio.Event | None = None,
    *,
    handle_signals: bool = True,
    settle_heap_when_ready: bool = False,
) -> int:
    """The lifecycle inside a running loop; returns the exit code.

    It ends when `stop_requested` is set: by SIGTERM or SIGINT (while `handle_signals`), or
    by whoever passed it in (tests, or a service that decides to stop itself).
    `settle_heap_when_ready`: freeze the start-up heap (`settle_heap`); a process that runs
    one service does, tests that run many in one process do not.
    """
    stop_requested = stop_requested or asyncio.Event()
    context = {"instance": settings.instance_name(name)}
    signals = _stop_on_signals(stop_requested) if handle_signals else contextlib.nullcontext()
    with signals:
        started = await run_step(
            "start",
            lambda: _start_until_ready(service),
            settings.start_timeout_s,
            interrupt=stop_requested,
        )
        drained = False
        if started:
            if settle_heap_when_ready:
                settle_heap()
            logger.info("ready", extra=context)
            await stop_requested.wait()
            logger.info("stopping", extra=context)
            drained = await run_step("drain", service.drain, settings.drain_timeout_s)
        stopped = await run_step("stop", service.stop, settings.stop_timeout_s)
    code = 0 if started and drained and stopped and not _crashed_tasks else 1
    logger.info("exiting", extra={**context, "exit_code": code})
    return code


def settle_heap() -> None:
    """Collect what start-up left behind, then move every object alive now out of the
    collector's generations for good (gc.freeze): later full collections walk only what was
    made since. Objects made from here on are collected as usual; what is frozen is never
    freed, so call it once, when the long-lived state is built."""
    gc.collect()
    gc.freeze()


async def _start_until_ready(service: Service) -> None:
    """Start the service, then wait until it says it is ready."""
    await service.start()
    while not await service.ready():
        await asyncio.sleep(_READY_POLL_S)


async def run_step(
    name: str,
    step: Callable[[], Awaitable[None]],
    timeout_s: float,
    interrupt: asyncio.Event | None = None,
) -> bool:
    """Run one lifecycle step; True if it finished in time without raising.

    A step that overruns `timeout_s`, or is still running when `interrupt` is set, is
    cancelled and given a short grace to unwind; it is never waited on beyond that.
    """
    task = asyncio.ensure_future(step())
    waiters: set[asyncio.Future[Any]] = {task}
    interrupt_waiter = asyncio.ensure_future(interrupt.wait()) if interrupt else None
    if interrupt_waiter is not None:
        waiters.add(interrupt_waiter)
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        if interrupt_waiter is not None:
            interrupt_waiter.cancel()
    if task.done():
        return _step_outcome(name, task)
    task.cancel()
    await asyncio.wait({task}, timeout=_CANCEL_GRACE_S)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved, so asyncio does not warn about it
    reason = "interrupted" if interrupt is not None and interrupt.is_set() else "timed out"
    logger.error(f"{name} {reason}", extra={"step": name, "timeout_s": timeout_s})
    return False


def _step_outcome(name: str, task: "asyncio.Future[None]") -> bool:
    """Log how a finished step ended; True if it succeeded."""
    if task.cancelled():
        logger.error(f"{name} was cancelled", extra={"step": name})
        return False
    exc = task.exception()
    if exc is not None:
        logger.error(f"{name} failed", extra={"step": name}, exc_info=exc)
        return False
    logger.info(f"{name} done", extra={"step": name})
    return True


@contextlib.contextmanager
def _stop_on_signals(stop_requested: asyncio.Event) -> Iterator[None]:
    """Set `stop_requested` on SIGTERM or SIGINT while inside the block."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, _on_signal, signum, stop_requested)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _on_signal(signum: int, stop_requested: asyncio.Event) -> None:
    logger.info("signal received", extra={"signal": signal.Signals(signum).name})
    stop_requested.set()


def critical_task(coro: Awaitable[None], name: str) -> "asyncio.Task[None]":
    """A background task the service cannot live without (a step loop, a heartbeat): if it
    ever ends with an exception, that is logged and the process is asked to stop (SIGTERM),
    so it drains and exits non-zero and its supervisor restarts it, instead of lingering
    half-alive with requests that never finish."""

    async def run() -> None:
        await coro

    task = asyncio.get_running_loop().create_task(run(), name=name)
    task.add_done_callback(_stop_on_crash)
    return task


_crashed_tasks: list[str] = []  # a crash makes the exit code 1 however clean the stop


def _stop_on_crash(task: "asyncio.Task[None]") -> None:
    if task.cancelled() or task.exception() is None:
        return
    _crashed_tasks.append(task.get_name())
    logger.critical(
        "background task crashed; stopping",
        exc_info=task.exception(),
        extra={"task": task.get_name()},
    )
    os.kill(os.getpid(), signal.SIGTERM)


async def cancel_tasks(tasks: "list[asyncio.Task[None]]") -> None:
    """Cancel background tasks and wait until each has unwound (safe to call twice)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
