"""The scheduler's rule for preempting by swap (to the host tier) or by recompute."""

from duetserve.services.scheduler.core import SWAP_S_PER_TOKEN_PRIOR, SwapStats, prefer_swap


def test_preemption_swaps_when_a_copy_out_and_back_costs_less_than_recomputing() -> None:
    assert prefer_swap(500, swap_s_per_token=2e-6, prefill_s_per_token=5e-4)  # a CPU: swap
    assert not prefer_swap(500, swap_s_per_token=3e-4, prefill_s_per_token=5e-4)  # 2x the copy
    assert prefer_swap(10, 2e-6, None)  # nothing measured yet
    assert not prefer_swap(0, 2e-6, 5e-4)  # nothing to keep
    stats = SwapStats()
    stats.observe(tokens=1000, seconds=0.01)  # 10 us a token: the average moves towards it
    assert stats.swapped_out == 1
    assert SWAP_S_PER_TOKEN_PRIOR < stats.s_per_token < 1e-5
