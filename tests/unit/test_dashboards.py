"""The Grafana dashboards in deploy/grafana chart only what Duet exports: every series a query
names is one ingress's /metrics has (an operator never sees an empty panel for a typo or a
renamed metric), the JSON is its generator's output, and the provisioning, Prometheus and
docker-compose agree on where the data comes from."""

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from duetserve.proto.scheduling import SchedulerStats
from duetserve.services.ingress.metrics import IngressMetrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
_NOT_NAMES = {"and", "or", "unless", "bool", "offset"}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported() -> set[str]:
    """Every series name ingress's /metrics can show (histograms with their suffixes)."""
    metrics = IngressMetrics("m")
    metrics.observe_scheduler(SchedulerStats(0, 0, 0, 1, 1, 0))
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def series_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or variables)."""
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[match.end() :].lstrip().startswith("(") or match.group() in _NOT_NAMES:
            continue
        names.add(match.group())
    return names


def dashboards() -> list[dict[str, Any]]:
    paths = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert paths
    return [json.loads(p.read_text()) for p in paths]


def test_the_parser_finds_series_and_skips_functions_labels_and_variables() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(vllm:ttft_bucket{model_name=~"$m"}'
        "[$__rate_interval]))) / on (job) group_left duet_x + bool_metric"
    )
    assert series_in(expr) == {"vllm:ttft_bucket", "group_left", "duet_x", "bool_metric"}


def test_the_committed_dashboards_are_the_generators_output() -> None:
    assert generator().main(["--check"]) == 0


def test_every_query_names_a_series_duet_exports() -> None:
    known = exported()
    assert {"vllm:num_requests_running", "duet_ingress_ttft_seconds_bucket"} <= known
    for dashboard in dashboards():
        queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        queries += [v["definition"] for v in dashboard["templating"]["list"]]
        assert len(queries) > 20
        for query in queries:
            named = series_in(query.replace("label_values(", "label_values_("))
            named.discard("model_name")  # label_values(series, label): the label
            assert named, query
            assert named <= known, (query, named - known)


def test_panels_use_the_provisioned_data_source_and_do_not_overlap() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    for dashboard in dashboards():
        taken: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == source["uid"]
                assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
            g = panel["gridPos"]
            cells = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
            assert not cells & taken, panel["title"]
            assert g["x"] + g["w"] <= 24
            taken |= cells


def test_prometheus_scrapes_ingress_where_compose_runs_it() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["ingress:8000"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["ingress"]["environment"]["DUET_PORT"] == "8000"
    mounts = services["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/duet.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("name", ["duet-unit.json"])
def test_each_dashboard_has_its_model_variable(name: str) -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / name).read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["model_name"]
