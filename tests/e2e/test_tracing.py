"""One request is one trace across all six services (W3C traceparent through NATS)."""

import re
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.model_specs import TINY

SERVICES = ("ingress", "scheduler", "cache_index", "kv_manager", "prefill_worker", "decode_worker")


@pytest.fixture(scope="module")
def traced_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_TRACE_CONSOLE="true"
    )
    yield stack
    assert stop_stack(stack) == 0


def trace_ids(stack: Stack, service: str) -> set[str]:
    """Trace ids of the spans a service printed (the console exporter writes to its log)."""
    log = (stack.var_dir / "logs" / f"{service}.log").read_text()
    return set(re.findall(r'"trace_id": "(0x[0-9a-f]{32})"', log))


def test_one_request_is_one_trace_across_all_six_services(traced_stack: Stack) -> None:
    api = openai.OpenAI(base_url=traced_stack.base_url, api_key="x", max_retries=0, timeout=60)
    before = {service: trace_ids(traced_stack, service) for service in SERVICES}
    api.completions.create(
        model=traced_stack.model_dir.name,
        prompt="The quick brown fox jumps over the lazy dog and keeps running",
        max_tokens=8,
    )
    stop_stack(traced_stack)  # flushes every service's span exporter
    new = {service: trace_ids(traced_stack, service) - before[service] for service in SERVICES}
    ingress_traces = new["ingress"]
    assert ingress_traces, "ingress printed no span"
    shared = set.intersection(*new.values())
    assert shared & ingress_traces, {service: sorted(ids) for service, ids in new.items()}
