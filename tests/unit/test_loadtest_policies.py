"""The policy benchmark's workload (loadtest/policies.py): held-out questions, SLO kinds in
thirds, compound groups of a stated size, one max_tokens for all, seeded by index."""

import argparse
from collections import Counter

from duetserve.loadtest.length_train import held_out
from duetserve.loadtest.policies import GROUP_SIZE, Point, PolicyRun, report, workload
from tests.conftest import ModelDirs
from tests.model_specs import TINY


def test_the_workload_keeps_true_lengths_from_the_server(model_dirs: ModelDirs) -> None:
    args = argparse.Namespace(max_tokens=300, deadline_ms=9000.0, group_deadline_ms=20000.0)
    specs = workload(model_dirs.get(TINY), 20, 4.0, 0, args)
    assert len(specs) == 20 and {s.output_tokens for s in specs} == {300}
    assert all(isinstance(s.prompt, str) and held_out(s.prompt.strip()) for s in specs)
    assert [s.seed for s in specs] == [s.index for s in specs] == list(range(20))
    kinds = Counter(s.slo.kind for s in specs if s.slo is not None)
    assert kinds == {"latency": 7, "deadline": 7, "compound": 6}
    groups = Counter(s.slo.group for s in specs if s.slo is not None and s.slo.group)
    assert sorted(groups.values()) == [GROUP_SIZE, GROUP_SIZE]
    assert all(s.slo.group_size == GROUP_SIZE for s in specs if s.slo and s.slo.group)
    assert all(s.expected_output_tokens is None for s in specs)  # no oracle unless asked


def test_the_report_has_a_column_per_policy_and_a_row_per_rate() -> None:
    point = Point(4.0, 0.9, 3.6, 1200.0, {"latency": 0.95, "deadline": 0.9}, 0, 210.0)
    run = PolicyRun("x86_64, 2 cores", "now", "cmd", "m", 100, 512, 10_000.0, 20_000.0)
    run.policies = {"fcfs": [point], "jitserve": [point]}
    text = report(run)
    assert "| req/s | fcfs | jitserve |" in text
    assert "| 4 | 90% (95% / 90% / 0%); 3.60 req/s, 1200 tok/s |" in text
