"""Every accepted request ends: the watch over quiet streams.

A request's tokens come from processes that may die, restart or lose NATS while it runs. A
stream that hears nothing for `quiet_s` is asked after, in two ways at once, each one message
naming every quiet request of this ingress (so a quiet server costs nothing and a busy one two
messages per period):

- the producers are asked to send again what the stream lacks (a ReplayQuery): a last chunk
  lost on the bus comes back this way, and the stream ends as it would have;
- the scheduler is asked whether it still runs the request (a RequestStatusQuery):

  - It still runs it (waiting in its queue, prefilling, decoding): it waits on.
    The scheduler fails what it runs with a reason of its own (a worker's lapsed lease, a
    prefill that timed out).
  - It does not know it, twice in a row (a replay, or a chunk on its way when the scheduler
    forgot a finished request, gets one period to arrive): the scheduler restarted, or the
    request's last tokens were lost and no producer holds them any more. It is submitted
    again, to go on from the output its client has (its seed, drawn at ingress, makes the
    rest identical); a request resubmitted MAX_RESUBMITS times, or refused, ends with a 503
    `request_lost`.
  - No scheduler answers, and the unit's card went stale (units.py: it died, or is cut off)
    while another unit is live: the requests move there, submitted again from the output
    their clients have, as above (a unit's death costs its requests a few seconds, not
    their answers).
  - No scheduler answers for `unreachable_s` (and no other unit takes them): those quiet
    since then end with a 503 `request_lost` too, saying so.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.proto import codec, subjects
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import RequestStatus, RequestStatusQuery
from duetserve.services.ingress.generation import Generation
from duetserve.services.ingress.streams import StreamRouter
from duetserve.services.ingress.units import UnitDirectory

logger = logging.getLogger(__name__)
UNKNOWN_STRIKES = 2  # "not known" answers in a row that make a request lost
MAX_RESUBMITS = 3


class StreamWatch:
    def __init__(
        self,
        bus: Bus,
        generations: Callable[[], list[Generation]],
        router: StreamRouter,
        *,
        quiet_s: float,
        unreachable_s: float,
        clock: Callable[[], float] = time.monotonic,
        units: UnitDirectory | None = None,
    ) -> None:
        """`generations`: the running ones (Admission.generations); `units`: the registry,
        to move the requests of a unit that died to a live one."""
        self.bus, self.generations, self.router, self.clock = bus, generations, router, clock
        self.units = units
        self.quiet_s, self.unreachable_s = quiet_s, unreachable_s
        self.period_s = quiet_s / 2
        self._unanswered_since: dict[str, float] = {}  # by unit: when its scheduler fell silent
        self.lost = 0  # requests ended as lost since the start

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.check()
            except Exception:  # the watch must outlive any one bad round
                logger.exception("stream watch round failed")

    async def check(self) -> None:
        """One round: ask after the quiet streams, end those that were lost."""
        now = self.clock()
        quiet = [g for g in self.generations() if g.waiting and now - g.last_heard >= self.quiet_s]
        if not quiet:
            self._unanswered_since.clear()
            return
        await self.router.replay([g.stream for g in quiet], "quiet")
        for unit in sorted({g.unit for g in quiet}):
            await self._check_unit(unit, [g for g in quiet if g.unit == unit], now)

    async def _check_unit(self, unit: str, quiet: list[Generation], now: float) -> None:
        status = await self._ask(unit, [g.request_id for g in quiet])
        if status is None and await self._move_elsewhere(unit, quiet):
            return
        if status is None:
            since = self._unanswered_since.setdefault(unit, now)
            if now - since < self.unreachable_s:
                return
            why = f"no scheduler has answered for {now - since:.0f}s"
            for generation in quiet:
                if now - generation.last_heard >= self.unreachable_s:
                    self._lose(generation, why)
            return
        self._unanswered_since.pop(unit, None)
        known = set(status.known)
        for generation in quiet:
            if generation.request_id in known:
                generation.unknown_strikes = 0
                continue
            generation.unknown_strikes += 1
            if generation.unknown_strikes < UNKNOWN_STRIKES:
                continue
            generation.unknown_strikes = 0
            why = f"the scheduler ({status.scheduler}) does not know it"
            if generation.resubmits >= MAX_RESUBMITS:
                self._lose(generation, f"{why}, resubmitted {MAX_RESUBMITS} times already")
                continue
            refused = await generation.resubmit()
            if refused is not None:
                self._lose(generation, f"{why}, and it could not be resubmitted: {refused}")

    async def _move_elsewhere(self, unit: str, quiet: list[Generation]) -> bool:
        """`unit` does not answer: if its card is stale and another unit is live, its quiet
        requests go on there (each resubmitted from its client's output). False: no other
        unit to go to (the unit may yet come back)."""
        if self.units is None or unit in {c.unit for c in self.units.live()}:
            return False
        target = self.units.choose()
        if target == unit or target not in {c.unit for c in self.units.live()}:
            return False
        self._unanswered_since.pop(unit, None)
        for generation in quiet:
            logger.warning(
                "unit %s is gone: moving the request to %s",
                unit,
                target,
                extra={"request_id": generation.request_id},
            )
            refused = await generation.resubmit(target)
            if refused is not None:
                self._lose(
                    generation, f"its unit {unit} is gone, and {target} refused it: {refused}"
                )
        return True

    async def _ask(self, unit: str, request_ids: list[str]) -> RequestStatus | None:
        query = codec.encode(RequestStatusQuery(tuple(request_ids)))
        subject = subjects.sched(unit, "status")
        try:
            reply = await self.bus.request(subject, query, timeout=self.period_s)
            answer = codec.decode(reply.data, RequestStatus, ErrorReply)
        except (BusTimeout, codec.ProtoError) as err:
            logger.warning("no status of %d quiet request(s): %s", len(request_ids), err)
            return None
        if isinstance(answer, ErrorReply):
            logger.warning("status query refused: %s", answer.message)
            return None
        return answer

    def _lose(self, generation: Generation, why: str) -> None:
        logger.error("request lost: %s", why, extra={"request_id": generation.request_id})
        self.lost += 1
        generation.lose(f"The request was lost and will not finish: {why}.")
