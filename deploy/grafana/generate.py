"""Duet's Grafana dashboards, written from this one description (the JSON beside it is its
output: `python deploy/grafana/generate.py` rewrites it, `--check` fails if it is stale).

`duet-unit.json` charts one Duet deployment as operators chart vLLM (the `vllm:` series:
queue, KV usage, latencies, throughput, prefix-cache hits, finishes, preemptions) and what
only Duet has (SLO attainment by kind, the compute split, the host tier, the semantic cache,
per-tenant service, cache hits and attainment, restarts, quota refusals). Every query names
series ingress's /metrics exports; tests/unit/test_dashboards.py checks that.

Standard library only: it runs anywhere the repository is checked out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources names it
MODEL = 'model_name=~"$model_name"'
RATE = "$__rate_interval"
WIDTH, HEIGHT = 12, 8


def quantiles(metric: str) -> list[tuple[str, str]]:
    """p50, p90 and p99 of a histogram over the last rate interval."""
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{MODEL}}}[{RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


def ratio(part: str, whole: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({part}[{RATE}])) / sum{group} (rate({whole}[{RATE}]))"


# (title, unit, [(query, legend)]), in rows of two.
VLLM_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Requests running and waiting",
        "short",
        [
            (f"sum(vllm:num_requests_running{{{MODEL}}})", "running"),
            (f"sum(vllm:num_requests_waiting{{{MODEL}}})", "waiting"),
        ],
    ),
    ("KV cache usage", "percentunit", [(f"max(vllm:kv_cache_usage_perc{{{MODEL}}})", "used")]),
    ("Time to first token", "s", quantiles("vllm:time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("vllm:inter_token_latency_seconds")),
    ("End-to-end request latency", "s", quantiles("vllm:e2e_request_latency_seconds")),
    (
        "Token throughput",
        "short",
        [
            (f"sum(rate(vllm:prompt_tokens_total{{{MODEL}}}[{RATE}]))", "prompt tokens/s"),
            (
                f"sum(rate(vllm:generation_tokens_total{{{MODEL}}}[{RATE}]))",
                "generation tokens/s",
            ),
        ],
    ),
    (
        "Prefix cache hit rate (tokens)",
        "percentunit",
        [
            (
                ratio(
                    f"vllm:prefix_cache_hits_total{{{MODEL}}}",
                    f"vllm:prefix_cache_queries_total{{{MODEL}}}",
                ),
                "hit rate",
            )
        ],
    ),
    (
        "Finished requests by reason",
        "reqps",
        [
            (
                f"sum by (finished_reason) (rate(vllm:request_success_total{{{MODEL}}}[{RATE}]))",
                "{{finished_reason}}",
            )
        ],
    ),
    (
        "Preemptions",
        "short",
        [(f"sum(increase(vllm:num_preemptions_total{{{MODEL}}}[{RATE}]))", "preemptions")],
    ),
    (
        "Prompt and output lengths (p50)",
        "short",
        [
            (
                f"histogram_quantile(0.5, sum by (le) "
                f"(rate(vllm:request_prompt_tokens_bucket{{{MODEL}}}[{RATE}])))",
                "prompt",
            ),
            (
                f"histogram_quantile(0.5, sum by (le) "
                f"(rate(vllm:request_generation_tokens_bucket{{{MODEL}}}[{RATE}])))",
                "output",
            ),
        ],
    ),
]

DUET_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "SLO attainment by kind",
        "percentunit",
        [
            (
                ratio(
                    'duet_ingress_slo_requests_total{result="met"}',
                    "duet_ingress_slo_requests_total",
                    "kind",
                ),
                "{{kind}}",
            )
        ],
    ),
    (
        "Compute split (prefill's share) and its moves",
        "short",
        [
            ("duet_compute_prefill_share", "prefill share"),
            (f"delta(duet_compute_split_moves[{RATE}])", "moves"),
        ],
    ),
    (
        "Host tier: swaps and blocks loaded back",
        "short",
        [
            (f"delta(duet_scheduler_swaps[{RATE}])", "swaps {{direction}}"),
            (f"delta(duet_kv_host_tier_blocks[{RATE}])", "blocks {{kind}}"),
        ],
    ),
    (
        "Semantic cache lookups",
        "reqps",
        [
            (
                f"sum by (result) (rate(duet_semantic_cache_lookups_total[{RATE}]))",
                "{{result}}",
            )
        ],
    ),
    (
        "Output tokens by tenant",
        "short",
        [
            (
                f'sum by (tenant) (rate(duet_tenant_tokens_total{{kind="completion"}}[{RATE}]))',
                "{{tenant}}",
            )
        ],
    ),
    (
        "Prompt cache hit rate by tenant",
        "percentunit",
        [
            (
                ratio(
                    'duet_tenant_tokens_total{kind="cached"}',
                    'duet_tenant_tokens_total{kind="prompt"}',
                    "tenant",
                ),
                "{{tenant}}",
            )
        ],
    ),
    (
        "SLO attainment by tenant",
        "percentunit",
        [
            (
                ratio(
                    'duet_tenant_slo_requests_total{result="met"}',
                    "duet_tenant_slo_requests_total",
                    "tenant",
                ),
                "{{tenant}}",
            )
        ],
    ),
    (
        "Quota refusals by tenant",
        "reqps",
        [
            (
                f"sum by (tenant, limit) (rate(duet_ingress_quota_refusals_total[{RATE}]))",
                "{{tenant}} {{limit}}",
            )
        ],
    ),
    (
        "Service restarts",
        "short",
        [(f"sum by (service) (increase(duet_service_restarts_total[{RATE}]))", "{{service}}")],
    ),
    (
        "Requests in flight at ingress",
        "short",
        [("sum(duet_ingress_requests_in_flight)", "in flight")],
    ),
    (
        "Units: live, and each one's load as ingress routes by it",
        "short",
        [
            ("max(duet_units_live)", "live units"),
            ("max by (unit) (duet_unit_load)", "{{unit}}"),
        ],
    ),
]


def _panel(
    number: int, y: int, x: int, title: str, unit: str, queries: list[tuple[str, str]]
) -> dict[str, Any]:
    return {
        "id": number,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": q,
                "legendFormat": legend,
            }
            for i, (q, legend) in enumerate(queries)
        ],
    }


def _row(number: int, y: int, title: str) -> dict[str, Any]:
    return {
        "id": number,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }


def unit_dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, group in (("Serving (vLLM's metrics)", VLLM_PANELS), ("Duet", DUET_PANELS)):
        panels.append(_row(len(panels) + 1, y, title))
        y += 1
        for i, (name, unit, queries) in enumerate(group):
            x = WIDTH * (i % 2)
            panels.append(_panel(len(panels) + 1, y, x, name, unit, queries))
            if i % 2 == 1 or i == len(group) - 1:
                y += HEIGHT
    return {
        "uid": "duet-unit",
        "title": "Duet",
        "tags": ["duet", "vllm", "llm-serving"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "model_name",
                    "label": "Model",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": "label_values(vllm:num_requests_running, model_name)",
                        "refId": "model_name",
                    },
                    "definition": "label_values(vllm:num_requests_running, model_name)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "current": {"text": "All", "value": "$__all"},
                }
            ]
        },
        "panels": panels,
    }


def render() -> dict[str, str]:
    """File name -> its JSON text."""
    return {"duet-unit.json": json.dumps(unit_dashboard(), indent=2) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = DASHBOARDS / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run python deploy/grafana/generate.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
