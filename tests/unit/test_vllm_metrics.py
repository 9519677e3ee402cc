"""/metrics under vLLM's names: the series vLLM's dashboards query exist from the start, with a
model_name label, and each carries what Duet measured, as vLLM defines the figure."""

from prometheus_client.parser import text_string_to_metric_families

from duetserve.proto.scheduling import SchedulerStats
from duetserve.services.ingress.metrics import IngressMetrics, RequestTiming

MODEL = "SmolLM2-135M-Instruct"

# The names the production issue lists (and vLLM's dashboards chart), as Prometheus shows them.
CHARTED = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_success_total",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
)


def samples(metrics: IngressMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: IngressMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset({"model_name": MODEL, **labels}.items()))]


def test_every_charted_series_exists_before_the_first_request_with_the_model_name() -> None:
    metrics = IngressMetrics(MODEL)
    names = {(name, dict(labels).get("model_name")) for name, labels in samples(metrics)}
    for name in CHARTED:
        assert (name, MODEL) in names, name


def test_a_finished_request_counts_its_tokens_latencies_and_prefix_hits() -> None:
    metrics = IngressMetrics(MODEL)
    metrics.observe_generation(RequestTiming(0.25, 2.0, 40, 12, 32, "length"))
    metrics.observe_generation(RequestTiming(0.5, 1.0, 10, 3, 0, "stop"))
    assert value(metrics, "vllm:prompt_tokens_total") == 50
    assert value(metrics, "vllm:generation_tokens_total") == 15
    assert value(metrics, "vllm:prefix_cache_queries_total") == 50
    assert value(metrics, "vllm:prefix_cache_hits_total") == 32
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == 1
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(metrics, "vllm:request_success_total", finished_reason="abort") == 0
    assert value(metrics, "vllm:time_to_first_token_seconds_count") == 2
    assert value(metrics, "vllm:time_to_first_token_seconds_sum") == 0.75
    assert value(metrics, "vllm:e2e_request_latency_seconds_sum") == 3.0
    assert value(metrics, "vllm:time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(metrics, "vllm:request_generation_tokens_bucket", le="5.0") == 1
    metrics.observe_aborted()
    assert value(metrics, "vllm:request_success_total", finished_reason="abort") == 1


def test_tokens_that_arrive_together_share_the_gap_before_them() -> None:
    metrics = IngressMetrics(MODEL)
    metrics.observe_token_gap(0.06, 3)
    metrics.observe_token_gap(0.04, 1)
    assert value(metrics, "vllm:inter_token_latency_seconds_count") == 4
    assert abs(value(metrics, "vllm:inter_token_latency_seconds_sum") - 0.10) < 1e-9
    assert value(metrics, "vllm:inter_token_latency_seconds_bucket", le="0.025") == 3


def test_queue_running_kv_usage_and_preemptions_come_from_the_scheduler() -> None:
    metrics = IngressMetrics(MODEL)
    names = {name for name, _ in samples(metrics)}
    assert "vllm:num_preemptions_total" not in names  # not known before the scheduler answers
    metrics.observe_scheduler(SchedulerStats(3, 1, 4, 25, 100, 7))
    assert value(metrics, "vllm:num_requests_running") == 5  # prefilling and decoding
    assert value(metrics, "vllm:num_requests_waiting") == 3
    assert value(metrics, "vllm:kv_cache_usage_perc") == 0.75
    assert value(metrics, "vllm:num_preemptions_total") == 7
    metrics.observe_scheduler(SchedulerStats(0, 0, 0, 100, 100, 9))
    assert value(metrics, "vllm:kv_cache_usage_perc") == 0.0
    assert value(metrics, "vllm:num_preemptions_total") == 9
