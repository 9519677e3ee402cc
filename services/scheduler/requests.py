"""Everything the scheduler keeps about one request, beside the planner's numbers."""

import secrets
from dataclasses import dataclass, field, replace

from duetserve.proto.cache import CachedSpan
from duetserve.proto.scheduling import SubmitRequest
from duetserve.proto.workers import SamplingState
from duetserve.services.scheduler.state import Phase, SeqState
from duetserve.services.scheduler.targets import compound_group, slo_targets


@dataclass(slots=True)
class RequestRecord:
    submit: SubmitRequest
    seq: SeqState
    block_table: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)  # known after a preemption
    cancelled: str | None = None  # reason, once a cancel arrived
    traceparent: str = ""  # the request's trace, for work done on it outside its messages
    first_token_at: float | None = None  # monotonic time prefill produced the first token
    # The kv_manager holder the scheduler takes blocks as: its instance name, so that a
    # restarted scheduler never renews (and so never frees) the leases of the one before it.
    holder: str = "scheduler"
    prefill_attempts: int = 0  # batches of it given up on (SchedulerCore._prefill_again)
    migrating_since: float | None = None  # monotonic: its decode worker was lost (migrate)
    no_worker_since: float | None = None  # monotonic: first found no worker to take it
    decoding_since: float | None = None  # monotonic: handed off to a decode worker
    unlisted_since: float | None = None  # monotonic: decoding, yet in no worker's roll call
    # Preempted by a swap: the host-tier blocks (held by `owner` in kv.HOST_POOL) holding the
    # KV of kv_token_ids; it is brought back at its next admission instead of prefilled.
    swapped: tuple[int, ...] = ()
    # Host-tier blocks (held by `owner` in kv.HOST_POOL) holding the KV of its first full
    # blocks, block i tokens [i*bs, (i+1)*bs) of kv_token_ids: from a swap (kept after it came
    # back) or from the host tier's prefix index (an earlier turn). A swap-out copies only the
    # blocks after them; an admission loads them instead of recomputing; when the request
    # ends they go to the host tier's index.
    host_copy: tuple[int, ...] = ()
    preempt_sent_at: float | None = None  # monotonic: a PREEMPT went out (SeqState.preempting)
    # KVShare: cached spans of its prompt past the prefix (from the last admission's match),
    # their source blocks (held by `owner` until its prefill is answered), and where the first
    # placed K/V that stood after prefill begins (-1: none; its KV is exact before it).
    spans: tuple[CachedSpan, ...] = ()
    span_blocks: tuple[int, ...] = ()
    first_kept: int = -1

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    @property
    def owner(self) -> str:
        """The kv_manager owner of this request's blocks while the scheduler holds them."""
        return f"{self.holder}/{self.request_id}"

    @property
    def kv_token_ids(self) -> tuple[int, ...]:
        """The tokens whose KV prefill computes: the prompt, plus after a preemption all output
        so far (recompute); prefill then samples the next token as if nothing had happened."""
        return self.submit.prompt_token_ids + tuple(self.output_token_ids)

    def sampling_state(self) -> SamplingState:
        return SamplingState(
            prompt_token_ids=self.submit.prompt_token_ids,
            output_token_ids=tuple(self.output_token_ids),
            sampling=self.submit.sampling,
            stream=self.submit.stream,
            cached_tokens=self.seq.num_cached,
        )

    def requeue_after_preemption(self, output_token_ids: tuple[int, ...]) -> None:
        self.output_token_ids = list(output_token_ids)
        self.block_table = []
        seq = self.seq
        seq.prompt_len = len(self.kv_token_ids)
        seq.num_output = len(output_token_ids)
        seq.num_cached = seq.num_computed = seq.num_blocks = 0
        self.spans, self.span_blocks, self.first_kept, seq.whole = (), (), -1, False
        seq.charge = None
        seq.phase = Phase.WAITING
        seq.swapped = False  # until its PREEMPTED event says its KV went to the host tier
        seq.preempting, self.preempt_sent_at = False, None
        seq.in_flight = False  # a batch still out with it is for its old blocks (see _settle)
        seq.num_preemptions += 1

    @classmethod
    def new(cls, submit: SubmitRequest, arrival: float, holder: str) -> "RequestRecord":
        """The record of a request just submitted. A request without a seed gets one here,
        drawn by the server: its sampling is then a function of (seed, position) wherever it
        runs, so a preempted or migrated request continues exactly as it would have."""
        if submit.sampling.seed is None:
            seeded = replace(submit.sampling, seed=secrets.randbits(63))
            submit = replace(submit, sampling=seeded)
        output = submit.output_token_ids  # resubmitted: it goes on from there
        seq = SeqState(
            request_id=submit.request_id,
            arrival=arrival,
            prompt_len=len(submit.prompt_token_ids) + len(output),
            max_tokens=submit.sampling.max_tokens,
            num_output=len(output),
            phase=Phase.WAITING,
            output_bound=submit.output_bound,
            targets=slo_targets(submit.slo, arrival, submit.group_age_s),
            tenant=submit.tenant,
            group=compound_group(submit.slo, submit.tenant),
            group_size=submit.slo.group_size if submit.slo is not None else None,
        )
        return cls(submit, seq, output_token_ids=list(output), holder=holder)
