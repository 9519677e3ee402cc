"""What a load test sends and what it measured, shared by workloads, the client, the metrics
and the simulator. Times are seconds on one monotonic clock, relative to the run's start."""

from dataclasses import dataclass, field
from typing import Literal

SloKind = Literal["latency", "deadline", "compound"]


@dataclass(frozen=True, slots=True)
class SloSpec:
    """A request's SLO, as DESIGN.md's `duet.slo` object (deadlines relative to arrival; a
    compound group's deadline relative to its first member's arrival)."""

    kind: SloKind
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    deadline_ms: float | None = None
    group: str | None = None
    group_size: int | None = None  # compound: how many calls the group makes

    def to_request(self) -> dict[str, object]:
        """The `duet.slo` object of a request body."""
        body: dict[str, object] = {"kind": self.kind}
        for name in ("ttft_ms", "tpot_ms", "deadline_ms", "group", "group_size"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


@dataclass(frozen=True, slots=True)
class RequestSpec:
    index: int
    prompt: str | list[dict[str, str]]  # completion text, or chat messages
    prompt_tokens: int  # as the workload counted them (the server's count may differ)
    output_tokens: int  # asked for, and forced where the server supports it
    arrival_s: float  # when to send, from the run's start
    slo: SloSpec | None = None
    conversation: str | None = None  # multi-turn: turns of one conversation share this
    seed: int | None = None  # sent as the request's seed (None: the server draws one)
    # Sent as Duet's `duet.expected_output_tokens` (oracle lengths in the policy benchmark).
    expected_output_tokens: int | None = None
    tenant: str | None = None  # whose request (the simulator's fairness; live: its API key)


@dataclass(slots=True)
class RequestResult:
    spec: RequestSpec
    sent_s: float
    first_token_s: float | None = None
    done_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # each streamed token's arrival
    output_tokens: int = 0  # as the server's usage reported them, else as counted
    error: str | None = None
    forced_length: bool = True  # False when the server ignored ignore_eos/min_tokens

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None
