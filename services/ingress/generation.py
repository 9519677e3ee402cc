"""One generation over the bus: open its token stream, submit it, read its pieces, cancel it.

    generation = Generation(context, request_id, tenant, prepared, Arrival.now())
    try:
        await generation.start()          # submits (ApiError if refused)
        piece = await generation.next_piece()   # ... until piece.finish_reason
    finally:
        await generation.close()          # unfinished: CancelRequest(CLIENT_GONE); stream closed

A stop string ends the output at ingress: next_piece tells the scheduler (CancelRequest with
STOP_STRING) and returns the last piece with finish_reason "stop".
"""

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import Gauge

from duetserve.common.lengths import LengthPredictor
from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout
from duetserve.proto import codec, subjects
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import (
    CancelReason,
    CancelRequest,
    ResumeRequest,
    SloKind,
    SubmitAccepted,
    SubmitRequest,
)
from duetserve.proto.tokens import FinishReason, TokenChunk
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.ingress.attainment import CompoundGroups, SloOutcome, latency_met
from duetserve.services.ingress.errors import ApiError
from duetserve.services.ingress.metrics import IngressMetrics, RequestTiming
from duetserve.services.ingress.output import OutputAssembler, Piece
from duetserve.services.ingress.prompts import PreparedPrompt
from duetserve.services.ingress.responses import Usage
from duetserve.services.ingress.streams import StreamRouter, TokenStream
from duetserve.services.ingress.units import UnitDirectory

logger = logging.getLogger(__name__)

# Scheduler refusals that are the request's fault (400); "overloaded" is a 429; any other code
# is a 503. Every 429 and 503 says when to come back (Retry-After).
_CLIENT_ERROR_CODES = frozenset({"context_length_exceeded", "prompt_too_long"})


class GenerationFailed(Exception):
    """The scheduler or a worker reported an ERROR chunk (or ingress ended the generation);
    the message says why, and `code` is OpenAI's error code where there is one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


SHUTTING_DOWN = "shutting_down"
OVERLOADED = "overloaded"  # the scheduler could not start it within its SLO
REQUEST_LOST = "request_lost"  # the scheduler no longer runs it, or cannot be reached


@dataclass(frozen=True, slots=True)
class GenerationContext:
    """What every generation of one ingress shares."""

    bus: Bus
    router: StreamRouter  # the ingress's token streams
    tokenizer: Tokenizer
    metrics: IngressMetrics
    submit_timeout_s: float
    groups: CompoundGroups  # the compound SLO groups this ingress has seen
    lengths: LengthPredictor | None  # output-length bounds (None: DUET_PREDICT_LENGTHS=false)
    unit: str = "unit0"  # whose scheduler runs the requests when the registry names none
    units: UnitDirectory | None = None  # the live units, to choose one per request


@dataclass(frozen=True, slots=True)
class Arrival:
    """When a request reached ingress: wall clock for the scheduler, monotonic for latencies."""

    time: float
    monotonic: float

    @classmethod
    def now(cls) -> "Arrival":
        return cls(time.time(), time.monotonic())


class Generation:
    def __init__(
        self,
        context: GenerationContext,
        request_id: str,
        tenant: str,
        prompt: PreparedPrompt,
        arrival: Arrival,
    ) -> None:
        self.request_id = request_id
        self.tenant = tenant
        # The unit whose scheduler runs it, chosen now (units.py) and kept for its life.
        self.unit = context.unit
        if context.units is not None:
            self.unit = context.units.choose(tenant, prompt.prompt_ids, prompt.public_prefix_tokens)
        self.prompt = prompt
        self.cached_tokens = 0
        self.finished = False
        self._context = context
        self._stream = context.router.open(request_id)  # before the submit: no chunk is missed
        self._output = OutputAssembler(context.tokenizer, prompt.prompt_ids, prompt.stops)
        self._arrival = arrival
        self._first_token_at: float | None = None
        self._last_token_at = 0.0  # when output last arrived (inter-token latency)
        self._reported = False  # counted in /metrics as finished or aborted
        self._submitted = False
        self._failure_code: str | None = None  # why ingress itself ended it, if it did
        self.slo_outcome: SloOutcome | None = None  # set once it finished or failed
        self._group_first_s = arrival.monotonic  # a compound SLO counts from its group's first
        if prompt.slo.kind == SloKind.COMPOUND:
            context.metrics.observe_groups(0, context.groups.expire(arrival.monotonic))
            self._group_first_s = context.groups.arrive(tenant, prompt.slo, arrival.monotonic)
        self.unknown_strikes = 0  # status queries in a row that the scheduler did not know it
        self._token_ids: list[int] = []  # the output handed out so far, in order
        self.text_parts: list[str] = []  # the output text handed out so far
        self.finish_reason: str | None = None  # once it finished (not on a failure)
        self.migrations = 0  # times its worker was lost and it went on elsewhere
        self.resubmits = 0  # times its scheduler lost it and it was submitted again
        sampling = prompt.sampling
        if sampling.seed is None:  # drawn here, so a resubmission continues identically
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        self._submit = SubmitRequest(
            request_id=request_id,
            tenant=tenant,
            prompt_token_ids=prompt.prompt_ids,
            sampling=sampling,
            arrival_time=arrival.time,
            stream=context.router.stream,
            slo=prompt.slo,
            public_prefix_tokens=prompt.public_prefix_tokens,
            public_spans=prompt.public_spans,
            output_bound=prompt.output_bound,
            group_age_s=max(arrival.monotonic - self._group_first_s, 0.0),
        )

    @property
    def usage(self) -> Usage:
        prompt_tokens = len(self.prompt.prompt_ids)
        return Usage(prompt_tokens, self._output.num_tokens, self.cached_tokens, self.slo_outcome)

    async def start(self) -> None:
        """Submit; an ApiError if the scheduler refuses. A unit that refuses it for its load
        (429), or where no scheduler runs, is passed over for the next best live unit, each
        unit once; one that may have taken it (no answer in time) is not."""
        tried = {self.unit}
        while True:
            try:
                await self._submit_to_unit()
                return
            except ApiError as err:
                units = self._context.units
                if err.status not in (429, 503) or self._submitted or units is None:
                    raise
                prompt = self.prompt
                other = units.choose_other(
                    tried, self.tenant, prompt.prompt_ids, prompt.public_prefix_tokens
                )
                if other is None:
                    raise
                logger.info(
                    "unit %s refused (%s): offering to %s",
                    self.unit,
                    err.code,
                    other,
                    extra={"request_id": self.request_id},
                )
                tried.add(other)
                self.unit = other

    async def _submit_to_unit(self) -> None:
        submit = self._submit
        timeout = self._context.submit_timeout_s
        # From here the request may reach the scheduler: close() cancels it unless it finished
        # (a client gone during the submit, a reply that timed out but arrived after all).
        self._submitted = True
        try:
            reply = await self._context.bus.request(
                subjects.sched(self.unit, "submit"), codec.encode(submit), timeout=timeout
            )
        except BusNoResponders:
            self._submitted = False
            raise scheduler_unavailable("no scheduler is running") from None
        except BusTimeout:
            raise scheduler_unavailable(f"no answer within {timeout:g}s") from None
        try:
            self._check_accepted(reply.data)
        except ApiError:
            self._submitted = False  # refused: nothing runs there
            raise

    def _check_accepted(self, data: bytes) -> None:
        try:
            reply: SubmitAccepted | ErrorReply = codec.decode(data, SubmitAccepted, ErrorReply)
        except codec.ProtoError as err:
            logger.error("invalid reply to a submit", extra={"error": str(err)})
            raise ApiError(500, "Invalid reply from the scheduler.", "server_error") from None
        if isinstance(reply, ErrorReply):
            raise scheduler_refused(reply)
        if reply.request_id != self.request_id:
            raise ApiError(500, "The scheduler accepted another request.", "server_error")

    async def next_piece(self) -> Piece:
        """The next piece of output; GenerationFailed on an ERROR chunk."""
        chunk = await self._stream.next()
        while chunk.migrating:
            await self._resume()
            chunk = await self._stream.next()
        self._note_arrival(chunk)
        self._token_ids.extend(chunk.token_ids)
        if chunk.finish_reason == FinishReason.ERROR:
            # Ended by ingress itself (shut_down): still running at the scheduler, so close()
            # must cancel it; ended by the scheduler or a worker: nothing left to cancel.
            self.finished = self._failure_code is None
            self._judge(None, time.monotonic(), ok=False)
            self._report_aborted()
            raise GenerationFailed(chunk.error or "generation failed", self._failure_code)
        piece = self._output.add(chunk)
        self.text_parts.append(piece.text)
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
            self.finished = True
            self._observe()
            if piece.stopped_by_string:
                await self._cancel(CancelReason.STOP_STRING)
        return piece

    async def _resume(self) -> None:
        """Its worker was lost: tell the scheduler what the client has, to go on from there."""
        self.migrations += 1
        resume = ResumeRequest(self.request_id, tuple(self._token_ids))
        logger.warning(
            "worker lost; resuming",
            extra={"request_id": self.request_id, "from_token": len(self._token_ids)},
        )
        try:
            await self._context.bus.publish(
                subjects.sched(self.unit, "resume"), codec.encode(resume)
            )
        except Exception:  # the stream watch ends it if the scheduler never hears
            logger.warning("could not resume", extra={"request_id": self.request_id})

    def _note_arrival(self, chunk: TokenChunk) -> None:
        if chunk.cached_tokens is not None and chunk.index == 0:
            self.cached_tokens = chunk.cached_tokens
        if not chunk.token_ids:
            return
        now = time.monotonic()
        if self._first_token_at is None:
            self._first_token_at = now
        else:
            self._context.metrics.observe_token_gap(now - self._last_token_at, len(chunk.token_ids))
        self._last_token_at = now

    @property
    def ttft_s(self) -> float | None:
        """Seconds from arrival to its first output token (None before it came)."""
        first = self._first_token_at
        return None if first is None else first - self._arrival.monotonic

    def _report_aborted(self) -> None:
        if not self._reported:
            self._reported = True
            self._context.metrics.observe_aborted()

    def _observe(self) -> None:
        first = self._first_token_at
        now = time.monotonic()
        timing = RequestTiming(
            ttft_s=None if first is None else first - self._arrival.monotonic,
            e2e_s=now - self._arrival.monotonic,
            prompt_tokens=len(self.prompt.prompt_ids),
            completion_tokens=self._output.num_tokens,
            cached_tokens=self.cached_tokens,
            finish_reason=self.finish_reason or "stop",
            tenant=self.tenant,
        )
        self._reported = True
        self._context.metrics.observe_generation(timing)
        self._judge(timing, now, ok=True)

    def _judge(self, timing: RequestTiming | None, now: float, ok: bool) -> None:
        """Its SLO's verdict (attainment.py), into its usage and /metrics; once."""
        if self.slo_outcome is not None:
            return
        slo, context = self.prompt.slo, self._context
        if slo.kind == SloKind.COMPOUND:
            verdict = context.groups.finish(self.tenant, slo, self._group_first_s, now, ok)
            met = verdict.member_met
            if verdict.group_met is not None:
                context.metrics.observe_groups(int(verdict.group_met), int(not verdict.group_met))
            context.metrics.observe_groups(0, context.groups.expire(now))
        elif timing is None:
            met = False
        elif slo.kind == SloKind.DEADLINE:
            assert slo.deadline_ms is not None
            met = timing.e2e_s * 1000 <= slo.deadline_ms
        else:
            met = latency_met(slo, timing.ttft_s, timing.e2e_s, timing.completion_tokens)
        self.slo_outcome = SloOutcome(slo.kind, met and ok, slo.from_request)
        context.metrics.observe_slo(self.slo_outcome, self.tenant)

    def shut_down(self) -> None:
        """End the generation now with a `shutting_down` error (the drain's deadline came);
        `close()` then cancels it at the scheduler, as for a client that went away."""
        self._failure_code = SHUTTING_DOWN
        self._stream.interrupt("The server is shutting down; the request did not finish.")

    @property
    def waiting(self) -> bool:
        """Submitted, not finished, not ended by ingress: output is still owed to it."""
        return self._submitted and not self.finished and self._failure_code is None

    @property
    def stream(self) -> TokenStream:
        return self._stream

    @property
    def last_heard(self) -> float:
        """Monotonic time of its last token chunk (or of its submit)."""
        return self._stream.last_heard

    async def resubmit(self, unit: str | None = None) -> str | None:
        """Submit it again, to go on from the output its client has (its scheduler lost it:
        restarted, or its last tokens were lost on the bus after it finished), to its unit or
        to `unit` (its own died: it moves there for good). None once accepted; else why
        not."""
        done = len(self._token_ids)
        if unit is not None:
            self.unit = unit
        if done >= self._submit.sampling.max_tokens:  # only the last chunk was lost
            self._stream.end_here(done, FinishReason.LENGTH)
            return None
        submit = dataclasses.replace(self._submit, output_token_ids=tuple(self._token_ids))
        try:
            reply = await self._context.bus.request(
                subjects.sched(self.unit, "submit"),
                codec.encode(submit),
                timeout=self._context.submit_timeout_s,
            )
            self._check_accepted(reply.data)
        except (BusTimeout, ApiError) as err:
            return str(err)
        self.resubmits += 1
        logger.warning("resubmitted", extra={"request_id": self.request_id, "from_token": done})
        return None

    def lose(self, why: str) -> None:
        """End the generation now with a `request_lost` error: nothing runs it any more (see
        watch.py). `close()` still sends a cancel, in case it does after all."""
        self._failure_code = REQUEST_LOST
        self._stream.interrupt(why)

    async def close(self, reason: CancelReason = CancelReason.CLIENT_GONE) -> None:
        """Cancel a submitted request that did not finish (for `reason`), then close its
        stream. Safe twice. An answer from the semantic cache replaces it: not an abort."""
        if reason == CancelReason.ANSWERED_FROM_CACHE:
            self._reported = True  # counted as the hit it was served as
        elif self._submitted:
            self._report_aborted()  # nothing once it finished
        if self._submitted and not self.finished:
            self.finished = True
            await self._cancel(reason)
        self._context.router.close(self.request_id)

    async def _cancel(self, reason: CancelReason) -> None:
        cancel = codec.encode(CancelRequest(self.request_id, reason))
        try:
            await self._context.bus.publish(subjects.sched(self.unit, "cancel"), cancel)
        except Exception:  # the connection is gone; the scheduler's leases clean up
            logger.warning("could not cancel", extra={"request_id": self.request_id})
        else:
            logger.info("cancelled", extra={"request_id": self.request_id, "reason": reason})


def scheduler_unavailable(why: str) -> ApiError:
    return ApiError(
        503, f"The scheduler is unavailable: {why}.", "server_error", code="scheduler_unavailable"
    )


def scheduler_refused(reply: ErrorReply) -> ApiError:
    if reply.code.startswith("invalid") or reply.code in _CLIENT_ERROR_CODES:
        return ApiError(400, reply.message, code=reply.code)
    if reply.code == OVERLOADED:
        return ApiError(429, reply.message, "requests", None, OVERLOADED, reply.retry_after_s)
    return ApiError(503, reply.message, "server_error", None, reply.code, reply.retry_after_s)


class Admission:
    """Lets generation requests in until draining begins, and counts those in flight:

    with admission:   # a 503 ApiError while draining
        ...
    """

    def __init__(self, gauge: Gauge) -> None:
        self.accepting = True
        self._gauge = gauge
        self._in_flight = 0
        self._generations: set[Generation] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def generations(self) -> list["Generation"]:
        """The generations running now."""
        return list(self._generations)

    # A class-based context manager, not @contextlib.contextmanager: that one sets
    # __traceback__ on the exception leaving the block, which the frozen ApiError refuses.
    def __enter__(self) -> None:
        """Count one request until the block ends; a 503 once draining has begun."""
        if not self.accepting:
            raise ApiError(503, "The server is shutting down.", "server_error", code=SHUTTING_DOWN)
        self._in_flight += 1
        self._gauge.inc()
        self._idle.clear()

    def __exit__(self, *exc_info: object) -> None:
        self._in_flight -= 1
        self._gauge.dec()
        if self._in_flight == 0:
            self._idle.set()

    def stop_accepting(self) -> None:
        self.accepting = False

    @contextlib.contextmanager
    def running(self, generation: "Generation") -> Iterator[None]:
        """While the block runs, `shut_down_all` reaches `generation`."""
        self._generations.add(generation)
        try:
            yield
        finally:
            self._generations.discard(generation)

    def shut_down_all(self) -> int:
        """End every running generation with `shutting_down`; how many there were."""
        for generation in self._generations:
            generation.shut_down()
        return len(self._generations)

    async def wait_idle(self) -> None:
        await self._idle.wait()
