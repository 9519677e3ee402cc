"""The fault suite's short form (the whole suite: `make faults`, docs/reliability.md): under a
steady load, a killed prefill worker and a killed nats-server leave no request hanging, no
block leaked or written while free, and the stack serving again."""

from pathlib import Path

from duetserve.loadtest.faults import Load, run_suite
from tests.conftest import ModelDirs
from tests.model_specs import TINY


def test_no_request_hangs_and_no_block_leaks_when_a_worker_or_nats_dies(
    model_dirs: ModelDirs, tmp_path: Path
) -> None:
    load = Load(clients=3, max_tokens=24, duration_s=10.0, fault_at_s=3.0, hang_s=60.0)
    results = run_suite(
        ["kill-prefill-worker", "kill-nats-server"],
        load,
        tmp_path / "var",
        model_dirs.get(TINY),
        print,
        {
            "DUET_MODE": "semi-pd",
            "DUET_DTYPE": "float32",
            "DUET_KV_CACHE_MB": "64",
            "DUET_ADMISSION": "queue",
        },
    )
    assert [r.fault for r in results] == ["kill-prefill-worker", "kill-nats-server"]
    for result in results:
        assert result.in_flight > 0, result  # the fault struck requests in flight
        assert result.hung == 0, result
        assert result.leaked_blocks == 0, result
        assert result.stale_writes == 0, result
        assert result.records_left == 0, result  # the scheduler waits on nothing
        assert result.differing == 0, result  # a completed answer is the undisturbed one
        assert result.serves_again_s is not None, result
    prefill, nats = results
    assert prefill.in_flight_completed == prefill.in_flight  # prefilled again elsewhere
    assert nats.serves_again_s is not None and nats.serves_again_s <= 10.0
