"""Scheduler <-> the workers of one unit: prefill batches, hand-off to decode, preemption.

Ownership of a request's KV blocks follows the request: kv_manager owners are named
"<holder>/<request id>". The scheduler allocates prompt blocks as "<its instance>/<id>"; at hand-off
the decode worker retains them as "<its holder>/<id>" before it acknowledges, and the scheduler
then releases its own references. (In disagg mode the decode worker instead allocates blocks in
its own pool, copies the KV into them, and acknowledges with what the copy cost.) A holder that
stops heart-beating loses every owner under it, and kv_manager publishes LeasesExpired so the
scheduler retries or fails those requests.

A request preempted by recompute comes back to prefill with its KV computed again from
prompt + output so far; its sampling state (original prompt, output so far) travels with it so
seeded draws, penalties and token indexes continue exactly where they stopped.
"""

from dataclasses import dataclass
from enum import StrEnum

from duetserve.proto.cache import CachedSpan
from duetserve.proto.codec import message
from duetserve.proto.scheduling import Sampling
from duetserve.proto.subjects import ROOT, check_token
from duetserve.proto.tokens import FinishReason, TokenLogprob


def prefill_batch_subject(unit: str) -> str:
    """Request/reply: scheduler -> the unit's prefill worker."""
    return f"{ROOT}.prefill.{check_token(unit, 'unit')}.batch"


def decode_admit_subject(unit: str) -> str:
    """Request/reply: scheduler -> the unit's decode worker."""
    return f"{ROOT}.decode.{check_token(unit, 'unit')}.admit"


def decode_control_subject(unit: str) -> str:
    """Publish: scheduler -> the unit's decode worker (preempt, cancel)."""
    return f"{ROOT}.decode.{check_token(unit, 'unit')}.control"


def kv_load_subject(unit: str) -> str:
    """Request/reply: scheduler -> the unit's decode worker, which copies KV from the host
    tier into blocks of the unit pool (KvLoad)."""
    return f"{ROOT}.decode.{check_token(unit, 'unit')}.load"


BATCH_PREFIX = "batch-"


def batch_owner(holder: str, batch_id: int) -> str:
    """The kv_manager owner of the references a prefill worker holds on a batch's blocks while
    it computes the batch: kv_manager names it in LeasesExpired (as `batch-<id>`) if the worker's
    lease lapses, and the scheduler then knows that batch will never be answered."""
    return f"{holder}/{BATCH_PREFIX}{batch_id}"


def batch_of(request_id: str) -> int | None:
    """The batch id of a `batch-<id>` owner's request part (None: a request's)."""
    number = request_id.removeprefix(BATCH_PREFIX)
    return int(number) if number != request_id and number.isdigit() else None


ROLL_CALL_S = 2.0  # how often a decode worker lists its residents (WorkerEvents.roll_call)


def worker_events_subject(unit: str) -> str:
    """Publish: the unit's workers and kv_manager -> scheduler."""
    return f"{ROOT}.sched.{check_token(unit, 'unit')}.events"


@dataclass(frozen=True, slots=True)
class SamplingState:
    """What sampling needs to continue a request anywhere: its original prompt, the tokens
    generated so far (the next token is output number len(output_token_ids)) and parameters."""

    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: Sampling
    stream: str  # where its tokens go: the stream of the ingress holding its client
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache (reported once)


@dataclass(frozen=True, slots=True)
class PrefillItem:
    request_id: str
    token_ids: tuple[int, ...]  # this chunk
    num_cached_tokens: int  # tokens before the chunk whose KV is already in the pool
    block_table: tuple[int, ...]
    sample: SamplingState | None = None  # set on the chunk that completes the prompt
    traceparent: str = ""  # the request's trace (W3C), since a batch serves many requests
    owner: str = ""  # the kv_manager owner of block_table (the scheduler's, for the request)
    # KVShare: spans of this chunk (the whole rest of the prompt) whose K/V are placed from
    # cached prompts' blocks (held by `owner` too) instead of computed; `recompute` of their
    # tokens, those deviating most at `check_layer`, are computed again in the later layers.
    reuse: tuple[CachedSpan, ...] = ()
    recompute: float = 0.0
    check_layer: int = 1


@message("prefill.batch")
@dataclass(frozen=True, slots=True)
class PrefillBatch:
    batch_id: int
    items: tuple[PrefillItem, ...]


@dataclass(frozen=True, slots=True)
class PrefillResult:
    request_id: str
    token: TokenLogprob | None = None  # the sampled token (logprob 0 unless asked for)
    finished: bool = False  # the sampled token already ends the request (EOS, max_tokens=1)
    error: str | None = None
    # KVShare (an item with `reuse`): tokens whose K/V were placed from spans, those of them
    # computed again in every layer, where the first placed K/V that stands begins (the
    # prompt's KV is exact before it; -1: nowhere), and the mean deviation at the check layer.
    reused: int = 0
    recomputed: int = 0
    first_kept: int = -1
    deviation: float = 0.0


@message("prefill.done")
@dataclass(frozen=True, slots=True)
class PrefillDone:
    batch_id: int
    results: tuple[PrefillResult, ...]


@dataclass(frozen=True, slots=True)
class DecodeItem:
    request_id: str
    block_table: tuple[int, ...]  # holds the KV of prompt + output[:-1]
    state: SamplingState
    traceparent: str = ""  # the request's trace (W3C)
    # Handed over by the decode worker it ran on (a worker replacement): the blocks are in the
    # decode worker's pool already, so they are retained in place, in every mode.
    from_worker: bool = False
    # The kv_manager owner that holds block_table for the request (the scheduler's): the
    # worker takes the blocks only while it still does. An admission that arrives after the
    # scheduler gave up on it (its hand-off timed out) is refused, never writes blocks that
    # were freed and handed to another request meanwhile.
    owner: str = ""
    # Swapped out on preemption: block_table[host_start:host_start + len(host_block_ids)] is
    # to be filled from these blocks of the host tier (kv.HOST_POOL, held by `owner` too)
    # before it decodes on (the blocks before host_start came from the prefix cache); nothing
    # is prefilled.
    host_block_ids: tuple[int, ...] = ()
    host_start: int = 0
    # The host tier holds a copy of block_table[:host_kept] already (under `owner`, from an
    # earlier swap or an earlier turn of its conversation): a swap-out copies only the rest.
    host_kept: int = 0
    # KVShare: its prompt's positions whose K/V were placed from cached spans, as [start, end)
    # pairs flattened (start0, end0, start1, end1, ...): the decode stage re-checks them.
    reused: tuple[int, ...] = ()


@message("decode.load")
@dataclass(frozen=True, slots=True)
class KvLoad:
    """Fill blocks of the unit pool that `owner` holds with the KV of host-tier blocks it holds
    too (a prompt's earlier turns, found in the host tier's prefix index), before its prefill
    computes the rest. The worker writes only while `owner` still holds the blocks."""

    owner: str
    host_block_ids: tuple[int, ...]
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.host_block_ids) != len(self.block_ids):
            raise ValueError("one unit-pool block per host block")


@message("decode.loaded")
@dataclass(frozen=True, slots=True)
class KvLoaded:
    blocks: int
    seconds: float


@message("decode.admit")
@dataclass(frozen=True, slots=True)
class DecodeAdmit:
    items: tuple[DecodeItem, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    request_id: str
    reason: str
    retry: bool = False  # no room now (resident limit, decode pool full): ask again later
    # Its swapped-out KV could not be brought back (the host tier is gone, a copy failed):
    # recompute it instead, into the same blocks.
    swap_failed: bool = False


@message("decode.admitted")
@dataclass(frozen=True, slots=True)
class DecodeAdmitted:
    request_ids: tuple[str, ...]
    refused: tuple[Refusal, ...] = ()
    # disagg mode: the KV the decode worker copied from the unit pool into its own for these
    # admissions (always 0 where decode reads the prefill worker's blocks in place)
    kv_copied_blocks: int = 0
    kv_copied_bytes: int = 0
    kv_copy_s: float = 0.0


class ControlKind(StrEnum):
    PREEMPT = "preempt"  # stop, release the blocks, report the output so far
    CANCEL = "cancel"  # stop, release the blocks, end the stream with finish_reason/error


@message("decode.control")
@dataclass(frozen=True, slots=True)
class DecodeControl:
    kind: ControlKind
    request_ids: tuple[str, ...]
    finish_reason: FinishReason = FinishReason.ABORT  # for CANCEL: how the stream ends
    error: str | None = None  # set exactly when finish_reason is ERROR
    # PREEMPT: for each request (when given), the owner to swap its KV out to the host tier
    # under ("" for that request: recompute it); empty: recompute all.
    swap_owners: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.error is not None) != (self.finish_reason == FinishReason.ERROR):
            raise ValueError("error is set exactly when finish_reason is 'error'")
        if self.swap_owners and len(self.swap_owners) != len(self.request_ids):
            raise ValueError("swap_owners must name one owner (or '') per request")


class EventKind(StrEnum):
    FINISHED = "finished"  # completed; its blocks are released
    NEEDS_BLOCKS = "needs_blocks"  # kv_manager said no; the request waits for a preemption
    PREEMPTED = "preempted"  # stopped on request; output_token_ids says how far it got
    FAILED = "failed"  # could not continue; `reason` says why (the stream got an error)
    LEASES_EXPIRED = "leases_expired"  # kv_manager: this holder's owners lost their blocks


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    kind: EventKind
    request_id: str
    output_token_ids: tuple[int, ...] = ()
    blocks_needed: int = 0
    reason: str = ""
    num_output_tokens: int = 0  # FINISHED: tokens the request generated in all
    # PREEMPTED with a swap: the host-tier blocks now holding its KV (prompt + output[:-1]),
    # held by the owner the control named, and how long the copy took.
    host_block_ids: tuple[int, ...] = ()
    swap_s: float = 0.0
    # ... and the blocks it did not copy: the first host_kept were in the host tier already
    # (DecodeItem.host_kept); host_block_ids hold the blocks after them.
    host_kept: int = 0


@dataclass(frozen=True, slots=True)
class ResidentSize:
    """How far a decoding request has grown on its worker."""

    request_id: str
    num_output: int  # tokens generated so far
    num_blocks: int  # blocks its table holds (growth taken ahead of need included)


@message("worker.events")
@dataclass(frozen=True, slots=True)
class WorkerEvents:
    source: str  # the publishing instance
    events: tuple[WorkerEvent, ...]
    free_blocks: int | None = None  # kv_manager's count when the publisher last knew it
    kv_pool: str = ""  # the pool free_blocks counts (kv.UNIT_POOL or kv.DECODE_POOL)
    # Every resident of the decode worker as it is now, sent with NEEDS_BLOCKS: preemption
    # then counts what each victim really holds, not what it held when it was handed over.
    residents: tuple[ResidentSize, ...] = ()
    # `residents` is the roll call: every request resident on `source` now (sent every
    # ROLL_CALL_S, and with NEEDS_BLOCKS). A request the scheduler has decoding that no decode
    # worker has listed for a while ended there, and the event saying so was lost.
    roll_call: bool = False
    # With a roll call: the decode worker's seconds per step lately (the time between two
    # tokens of a decoding request, TPOT as it happens: the mean over its last steps in a row,
    # about one answer's decode); None when it has not stepped enough in a row to say.
    step_s: float | None = None
    # The mean number of requests in those steps: with step_s, one point of the step time
    # against batch size, which policies project finishes from (scheduler/step_model.py).
    step_batch: float | None = None
