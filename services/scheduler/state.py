"""The planner's view of a unit: requests as numbers, no tokens, no I/O.

The scheduler service keeps one `SeqState` per request and updates it as events arrive (blocks
granted, chunks prefilled, tokens decoded); the planner reads these to decide the next step.
The simulator drives the same objects from its cost model.
"""

from dataclasses import dataclass, field
from enum import StrEnum

from duetserve.common.lengths import remaining_tokens
from duetserve.proto.workers import DecodeAdmitted, ResidentSize


@dataclass(frozen=True, slots=True)
class SloTargets:
    """A request's SLO as a policy measures it: seconds, and its whole answer's deadline on the
    scheduler's clock (a deadline or compound SLO). None: no such target."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    deadline_at: float | None = None


class Phase(StrEnum):
    WAITING = "waiting"  # no blocks yet
    PREFILLING = "prefilling"  # prompt blocks reserved, prompt partly computed
    DECODING = "decoding"  # handed to the decode worker


# One per request: compared by identity, as list.remove and `in` need (and fast).
@dataclass(slots=True, eq=False)
class SeqState:
    request_id: str
    arrival: float  # seconds, the scheduler's clock
    prompt_len: int  # tokens to compute before decoding (prompt + any recomputed output)
    max_tokens: int
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    num_computed: int = 0  # prompt tokens whose KV is in the pool (cached ones included)
    num_output: int = 0  # tokens generated so far
    num_blocks: int = 0  # blocks held for this request
    phase: Phase = Phase.WAITING
    num_preemptions: int = 0
    # A chunk of it is in a prefill batch not answered yet: the next batch leaves it out
    # (its next chunk starts where that one ends, known only from the answer).
    in_flight: bool = False
    # Its output's predicted upper bound (SubmitRequest.output_bound); None: max_tokens.
    output_bound: int | None = None
    targets: SloTargets | None = None  # None: no SLO (the simulator's plain requests)
    tenant: str = ""  # whose service it counts as (fairness: policy/fairness.py)
    # A compound SLO's group (its tenant's scope included: never shared across tenants) and
    # how many calls the caller said it makes; "" when not a compound member.
    group: str = ""
    group_size: int | None = None
    # Preempted by a swap: its KV waits in the host tier, and comes back without a prefill.
    swapped: bool = False
    # Told to stop (PREEMPT sent), not heard back yet: not a victim again, and its blocks are
    # as good as free (a swap releases them only once its copy is done).
    preempting: bool = False
    # Its prompt's rest is prefilled in one chunk (KVShare's prefill over reused spans cannot
    # be split): the planner gives it a batch's whole budget, or more when it goes first.
    whole: bool = False
    # What its whole prefill counts against a batch's token budget, when it is not its token
    # count: a prefill over reused spans computes most of them in a few layers only.
    charge: int | None = None
    # The share of its prompt the cache held when it arrived (an exact prefix and reusable
    # spans: cache_index's peek), for ordering by hit rate (policy/hit_rate.py).
    expected_hit: float = 0.0

    @property
    def num_uncomputed(self) -> int:
        return self.prompt_len - self.num_computed

    @property
    def remaining_output(self) -> int:
        """Output tokens it is still expected to produce: its bound refined by what it has
        produced so far (common/lengths.py), or what max_tokens leaves when it has none."""
        if self.output_bound is None:
            return max(self.max_tokens - self.num_output, 0)
        return remaining_tokens(self.output_bound, self.num_output, self.max_tokens)


@dataclass(slots=True)
class KvTransfers:
    """The KV copied from the unit pool into decode's own at hand-offs (disagg mode)."""

    copies: int = 0  # hand-offs that copied
    nbytes: int = 0
    seconds: float = 0.0

    def add(self, admitted: DecodeAdmitted) -> None:
        if admitted.kv_copied_blocks:
            self.copies += 1
            self.nbytes += admitted.kv_copied_bytes
            self.seconds += admitted.kv_copy_s


@dataclass(slots=True)
class UnitView:
    """What the planner sees of one unit. `waiting` is in arrival order."""

    free_blocks: int
    total_blocks: int
    waiting: list[SeqState] = field(default_factory=list)
    prefilling: list[SeqState] = field(default_factory=list)
    decoding: list[SeqState] = field(default_factory=list)


def grow(decoding: list[SeqState], sizes: tuple[ResidentSize, ...]) -> None:
    """What the decode worker says its residents have grown to: their output so far and the
    blocks they hold (the simulator counts the same growth token by token)."""
    by_id = {size.request_id: size for size in sizes}
    for seq in decoding:
        size = by_id.get(seq.request_id)
        if size is not None:
            seq.num_output = size.num_output
            seq.num_blocks = size.num_blocks
