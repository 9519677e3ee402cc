"""The shell around the pure SplitController: it feeds it the unit's latencies as the scheduler
sees them, asks it for a decision on a timer, publishes the new split to the unit's workers and
keeps what they report having applied.

The latencies are the server's own: TTFT from a request's submission to its first token
(prefill done), TPOT from the first token to the decode worker's report that the request
finished, over its output tokens after the first. Requests that were preempted before their
first token are left out of TTFT (their first token came from an earlier attempt). Each
finished request also gives the pair, for the controller's joint attainment.

Each latency goes to the controller as a multiple of that request's own target (its SLO's, or
the server's default SLO when it stated none), and the controller's limit is 1.0 on both
sides: it keeps the requests' own SLOs at its percentile, whatever mix of SLOs they have, with
no targets of its own. A request without a target on one side (a deadline SLO has no TPOT)
gives no sample there."""

import asyncio
import logging

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.tracing import active_tracer
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.compute import (
    ComputeShareApplied,
    SetComputeSplit,
    compute_applied_subject,
    compute_split_subject,
)
from duetserve.services.scheduler.split_controller import (
    SplitAction,
    SplitController,
    SplitDecision,
)

logger = logging.getLogger(__name__)


class SplitTuner:
    def __init__(
        self,
        bus: Bus,
        unit: str,
        controller: SplitController | None,
        prefill_share: float,
        interval_s: float = 0.5,
    ) -> None:
        self.bus, self.unit, self.controller = bus, unit, controller
        self.prefill_share = prefill_share  # the split last asked for
        self.interval_s = interval_s
        self.sequence = 0
        self.moves = 0
        self.applied: dict[str, ComputeShareApplied] = {}  # by role: what each worker has
        self.last_decision: SplitDecision | None = None

    # --- what the scheduler sees ------------------------------------------------------------

    def on_arrival(self, prompt_tokens: int) -> None:
        if self.controller is not None:
            self.controller.observe_arrival(prompt_tokens)

    def on_first_token(self, ttft_s: float, target_s: float | None) -> None:
        if self.controller is not None and target_s:
            self.controller.observe_ttft(ttft_s / target_s)

    def on_finished(
        self,
        decode_s: float,
        output_tokens: int,
        target_s: float | None,
        ttft_s: float | None = None,
        ttft_target_s: float | None = None,
    ) -> None:
        """A request finished: its TPOT for that side, and its (TTFT, TPOT) pair for the
        joint attainment (`ttft_s` None: preempted before its first token, so not measured)."""
        if self.controller is None:
            return
        tpot = None
        if output_tokens > 1 and target_s:
            tpot = decode_s / (output_tokens - 1) / target_s
            self.controller.observe_tpot(tpot)
        ttft = ttft_s / ttft_target_s if ttft_s is not None and ttft_target_s else None
        self.controller.observe_finished(ttft, tpot)

    def on_prefill_batch(self, num_tokens: int, seconds: float) -> None:
        if self.controller is not None:
            self.controller.observe_prefill_batch(num_tokens, seconds, self.prefill_share)

    # --- the workers ------------------------------------------------------------------------

    async def on_applied(self, msg: Msg) -> None:
        try:
            applied = decode(msg.data, ComputeShareApplied)
        except ProtoError as err:
            logger.warning("dropped a malformed compute report: %s", err)
            return
        if applied.error is not None:
            logger.warning(
                "%s could not apply split %d: %s", applied.role, applied.sequence, applied.error
            )
        self.applied[applied.role] = applied

    async def set_split(self, prefill_share: float, reason: str) -> None:
        """Publish a split for both workers; each applies it after its iteration in hand."""
        self.sequence += 1
        self.prefill_share = prefill_share
        split = SetComputeSplit(prefill_share, self.sequence, reason)
        await self.bus.publish(compute_split_subject(self.unit), encode(split))

    async def on_split(self, msg: Msg) -> None:
        """Splits published by anyone (an operator too): the unit's split is the last one."""
        try:
            split = decode(msg.data, SetComputeSplit)
        except ProtoError:
            return  # the workers log it
        self.prefill_share = split.prefill_share
        self.sequence = max(self.sequence, split.sequence)

    async def start(self) -> None:
        await self.bus.subscribe(compute_applied_subject(self.unit), self.on_applied)
        await self.bus.subscribe(compute_split_subject(self.unit), self.on_split)

    async def run(self) -> None:
        """Decide on a timer; a controller-less (static) unit only listens."""
        while self.controller is not None:
            await asyncio.sleep(self.interval_s)
            decision = self.controller.maybe_decide(asyncio.get_running_loop().time())
            if decision is not None:
                await self._act(decision)

    async def _act(self, decision: SplitDecision) -> None:
        self.last_decision = decision
        _trace(decision)
        joint = "n/a" if decision.attainment is None else f"{decision.attainment:.0%}"
        logger.info(
            "split %s: %.2f -> %.2f (%s); at the percentile, TTFT %.2fx and TPOT %.2fx of "
            "the requests' targets; %s of %d finished met both",
            decision.action.value,
            decision.previous_split,
            decision.split,
            decision.reason,
            decision.ttft_s,
            decision.tpot_s,
            joint,
            decision.num_finished,
        )
        if decision.action != SplitAction.HOLD and decision.split != self.prefill_share:
            self.moves += 1
            await self.set_split(decision.split, decision.reason)


def _trace(decision: SplitDecision) -> None:
    """One span per decision, its numbers as attributes, when tracing is on."""
    tracer = active_tracer()
    if tracer is None:
        return
    with tracer.start_as_current_span("scheduler.split_decision") as span:
        span.set_attribute("duet.split.action", decision.action.value)
        span.set_attribute("duet.split.reason", decision.reason)
        span.set_attribute("duet.split.previous", decision.previous_split)
        span.set_attribute("duet.split.new", decision.split)
        # latencies as multiples of the requests' own targets (see the module's note)
        span.set_attribute("duet.split.ttft_vs_target", decision.ttft_s)
        span.set_attribute("duet.split.tpot_vs_target", decision.tpot_s)
        if decision.predicted_ttft_s is not None:
            span.set_attribute("duet.split.predicted_ttft_vs_target", decision.predicted_ttft_s)
        if decision.predicted_tpot_s is not None:
            span.set_attribute("duet.split.predicted_tpot_vs_target", decision.predicted_tpot_s)
        if decision.attainment is not None:
            span.set_attribute("duet.split.joint_attainment", decision.attainment)
        if decision.predicted_attainment is not None:
            span.set_attribute(
                "duet.split.predicted_joint_attainment", decision.predicted_attainment
            )
