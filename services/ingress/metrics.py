"""Ingress metrics in a registry of its own (not prometheus-client's global one), so that two
services in one process, or one test after another, never share or clash over collectors.

Latencies are measured as clients see them: TTFT from the request's arrival to its first
output token, TPOT as vLLM defines it, (E2E - TTFT) / (output tokens - 1).
"""

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from duetserve.proto.scheduling import SchedulerStats
from duetserve.proto.supervision import SupervisorReport
from duetserve.proto.units import UnitCard
from duetserve.services.ingress.attainment import SloOutcome
from duetserve.services.ingress.vllm_metrics import VllmMetrics

__all__ = ["CONTENT_TYPE_LATEST", "IngressMetrics", "RequestTiming"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """What one finished generation reports: seconds since arrival, and token counts."""

    ttft_s: float | None  # None: no token ever came
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens not computed: from the prefix cache or host tier
    finish_reason: str = "stop"  # stop or length
    tenant: str = ""  # whose request it was ("" : not counted by tenant)


def combined(stats: Sequence[SchedulerStats]) -> SchedulerStats:
    """Several units' scheduler stats as one: counts and totals summed, the compute split
    averaged (each unit has its own), a figure no unit reports stays None."""
    merged: dict[str, object] = {}
    for field in dataclasses.fields(SchedulerStats):
        values = [v for s in stats if (v := getattr(s, field.name)) is not None]
        if not values:
            merged[field.name] = None
        elif field.name == "prefill_share":
            merged[field.name] = sum(values) / len(values)
        else:
            merged[field.name] = sum(values)
    return SchedulerStats(**merged)  # type: ignore[arg-type]


class RestartCounts(Collector):
    """duet_service_restarts_total: restarts of each service by its supervisor, as the
    launcher's last SupervisorReport counted them (absent when no launcher reports: under an
    orchestrator, which counts restarts itself)."""

    def __init__(self) -> None:
        self.report: SupervisorReport | None = None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "duet_service_restarts",
            "Times the launcher restarted a service (or nats-server) after it crashed.",
            labels=["service"],
        )
        if self.report is not None:
            for service, count in sorted(self.report.restarts.items()):
                family.add_metric([service], count)
        yield family


class IngressMetrics:
    """Duet's own metrics, and vLLM's names for what operators chart (vllm_metrics.py), for
    the served model `model_name`."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.restarts = RestartCounts()
        self.registry.register(self.restarts)
        self.vllm = VllmMetrics(self.registry, model_name)
        self.ttft = Histogram(
            "duet_ingress_ttft_seconds",
            "Time to first token, from arrival at ingress.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "duet_ingress_tpot_seconds",
            "Time per output token after the first: (E2E - TTFT) / (output tokens - 1).",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "duet_ingress_e2e_seconds",
            "End-to-end latency of a finished generation.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "duet_ingress_requests_in_flight",
            "Generation requests being served now.",
            registry=self.registry,
        )
        self.requests = Counter(
            "duet_ingress_requests",
            "HTTP requests by endpoint and status (499: the client went away).",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "duet_ingress_tokens",
            "Tokens of finished generations, by kind (prompt, completion; cached: prompt "
            "tokens whose KV came from the prefix cache or the host tier, not computed).",
            ["kind"],
            registry=self.registry,
        )
        self.slo_requests = Counter(
            "duet_ingress_slo_requests",
            "Finished and failed generations by SLO kind (latency, deadline, compound) and "
            "result (met, missed); attainment = met / (met + missed).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.slo_groups = Counter(
            "duet_ingress_slo_groups",
            "Compound groups of a stated size, by result: met (every member within the shared "
            "deadline) or missed (a member late or failed, or the group never completed).",
            ["result"],
            registry=self.registry,
        )
        self.quota_refusals = Counter(
            "duet_ingress_quota_refusals",
            "Requests refused (429) for a tenant's quota, by tenant and limit (requests: in "
            "flight; tokens: per minute).",
            ["tenant", "limit"],
            registry=self.registry,
        )
        self.semantic_lookups = Counter(
            "duet_semantic_cache_lookups",
            "Semantic cache lookups by result: hit (answered from the cache), miss, or "
            "unavailable (no answer in time: generated as a miss).",
            ["result"],
            registry=self.registry,
        )
        self.semantic_inserts = Counter(
            "duet_semantic_cache_inserts",
            "Answers that finished normally, sent to the semantic cache to store.",
            registry=self.registry,
        )
        # Per tenant (tenants come from the configured API keys: a bounded set of labels).
        self.tenant_tokens = Counter(
            "duet_tenant_tokens",
            "Tokens of finished generations by tenant and kind (prompt, completion; cached: "
            "prompt tokens not computed). Cache hit rate: cached / prompt.",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self.tenant_slo = Counter(
            "duet_tenant_slo_requests",
            "Finished and failed generations by tenant and SLO result (met, missed).",
            ["tenant", "result"],
            registry=self.registry,
        )
        self.units_live = Gauge(
            "duet_units_live",
            "Units whose card this ingress heard lately: the ones it routes requests to.",
            registry=self.registry,
        )
        self.unit_load = Gauge(
            "duet_unit_load",
            "Each live unit's load as its card last said: (waiting + running) / running limit.",
            ["unit"],
            registry=self.registry,
        )
        self.token_replays = Counter(
            "duet_ingress_token_replays",
            "Token streams asked for again, by cause: a hole in a stream's indexes (gap), a "
            "producer's batch number skipped (lost_batch), a stream quiet too long (quiet).",
            ["cause"],
            registry=self.registry,
        )

        self.scheduler = Gauge(
            "duet_scheduler_requests",
            "Requests at the scheduler by phase (waiting = the queue), as of the last scrape.",
            ["phase"],
            registry=self.registry,
        )
        self.kv_blocks = Gauge(
            "duet_kv_blocks",
            "KV blocks of the unit by state (free, total), as the scheduler last knew them.",
            ["state"],
            registry=self.registry,
        )
        self.running_limit = Gauge(
            "duet_scheduler_running_limit",
            "Requests the scheduler lets run at once now: the most that held their TPOT lately "
            "(admission), or fewer where the policy caps them (JITServe's group size), never "
            "above DUET_MAX_RUNNING.",
            registry=self.registry,
        )
        self.preemptions = Gauge(
            "duet_scheduler_preemptions",
            "Requests preempted by recompute since the scheduler started.",
            registry=self.registry,
        )

        self.swaps = Gauge(
            "duet_scheduler_swaps",
            "Preemptions by swap since the scheduler started, by direction (out: KV copied to "
            "the host tier; in: copied back).",
            ["direction"],
            registry=self.registry,
        )
        self.host_tier_blocks = Gauge(
            "duet_kv_host_tier_blocks",
            "KV blocks moved by the host tier since the scheduler started: copied out by "
            "swaps (swapped), not copied because the host tier held them already (kept), "
            "and loaded back for a prompt's earlier turns (loaded).",
            ["kind"],
            registry=self.registry,
        )

        self.reuse_tokens = Gauge(
            "duet_kv_reuse_tokens",
            "KVShare since the scheduler started (DUET_SPAN_REUSE): prompt tokens of the "
            "prefills that reused cached spans (prompt), the tokens placed from spans (reused; "
            "hit rate = reused / prompt) and those of them computed again (recomputed; the "
            "recomputed fraction = recomputed / reused).",
            ["kind"],
            registry=self.registry,
        )
        self.reuse_deviation = Gauge(
            "duet_kv_reuse_deviation",
            "KVShare: mean over reusing prefills of their reused tokens' mean squared K/V "
            "deviation at the check layer (0 until one ran).",
            registry=self.registry,
        )

        self.prefill_share = Gauge(
            "duet_compute_prefill_share",
            "The prefill worker's share of the unit's device, as the scheduler last set it "
            "(the decode worker has the rest).",
            registry=self.registry,
        )
        self.split_moves = Gauge(
            "duet_compute_split_moves",
            "Times the partition controller moved the compute split since the scheduler started.",
            registry=self.registry,
        )
        self.decode_pool_blocks = Gauge(
            "duet_kv_decode_pool_blocks",
            "disagg mode: blocks of the decode worker's own KV pool by state (free, total).",
            ["state"],
            registry=self.registry,
        )
        self.kv_transfers = Gauge(
            "duet_kv_transfers",
            "Hand-offs that copied a request's KV into the decode pool (disagg mode; 0 where "
            "decode reads the unit pool in place), since the scheduler started.",
            registry=self.registry,
        )
        self.kv_transfer_bytes = Gauge(
            "duet_kv_transfer_bytes",
            "Bytes of KV copied into the decode pool at hand-offs since the scheduler started.",
            registry=self.registry,
        )
        self.kv_transfer_seconds = Gauge(
            "duet_kv_transfer_seconds",
            "Seconds the decode worker spent copying KV at hand-offs since the scheduler started.",
            registry=self.registry,
        )

    def observe_scheduler(self, stats: SchedulerStats) -> None:
        self.vllm.observe_scheduler(stats)
        for phase in ("waiting", "prefilling", "decoding"):
            self.scheduler.labels(phase=phase).set(getattr(stats, phase))
        self.kv_blocks.labels(state="free").set(stats.free_blocks)
        self.kv_blocks.labels(state="total").set(stats.total_blocks)
        self.preemptions.set(stats.preemptions)
        self.swaps.labels(direction="out").set(stats.swaps_out)
        self.swaps.labels(direction="in").set(stats.swaps_in)
        self.host_tier_blocks.labels(kind="swapped").set(stats.swap_blocks_copied)
        self.host_tier_blocks.labels(kind="kept").set(stats.swap_blocks_kept)
        self.host_tier_blocks.labels(kind="loaded").set(stats.host_blocks_loaded)
        self.reuse_tokens.labels(kind="prompt").set(stats.reuse_prompt_tokens)
        self.reuse_tokens.labels(kind="reused").set(stats.reused_tokens)
        self.reuse_tokens.labels(kind="recomputed").set(stats.reuse_recomputed_tokens)
        if stats.reuse_prefills:
            self.reuse_deviation.set(stats.reuse_deviation_sum / stats.reuse_prefills)
        if stats.running_limit is not None:
            self.running_limit.set(stats.running_limit)
        self.prefill_share.set(stats.prefill_share)
        self.split_moves.set(stats.split_moves)
        if stats.decode_total_blocks is not None and stats.decode_free_blocks is not None:
            self.decode_pool_blocks.labels(state="free").set(stats.decode_free_blocks)
            self.decode_pool_blocks.labels(state="total").set(stats.decode_total_blocks)
        self.kv_transfers.set(stats.kv_copies)
        self.kv_transfer_bytes.set(stats.kv_copied_bytes)
        self.kv_transfer_seconds.set(stats.kv_copy_s)

    def observe_units(self, cards: Sequence[UnitCard]) -> None:
        self.units_live.set(len(cards))
        self.unit_load.clear()
        for card in cards:
            load = (card.waiting + card.running) / max(card.running_limit, 1)
            self.unit_load.labels(unit=card.unit).set(load)

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_generation(self, timing: RequestTiming) -> None:
        self.e2e.observe(timing.e2e_s)
        self.tokens.labels(kind="prompt").inc(timing.prompt_tokens)
        self.tokens.labels(kind="completion").inc(timing.completion_tokens)
        self.tokens.labels(kind="cached").inc(timing.cached_tokens)
        if timing.tenant:
            tenant = self.tenant_tokens
            tenant.labels(tenant=timing.tenant, kind="prompt").inc(timing.prompt_tokens)
            tenant.labels(tenant=timing.tenant, kind="completion").inc(timing.completion_tokens)
            tenant.labels(tenant=timing.tenant, kind="cached").inc(timing.cached_tokens)
        self.vllm.observe_finished(
            timing.finish_reason,
            timing.ttft_s,
            timing.e2e_s,
            timing.prompt_tokens,
            timing.completion_tokens,
            timing.cached_tokens,
        )
        if timing.ttft_s is None:
            return
        self.ttft.observe(timing.ttft_s)
        if timing.completion_tokens > 1:
            self.tpot.observe((timing.e2e_s - timing.ttft_s) / (timing.completion_tokens - 1))

    def observe_aborted(self) -> None:
        """A request that started and ended without finishing: failed, or its client gone."""
        self.vllm.success.labels(self.vllm.model_name, "abort").inc()

    def observe_token_gap(self, gap_s: float, tokens: int) -> None:
        self.vllm.observe_gap(gap_s, tokens)

    def observe_slo(self, outcome: SloOutcome, tenant: str = "") -> None:
        result = "met" if outcome.met else "missed"
        self.slo_requests.labels(kind=outcome.kind.value, result=result).inc()
        if tenant:
            self.tenant_slo.labels(tenant=tenant, result=result).inc()

    def observe_groups(self, met: int, missed: int) -> None:
        if met:
            self.slo_groups.labels(result="met").inc(met)
        if missed:
            self.slo_groups.labels(result="missed").inc(missed)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
