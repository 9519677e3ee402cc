"""Duet's per-tenant series: what each tenant was served, how much of it came from a cache,
and how many of its requests met their SLO."""

from prometheus_client.parser import text_string_to_metric_families

from duetserve.proto.scheduling import SchedulerStats, SloKind
from duetserve.services.ingress.attainment import SloOutcome
from duetserve.services.ingress.metrics import IngressMetrics, RequestTiming, combined


def sample(metrics: IngressMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def test_tokens_and_slo_results_are_counted_by_tenant() -> None:
    metrics = IngressMetrics("m")
    metrics.observe_generation(RequestTiming(0.1, 1.0, 100, 20, 80, tenant="acme"))
    metrics.observe_generation(RequestTiming(0.1, 1.0, 50, 5, 0, tenant="acme"))
    metrics.observe_generation(RequestTiming(0.1, 1.0, 30, 7, 16, tenant="globex"))
    metrics.observe_generation(RequestTiming(0.1, 1.0, 999, 9, 0))  # no tenant: not counted
    assert sample(metrics, "duet_tenant_tokens_total", tenant="acme", kind="prompt") == 150
    assert sample(metrics, "duet_tenant_tokens_total", tenant="acme", kind="completion") == 25
    assert sample(metrics, "duet_tenant_tokens_total", tenant="acme", kind="cached") == 80
    assert sample(metrics, "duet_tenant_tokens_total", tenant="globex", kind="cached") == 16
    assert sample(metrics, "duet_ingress_tokens_total", kind="prompt") == 1179  # all of them

    metrics.observe_slo(SloOutcome(SloKind.LATENCY, True, False), "acme")
    metrics.observe_slo(SloOutcome(SloKind.DEADLINE, False, True), "acme")
    metrics.observe_slo(SloOutcome(SloKind.LATENCY, True, False), "globex")
    assert sample(metrics, "duet_tenant_slo_requests_total", tenant="acme", result="met") == 1
    assert sample(metrics, "duet_tenant_slo_requests_total", tenant="acme", result="missed") == 1
    assert sample(metrics, "duet_tenant_slo_requests_total", tenant="globex", result="met") == 1


def test_several_units_stats_are_summed_and_their_splits_averaged() -> None:
    a = SchedulerStats(1, 2, 3, 10, 100, 5, prefill_share=0.2, running_limit=8)
    b = SchedulerStats(4, 0, 1, 30, 50, 1, prefill_share=0.6, decode_free_blocks=7)
    both = combined([a, b])
    assert (both.waiting, both.prefilling, both.decoding) == (5, 2, 4)
    assert (both.free_blocks, both.total_blocks, both.preemptions) == (40, 150, 6)
    assert abs(both.prefill_share - 0.4) < 1e-12
    assert both.running_limit == 8 and both.decode_free_blocks == 7  # only one reports each
    assert both.decode_total_blocks is None  # neither does
    assert combined([a]) == a
