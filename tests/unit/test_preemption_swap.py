"""The scheduler's rule for preempting by swap (to the host tier) or by recompute."""

from duetserve.services.scheduler.core import SWAP_S_PER_TOKEN_PRIOR, SwapStats, prefer_swap


def test_preemption_swaps_when_a_copy_out_and_back_costs_less_than_recomputing() -> None:
    assert prefer_swap(500, swap_s_per_token=2e-6, prefill_s_per_token=5e-4)  # a CPU: swap
    assert not prefer_swap(500, swap_s_per_token=3e-4, prefill_s_per_token=5e-4)  # 2x the copy
    assert prefer_swap(10, 2e-6, None)  # nothing measured yet
    assert not prefer_swap(0, 2e-6, 5e-4)  # nothing to keep
    # Its host copy holds most of it already: only the rest goes out, all of it comes back.
    assert not prefer_swap(500, 3e-4, 5e-4, kept_tokens=100)  # 900 tokens' copies: dearer
    assert prefer_swap(500, 3e-4, 5e-4, kept_tokens=400)  # 600 tokens' copies: cheaper
    stats = SwapStats()
    stats.observe(tokens=1000, seconds=0.01)  # 10 us a token: the average moves towards it
    assert stats.swapped_out == 1
    assert SWAP_S_PER_TOKEN_PRIOR < stats.s_per_token < 1e-5
    stats.observe(tokens=32, seconds=0.001, blocks=2, kept=5)
    assert (stats.swapped_out, stats.blocks_out, stats.blocks_kept) == (2, 2, 5)


def test_a_swapped_request_comes_back_only_with_a_block_to_spare_per_decoding_request() -> None:
    from duetserve.services.scheduler.planner import Planner, PlannerConfig
    from duetserve.services.scheduler.policy import make_policy
    from duetserve.services.scheduler.state import Phase, SeqState, UnitView

    decoding = [
        SeqState(f"d{i}", 0.0, 32, 100, num_computed=32, phase=Phase.DECODING) for i in range(3)
    ]
    back = SeqState("back", 1.0, 64, 100, swapped=True)  # 4 blocks of 16
    planner = Planner(PlannerConfig(block_size=16), make_policy("fcfs"))
    tight = UnitView(free_blocks=6, total_blocks=64, waiting=[back], decoding=decoding)
    assert planner.plan(tight, 2.0).admit == ()  # 4 + 3 spare > 6
    roomy = UnitView(free_blocks=7, total_blocks=64, waiting=[back], decoding=decoding)
    assert [a.request_id for a in planner.plan(roomy, 2.0).admit] == ["back"]
    # A recomputed one needs no spare: its prefill comes first.
    fresh = SeqState("fresh", 1.0, 64, 100)
    again = UnitView(free_blocks=4, total_blocks=64, waiting=[fresh], decoding=decoding)
    assert [a.request_id for a in planner.plan(again, 2.0).admit] == ["fresh"]
