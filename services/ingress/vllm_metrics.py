"""The metrics operators already chart, under vLLM's names (`vllm:` and a `model_name` label),
beside Duet's own, so that dashboards and alerts written for vLLM (its published Grafana
dashboards, autoscalers on its queue length) work on Duet unchanged.

Each figure means what vLLM's does, measured where Duet has it:
- latencies as the client sees them, from arrival at ingress (vLLM measures from its engine's
  arrival, which on one server is the same moment);
- inter-token latency per output token: a gap between two arrivals of output at ingress,
  shared by the tokens that arrived at the end of it;
- running and waiting requests, KV usage and preemptions as the unit's scheduler reports them
  (asked at each scrape, as Duet's own scheduler gauges are);
- prefix-cache queries and hits in tokens: each finished request's prompt tokens, and those
  of them whose KV came from a cache instead of being computed.
"""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from duetserve.proto.scheduling import SchedulerStats

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# vLLM's finished_reason values: a request that failed counts as aborted.
FINISHED_REASONS = ("stop", "length", "abort")


class _Preemptions(Collector):
    """vllm:num_preemptions_total, the scheduler's own cumulative count (a counter that starts
    again from 0 when the scheduler restarts, as rate() expects of counters)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.count: int | None = None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            labels=["model_name"],
        )
        if self.count is not None:
            family.add_metric([self.model_name], self.count)
        yield family


class VllmMetrics:
    """vLLM's metric names in `registry`, every series labelled with the served model's name."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        name = ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches (prefilling or decoding).",
            name,
            registry=registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            name,
            registry=registry,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            name,
            registry=registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            name,
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            name,
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            name,
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", name, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            name,
            registry=registry,
        )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            name,
            registry=registry,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            name,
            registry=registry,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of finished requests by finished_reason (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self.request_prompt = Histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed, per request.",
            name,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_generation = Histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed, per request.",
            name,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.preemptions = _Preemptions(model_name)
        registry.register(self.preemptions)
        # Series that exist before the first request, as vLLM's do.
        for metric in (
            self.running,
            self.waiting,
            self.kv_usage,
            self.ttft,
            self.itl,
            self.e2e,
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_queries,
            self.prefix_hits,
            self.request_prompt,
            self.request_generation,
        ):
            metric.labels(model_name)
        for reason in FINISHED_REASONS:
            self.success.labels(model_name, reason)

    def observe_scheduler(self, stats: SchedulerStats) -> None:
        model = self.model_name
        self.running.labels(model).set(stats.prefilling + stats.decoding)
        self.waiting.labels(model).set(stats.waiting)
        if stats.total_blocks > 0:
            used = stats.total_blocks - stats.free_blocks
            self.kv_usage.labels(model).set(used / stats.total_blocks)
        self.preemptions.count = stats.preemptions

    def observe_finished(
        self,
        finished_reason: str,
        ttft_s: float | None,
        e2e_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> None:
        """One request ended: `finished_reason` is stop, length or abort."""
        model = self.model_name
        self.success.labels(model, finished_reason).inc()
        self.e2e.labels(model).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.prefix_queries.labels(model).inc(prompt_tokens)
        self.prefix_hits.labels(model).inc(cached_tokens)
        self.request_prompt.labels(model).observe(prompt_tokens)
        self.request_generation.labels(model).observe(completion_tokens)

    def observe_gap(self, gap_s: float, tokens: int) -> None:
        """`tokens` output tokens arrived together, `gap_s` after the output before them."""
        histogram = self.itl.labels(self.model_name)
        for _ in range(tokens):
            histogram.observe(gap_s / tokens)
