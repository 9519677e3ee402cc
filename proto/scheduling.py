"""Ingress <-> scheduler: submitting, finishing and cancelling requests.

A request arrives already tokenized (ingress owns text) with its sampling parameters, its SLO
(DESIGN.md "Requests, tenants and SLOs") and its cache hints. The scheduler answers
SubmitAccepted or an ErrorReply; tokens then flow on the stream the request names
(proto/tokens.py).
"""

from dataclasses import dataclass
from enum import StrEnum

from duetserve.proto.codec import message
from duetserve.proto.subjects import check_token


class SloKind(StrEnum):
    LATENCY = "latency"  # TTFT and TPOT targets
    DEADLINE = "deadline"  # whole answer by a deadline relative to arrival
    COMPOUND = "compound"  # a group of calls sharing one deadline


@dataclass(frozen=True, slots=True)
class Slo:
    kind: SloKind
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    deadline_ms: float | None = None
    group: str | None = None
    # Compound: how many calls the group makes, when the caller knows. The group's attainment
    # is then judged when its last member finishes; without it, each member alone.
    group_size: int | None = None
    # False: the server's default SLO, given to a request that stated none. It is scheduled
    # for like any other, but never the reason a request is refused (admission.py).
    from_request: bool = True

    def __post_init__(self) -> None:
        needs = {
            SloKind.LATENCY: ("ttft_ms", "tpot_ms"),
            SloKind.DEADLINE: ("deadline_ms",),
            SloKind.COMPOUND: ("group", "deadline_ms"),
        }[self.kind]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"a {self.kind.value} SLO needs {name}")
        for name in ("ttft_ms", "tpot_ms", "deadline_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.group_size is not None:
            if self.kind != SloKind.COMPOUND:
                raise ValueError("group_size belongs to a compound SLO")
            if self.group_size < 1:
                raise ValueError("group_size must be >= 1")


@dataclass(frozen=True, slots=True)
class Sampling:
    """The runtime's SamplingParams as they travel (validated at ingress, again at use)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    seed: int | None = None


@message("sched.submit")
@dataclass(frozen=True, slots=True)
class SubmitRequest:
    request_id: str
    tenant: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    arrival_time: float  # unix seconds at ingress
    stream: str  # the token stream of the ingress that holds the client (subjects.tokens)
    slo: Slo | None = None  # None: the server's default SLO
    public_prefix_tokens: int = 0  # leading tokens that may be shared across tenants
    public_spans: bool = False  # its spans may serve every tenant (KVShare: duet.cache)
    # Resubmitted (its scheduler lost it): the output its client already has. It continues from
    # there; with the same seed, the rest is what it would have been.
    output_token_ids: tuple[int, ...] = ()
    # A conservative upper bound of its output tokens (ingress's length predictor,
    # common/lengths.py; max_tokens itself with ignore_eos); None: unknown, max_tokens bounds it.
    output_bound: int | None = None
    # A compound member: how long before its own arrival its group's first member arrived at
    # ingress (its shared deadline counts from there); 0 for the first, or any other SLO.
    group_age_s: float = 0.0

    def __post_init__(self) -> None:
        check_token(self.request_id, "request id")
        check_token(self.stream, "stream")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if len(self.output_token_ids) >= self.sampling.max_tokens:
            raise ValueError("output_token_ids must be fewer than max_tokens")
        if not 0 <= self.public_prefix_tokens <= len(self.prompt_token_ids):
            raise ValueError("public_prefix_tokens must be within the prompt")
        if self.output_bound is not None and not 1 <= self.output_bound <= self.sampling.max_tokens:
            raise ValueError("output_bound must be within [1, max_tokens]")
        if not 0.0 <= self.group_age_s < float("inf"):
            raise ValueError("group_age_s must be a finite number >= 0")


@message("sched.submit.ok")
@dataclass(frozen=True, slots=True)
class SubmitAccepted:
    request_id: str


class CancelReason(StrEnum):
    CLIENT_GONE = "client_gone"  # the client disconnected: free everything
    STOP_STRING = "stop_string"  # ingress matched a stop string: finish as "stop"
    ANSWERED_FROM_CACHE = "answered_from_cache"  # the semantic cache answered: free everything


@message("sched.cancel")
@dataclass(frozen=True, slots=True)
class CancelRequest:
    request_id: str
    reason: CancelReason


@message("sched.stats.query")
@dataclass(frozen=True, slots=True)
class SchedulerStatsQuery:
    pass


@message("sched.stats")
@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Requests by phase (for the queue and running gauges of /metrics)."""

    waiting: int
    prefilling: int
    decoding: int
    free_blocks: int
    total_blocks: int
    preemptions: int  # since the scheduler started
    prefill_share: float = 0.0  # the compute split last asked of the unit's workers
    split_moves: int = 0  # times the partition controller moved it since the start
    # disagg mode: the decode pool's blocks, and the KV copied into it at hand-off since the
    # start (zero in the modes where decode reads the unit pool in place)
    decode_free_blocks: int | None = None
    decode_total_blocks: int | None = None
    kv_copies: int = 0
    kv_copied_bytes: int = 0
    kv_copy_s: float = 0.0
    # How many requests may run at once now, as admission measured it (scheduler/admission.py)
    running_limit: int | None = None
    # The host tier since the start: swap-outs and swap-ins, the blocks swap-outs copied and
    # those they did not copy (held there already), and earlier turns' blocks loaded back.
    swaps_out: int = 0
    swaps_in: int = 0
    swap_blocks_copied: int = 0
    swap_blocks_kept: int = 0
    host_blocks_loaded: int = 0
    # KVShare since the start: prefills that reused cached spans, their prompts' tokens, the
    # tokens placed from spans, those of them recomputed, and the sum of each prefill's mean
    # deviation at the check layer.
    reuse_prefills: int = 0
    reuse_prompt_tokens: int = 0
    reused_tokens: int = 0
    reuse_recomputed_tokens: int = 0
    reuse_deviation_sum: float = 0.0


@message("sched.status.query")
@dataclass(frozen=True, slots=True)
class RequestStatusQuery:
    """Ingress asks about requests it has heard nothing of for a while (their streams are
    quiet): a request the scheduler no longer knows was lost (a scheduler that restarted) and
    its client must not wait for ever."""

    request_ids: tuple[str, ...]


@message("sched.status")
@dataclass(frozen=True, slots=True)
class RequestStatus:
    scheduler: str  # the instance that answered
    known: tuple[str, ...]  # those of the query it still runs, in any phase


@message("sched.resume")
@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """The answer to a migrating notice (TokenChunk.migrating): the output the client has had
    of the request, from which it continues on another worker."""

    request_id: str
    output_token_ids: tuple[int, ...]
