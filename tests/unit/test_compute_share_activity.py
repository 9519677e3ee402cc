"""The work-conserving thread count: each of a unit's two workers takes every core while the
other has no work, and its part of them (the two adding up to the cores) while both have."""

from pathlib import Path

import pytest

from duetserve.runtime.compute_share.activity import (
    UnitActivity,
    activity_path,
    remove_activity,
    split_threads,
)


@pytest.mark.parametrize(
    ("prefill_share", "cores", "prefill", "decode"),
    [
        (0.5, 2, 1, 1),
        (0.85, 2, 1, 1),
        (0.15, 2, 1, 1),
        (0.5, 8, 4, 4),
        (0.8, 8, 6, 2),
        (0.5, 1, 1, 1),
    ],
)
def test_both_busy_the_threads_follow_the_split_and_add_up_to_the_cores(
    prefill_share: float, cores: int, prefill: int, decode: int
) -> None:
    assert split_threads("prefill", prefill_share, cores) == prefill
    assert split_threads("decode", 1.0 - prefill_share, cores) == decode
    if cores > 1:
        assert prefill + decode == cores


def test_a_worker_takes_every_core_while_the_other_has_no_work(tmp_path: Path) -> None:
    path = tmp_path / "unit.activity"
    prefill = UnitActivity.open(path, "prefill", cores=8)
    decode = UnitActivity.open(path, "decode", cores=8)  # the same 8 bytes, mapped twice
    assert prefill.threads(0.75) == 8 and decode.threads(0.25) == 8
    decode.set_active(True)
    assert prefill.threads(0.75) == 6  # decode has work: prefill keeps to its part
    assert decode.threads(0.25) == 8  # prefill has none: decode may take them all
    prefill.set_active(True)
    assert decode.threads(0.25) == 2
    decode.close()  # a worker that stops has no work any more
    assert prefill.threads(0.75) == 8
    prefill.close()
    prefill.close()  # twice is harmless


def test_a_worker_started_again_starts_idle(tmp_path: Path) -> None:
    path = tmp_path / "unit.activity"
    decode = UnitActivity.open(path, "decode", cores=2)
    decode.set_active(True)
    again = UnitActivity.open(path, "decode", cores=2)  # its replacement, same file
    prefill = UnitActivity.open(path, "prefill", cores=2)
    assert prefill.threads(0.5) == 2
    for activity in (decode, again, prefill):
        activity.close()


def test_the_file_sits_beside_the_region_and_goes_with_it() -> None:
    path = activity_path("duet-test-activity-region")
    assert path == Path("/dev/shm/duet-test-activity-region.activity")
    UnitActivity.open(path, "prefill", cores=2).close()
    assert path.exists()
    remove_activity("duet-test-activity-region")
    assert not path.exists()
    remove_activity("duet-test-activity-region")  # already gone: nothing to do
