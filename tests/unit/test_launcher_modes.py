"""What each DUET_MODE starts, and the threads each process gets."""

import os

import pytest
from pydantic import ValidationError

from duetserve.services.launcher.launcher import (
    SERVICES,
    SIDE_BY_SIDE_SPINS,
    compute_threads,
    services_for,
)
from duetserve.services.launcher.settings import LauncherSettings


def test_semi_pd_starts_six_services_and_unified_no_decode_worker() -> None:
    assert services_for("semi-pd") == SERVICES
    assert "decode_worker" in SERVICES
    unified = services_for("unified")
    assert "decode_worker" not in unified and "prefill_worker" in unified
    assert unified[-1] == "ingress"  # still last: nothing is accepted before the worker is up


def test_workers_share_the_cores_in_semi_pd_and_the_one_worker_has_them_all_in_unified() -> None:
    cores = os.cpu_count() or 2
    half = str(max(1, cores // 2))
    side_by_side = {"OMP_NUM_THREADS": half, "GOMP_SPINCOUNT": str(SIDE_BY_SIDE_SPINS)}
    assert compute_threads("prefill_worker", {}, "semi-pd") == side_by_side
    assert compute_threads("decode_worker", {}, "semi-pd") == side_by_side
    assert compute_threads("prefill_worker", {}, "unified") == {"OMP_NUM_THREADS": str(cores)}
    assert compute_threads("ingress", {}, "unified") == {"OMP_NUM_THREADS": "1"}
    assert compute_threads("ingress", {}, "semi-pd") == {"OMP_NUM_THREADS": "1"}
    assert compute_threads("prefill_worker", {"OMP_NUM_THREADS": "3"}, "unified") == {}
    set_by_hand = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert compute_threads("decode_worker", set_by_hand, "semi-pd") == {}
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}  # no spin count beside it: libgomp ignores it
    assert compute_threads("decode_worker", passive, "semi-pd") == {"OMP_NUM_THREADS": half}


def test_disagg_starts_both_workers_on_half_the_cores_each() -> None:
    assert services_for("disagg") == SERVICES
    half = str(max(1, (os.cpu_count() or 2) // 2))
    for worker in ("prefill_worker", "decode_worker"):
        assert compute_threads(worker, {}, "disagg") == {
            "OMP_NUM_THREADS": half,
            "GOMP_SPINCOUNT": str(SIDE_BY_SIDE_SPINS),
        }


def test_an_unknown_mode_is_refused() -> None:
    assert LauncherSettings(mode="disagg").mode == "disagg"
    with pytest.raises(ValidationError):
        LauncherSettings(mode="colocated")  # type: ignore[arg-type]
