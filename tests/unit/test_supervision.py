"""What the launcher restarts, when, and with what (services/launcher/supervision.py), and the
restart counts ingress serves at /metrics."""

from pathlib import Path

from duetserve.proto.codec import decode, encode
from duetserve.proto.supervision import SupervisorReport
from duetserve.services.ingress.metrics import IngressMetrics
from duetserve.services.launcher.launcher import SERVICES, remove_stale_segments
from duetserve.services.launcher.supervision import Backoff, crashed, restart_group


def test_exit_zero_is_the_services_own_decision_and_anything_else_a_crash() -> None:
    assert not crashed(0)
    assert crashed(1)
    assert crashed(-9)  # SIGKILL
    assert crashed(-15)  # a SIGTERM it did not handle


def test_kv_manager_restarts_with_every_service_that_uses_its_memory() -> None:
    assert restart_group("kv_manager", SERVICES) == (
        "kv_manager",
        "cache_index",
        "scheduler",
        "prefill_worker",
        "decode_worker",
    )
    unified = tuple(s for s in SERVICES if s != "decode_worker")
    assert "decode_worker" not in restart_group("kv_manager", unified)
    for service in ("ingress", "scheduler", "decode_worker", "cache_index"):
        assert restart_group(service, SERVICES) == (service,)


def test_backoff_doubles_to_its_ceiling_and_starts_over_after_a_long_run() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0, reset_after_s=60.0)
    delays = [backoff.delay("scheduler", ran_s=1.0) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay("decode_worker", ran_s=1.0) == 0.5  # per service
    assert backoff.delay("scheduler", ran_s=61.0) == 0.5


def test_stale_segments_of_a_crashed_kv_manager_are_removed_and_no_others(tmp_path: Path) -> None:
    left = ["duet-unit0-424", "duet-unit0-424.activity", "duet-unit0-7"]
    for name in ("duet-unit0-4242", "duet-unit0-4242.activity", "duet-unit0-4242-decode", *left):
        (tmp_path / name).write_bytes(b"x")
    remove_stale_segments(4242, None, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    for name in ("mine", "mine.activity", "mine-decode"):
        (tmp_path / name).write_bytes(b"x")
    remove_stale_segments(1, "mine", tmp_path)  # DUET_REGION names them
    assert sorted(p.name for p in tmp_path.iterdir()) == left


def test_ingress_serves_the_launchers_restart_counts() -> None:
    metrics = IngressMetrics("tiny")
    assert b"duet_service_restarts_total{" not in metrics.render()  # no launcher reported
    report = SupervisorReport("launcher-1", {"decode_worker": 2, "nats-server": 1}, {})
    metrics.restarts.report = decode(encode(report), SupervisorReport)
    text = metrics.render().decode()
    assert 'duet_service_restarts_total{service="decode_worker"} 2.0' in text
    assert 'duet_service_restarts_total{service="nats-server"} 1.0' in text
