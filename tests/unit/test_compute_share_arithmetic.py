"""The pure arithmetic of compute shares: share checks, MPS percentages, SM splits, core splits
and CPU quotas. No device, no cgroup, no process is touched."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from duetserve.runtime.compute_share.affinity import split_cores
from duetserve.runtime.compute_share.base import (
    InvalidShareError,
    RestartRequiredError,
    check_share,
    prefill_fraction,
    threads_for,
)
from duetserve.runtime.compute_share.cgroup import (
    LATENCY_PERIOD_US,
    CpuQuota,
    cpu_quota,
    quota_files,
)
from duetserve.runtime.compute_share.mps import (
    PERCENT_ENV,
    PIPE_DIR_ENV,
    MpsShare,
    mps_child_env,
    mps_percent,
    mps_pipe_dir,
    parse_percent,
)
from duetserve.runtime.compute_share.sm_split import (
    SmLayout,
    documented_layout,
    layout_from_resource,
    plan_sm_split,
)

H100 = SmLayout(total=132, min_partition=8, alignment=8)
A100 = SmLayout(total=108, min_partition=4, alignment=2)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.0001, math.nan, math.inf])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(InvalidShareError, match="fraction of the device"):
        check_share(share)


def test_both_workers_derive_the_same_prefill_fraction() -> None:
    assert prefill_fraction("prefill", 0.6) == 0.6
    assert prefill_fraction("decode", 0.4) == 0.6
    assert prefill_fraction("decode", 0.3) == 0.7  # 1 - 0.3 is 0.7000000000000001 unrounded
    assert prefill_fraction("decode", 1.0) == 0.0


def test_threads_cover_a_fractional_quota() -> None:
    assert threads_for(0.75, 2) == 2  # 1.5 cores need 2 threads
    assert threads_for(0.5, 2) == 1
    assert threads_for(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004
    assert threads_for(0.01, 4) == 1
    assert threads_for(1.0, 2) == 2


def test_mps_percent_rounds_and_clamps() -> None:
    assert mps_percent(0.6) == 60
    assert mps_percent(0.125) == 13  # halves go up
    assert mps_percent(0.004) == 1  # never below 1
    assert mps_percent(0.999) == 100
    assert mps_percent(1.0) == 100
    with pytest.raises(InvalidShareError):
        mps_percent(0.0)


def test_mps_child_env_adds_the_percentage_and_keeps_the_rest() -> None:
    base = {"PATH": "/usr/bin", PERCENT_ENV: "90"}
    env = mps_child_env(0.35, base, pipe_dir=None)
    assert env == {"PATH": "/usr/bin", PERCENT_ENV: "35"}
    assert base[PERCENT_ENV] == "90"  # the caller's mapping is not touched
    with_pipe = mps_child_env(0.5, {}, pipe_dir=Path("/run/mps"))
    assert with_pipe == {PERCENT_ENV: "50", PIPE_DIR_ENV: "/run/mps"}
    assert mps_pipe_dir({PIPE_DIR_ENV: "/run/mps"}) == Path("/run/mps")
    assert mps_pipe_dir({}) == Path("/tmp/nvidia-mps")


def test_parse_percent() -> None:
    assert parse_percent(None) is None
    assert parse_percent(" ") is None
    assert parse_percent("40") == 40
    for bad in ("0", "101", "forty"):
        with pytest.raises(InvalidShareError, match=PERCENT_ENV):
            parse_percent(bad)


def test_mps_share_accepts_its_own_percentage_and_asks_for_a_restart_otherwise() -> None:
    share = MpsShare("decode", started_percent=40)
    assert share.in_place is False
    applied = share.apply(0.4)
    assert (applied.amount, applied.unit, applied.given) == (40, "percent", 0.4)
    with pytest.raises(RestartRequiredError, match=r"runs at 40%.*needs 60%") as caught:
        share.apply(0.6)
    assert caught.value.env_update == {PERCENT_ENV: "60"}
    unlimited = MpsShare("prefill", started_percent=None)
    assert unlimited.apply(1.0).amount == 100
    with pytest.raises(RestartRequiredError):
        unlimited.apply(0.5)
    share.close()
    share.close()


def test_sm_split_on_an_h100_layout() -> None:
    assert plan_sm_split(0.6, H100) == (80, 52, True)  # 79.2 SMs -> 10 groups of 8
    assert plan_sm_split(0.5, H100) == (64, 68, True)  # 66 SMs = 8.25 groups -> 8
    assert plan_sm_split(0.01, H100) == (8, 124, True)  # at least one minimum partition
    assert plan_sm_split(0.99, H100) == (120, 12, True)  # decode keeps at least 8
    assert plan_sm_split(1.0, H100) == (132, 132, False)
    assert plan_sm_split(0.0, H100) == (132, 132, False)


def test_sm_split_on_an_a100_layout_uses_its_finer_granularity() -> None:
    assert plan_sm_split(0.5, A100) == (54, 54, True)
    assert plan_sm_split(0.33, A100) == (36, 72, True)  # 35.6 SMs -> 18 pairs
    assert plan_sm_split(0.01, A100) == (4, 104, True)


def test_a_device_too_small_for_two_partitions_is_not_split() -> None:
    assert plan_sm_split(0.5, SmLayout(total=12, min_partition=8, alignment=8)) == (12, 12, False)


@pytest.mark.parametrize("layout", [H100, A100, SmLayout(78, 8, 8), SmLayout(16, 2, 2)])
def test_sm_split_invariants(layout: SmLayout) -> None:
    for step in range(1, 100):
        share = step / 100
        plan = plan_sm_split(share, layout)
        assert plan.split
        assert plan.prefill_sms + plan.decode_sms == layout.total
        assert plan.prefill_sms % layout.alignment == 0
        assert plan.prefill_sms >= layout.min_partition
        assert plan.decode_sms >= layout.min_partition
        lowest = math.ceil(layout.min_partition / layout.alignment) * layout.alignment
        highest = (layout.total - layout.min_partition) // layout.alignment * layout.alignment
        if lowest < share * layout.total < highest:  # not clamped: within half a step
            assert abs(plan.prefill_sms - share * layout.total) <= layout.alignment / 2


def test_documented_layouts_by_architecture() -> None:
    assert documented_layout(132, 9) == SmLayout(132, 8, 8)
    assert documented_layout(148, 10) == SmLayout(148, 8, 8)
    assert documented_layout(108, 8) == SmLayout(108, 4, 2)
    assert documented_layout(80, 7) == SmLayout(80, 2, 2)
    assert documented_layout(56, 6) == SmLayout(56, 1, 1)


def test_layout_prefers_what_the_driver_reports() -> None:
    reported = SimpleNamespace(smCount=132, minSmPartitionSize=4, smCoscheduledAlignment=4)
    assert layout_from_resource(reported, 9) == SmLayout(132, 4, 4)
    zeros = SimpleNamespace(smCount=132, minSmPartitionSize=0, smCoscheduledAlignment=0)
    assert layout_from_resource(zeros, 9) == SmLayout(132, 8, 8)
    absent = SimpleNamespace(smCount=108)  # an older cuda-python without the fields
    assert layout_from_resource(absent, 8) == SmLayout(108, 4, 2)


def test_core_split_on_one_and_two_cores() -> None:
    assert split_cores(0.5, [0]) == ((0,), (0,), True)  # one core: both share it
    for share in (0.01, 0.5, 0.99):  # two cores: the only split there is
        assert split_cores(share, [0, 1]) == ((0,), (1,), False)


def test_core_split_on_more_cores() -> None:
    assert split_cores(0.6, [4, 5, 6, 7]) == ((4, 5), (6, 7), False)  # 2.4 cores -> 2
    assert split_cores(0.0625, range(8)) == ((0,), (1, 2, 3, 4, 5, 6, 7), False)  # 0.5 -> 1
    assert split_cores(0.95, range(8)).decode == (7,)  # decode keeps a core
    assert split_cores(0.5, [3, 1, 2, 0, 1]) == ((0, 1), (2, 3), False)  # sorted, no repeats
    assert split_cores(1.0, [0, 1]) == ((0, 1), (0, 1), True)
    with pytest.raises(InvalidShareError):
        split_cores(0.5, [])


def test_cpu_quota() -> None:
    assert cpu_quota(0.75, 2) == CpuQuota(150_000, 100_000)
    assert cpu_quota(0.75, 2).cores == 1.5
    assert cpu_quota(0.3, 2, LATENCY_PERIOD_US) == CpuQuota(12_000, 20_000)
    assert cpu_quota(0.001, 1) == CpuQuota(1_000, 100_000)  # the kernel's 1 ms minimum
    with pytest.raises(InvalidShareError, match="CFS period"):
        cpu_quota(0.5, 2, period_us=999)
    with pytest.raises(InvalidShareError, match="at least one core"):
        cpu_quota(0.5, 0)


def test_quota_files_for_both_cgroup_versions() -> None:
    quota = CpuQuota(60_000, 100_000)
    assert quota_files(1, quota) == [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "60000")]
    assert quota_files(2, quota) == [("cpu.max", "60000 100000")]
    unlimited = CpuQuota(None, 100_000)
    assert quota_files(1, unlimited)[1] == ("cpu.cfs_quota_us", "-1")
    assert quota_files(2, unlimited) == [("cpu.max", "max 100000")]
