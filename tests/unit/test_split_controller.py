"""The SLO-aware compute-split controller, driven in closed loop by a synthetic plant."""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from duetserve.services.scheduler.split_controller import (
    SplitAction,
    SplitController,
    SplitControllerConfig,
    SplitDecision,
    fit_inverse,
    fit_through_origin,
    joint_attainment,
    percentile,
    prefill_load,
)

S_PER_TOKEN = 1e-4  # the plant's prefill cost on the whole device
ARRIVALS_PER_WINDOW = 10


class Plant:
    """Ground truth: TTFT = 0.2/(x − load) + 0.05 and TPOT = 0.01/y + 0.005, with multiplicative
    Gaussian noise from a seeded RNG. Arrivals carry prompts sized so that λ equals `load`."""

    def __init__(self, noise: float = 0.0, seed: int = 0, load: float = 0.15) -> None:
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.load = load
        self.now = 0.0  # one window is one second

    def ttft(self, x: float) -> float:
        return 10.0 if x - self.load <= 0.01 else 0.2 / (x - self.load) + 0.05

    @staticmethod
    def tpot(y: float) -> float:
        return 0.01 / y + 0.005

    def feed_window(self, controller: SplitController, samples: int, joint: bool = False) -> None:
        """`samples` TTFTs and TPOTs; with `joint`, also as the pairs of `samples` finished
        requests (request i has the i-th of each)."""
        x = controller.split
        ttfts = [
            max(self.ttft(x) * f, 0.0) for f in 1 + self.noise * self.rng.standard_normal(samples)
        ]
        tpots = [
            max(self.tpot(1 - x) * f, 0.0)
            for f in 1 + self.noise * self.rng.standard_normal(samples)
        ]
        for ttft, tpot in zip(ttfts, tpots, strict=True):
            controller.observe_ttft(ttft)
            controller.observe_tpot(tpot)
            if joint:
                controller.observe_finished(ttft, tpot)
        prompt_tokens = round(self.load / (ARRIVALS_PER_WINDOW * S_PER_TOKEN))
        for _ in range(ARRIVALS_PER_WINDOW):
            controller.observe_arrival(prompt_tokens)


def config(**overrides: float | int | None) -> SplitControllerConfig:
    base: dict[str, float | int | None] = {
        "ttft_slo_s": 0.7,
        "tpot_slo_s": 0.035,
        "window_samples": 32,
        "prefill_s_per_token": S_PER_TOKEN,
    }
    return SplitControllerConfig(**{**base, **overrides})  # type: ignore[arg-type]


def run(
    controller: SplitController, plant: Plant, windows: int, joint: bool = False
) -> list[SplitDecision]:
    decisions = []
    for _ in range(windows):
        plant.feed_window(controller, controller.config.window_samples, joint)
        plant.now += 1.0
        decision = controller.maybe_decide(plant.now)
        assert decision is not None
        decisions.append(decision)
    return decisions


def reversals(decisions: list[SplitDecision]) -> int:
    moves = [d.action for d in decisions if d.action is not SplitAction.HOLD]
    return sum(1 for a, b in itertools.pairwise(moves) if a is not b)


# --- pure pieces -----------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    samples = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert percentile(samples, 90) == 9.0
    assert percentile(samples, 70) == 7.0
    assert percentile(samples, 91) == 10.0
    assert percentile(samples, 100) == 10.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([], 90)
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_prefill_load_is_the_share_the_prompts_need() -> None:
    assert prefill_load(10.0, 150.0, 1e-4) == pytest.approx(0.15)


def test_fits_recover_the_plant_from_noiseless_points() -> None:
    plant = Plant(load=0.15)
    xs = [0.3, 0.4, 0.5, 0.6, 0.7]
    ttft = fit_inverse([x - 0.15 for x in xs], [plant.ttft(x) for x in xs])
    tpot = fit_inverse([1 - x for x in xs], [plant.tpot(1 - x) for x in xs])
    assert (ttft.a, ttft.b) == (pytest.approx(0.2, abs=1e-9), pytest.approx(0.05, abs=1e-9))
    assert (tpot.a, tpot.b) == (pytest.approx(0.01, abs=1e-9), pytest.approx(0.005, abs=1e-9))
    assert not ttft.through_origin and ttft.num_points == 5
    assert ttft.predict(0.35) == pytest.approx(plant.ttft(0.5))
    assert ttft.predict(0.005) == math.inf  # no headroom over the load: the queue grows


def test_one_split_falls_back_to_latency_proportional_to_one_over_share() -> None:
    model = fit_inverse([0.4, 0.4], [0.1, 0.3])
    assert model.through_origin and model.b == 0.0
    assert model.a == pytest.approx(0.2 * 0.4)  # mean latency × share
    assert model.predict(0.8) == pytest.approx(0.1)


def test_unphysical_fits_are_pinned_through_the_origin() -> None:
    rising = fit_inverse([0.2, 0.4, 0.6], [1.0, 2.0, 3.0])  # more share, slower: noise
    assert rising.through_origin and rising.a > 0 and rising.b == 0.0
    floor_below_zero = fit_inverse([0.2, 0.5], [0.9, 0.3])  # free fit: a = 0.2, b = -0.1
    assert floor_below_zero.through_origin and floor_below_zero.b == 0.0
    assert floor_below_zero == fit_through_origin([0.2, 0.5], [0.9, 0.3])
    # Every fallback keeps the model monotone: latency never grows with share.
    for model in (rising, floor_below_zero):
        assert model.predict(0.3) >= model.predict(0.6)


# --- one decision ----------------------------------------------------------------------------


def test_only_ttft_missing_moves_share_to_prefill() -> None:
    controller = SplitController(config(initial_split=0.3))
    plant = Plant()
    (decision,) = run(controller, plant, 1)
    assert decision.action is SplitAction.TO_PREFILL
    assert decision.previous_split == 0.3 and decision.split > 0.3 and controller.split > 0.3
    assert decision.ttft_s == pytest.approx(plant.ttft(0.3))
    assert decision.tpot_s == pytest.approx(plant.tpot(0.7))
    assert decision.prefill_load == pytest.approx(0.15)
    assert decision.num_ttft_samples == decision.num_tpot_samples == 32
    assert decision.predicted_ttft_s is not None and decision.predicted_ttft_s <= 0.7
    assert decision.predicted_tpot_s is not None and decision.predicted_tpot_s <= 0.035
    # The one-split prior says a1 = TTFT × (x − λ): it meets 0.7 first at 0.45, not at 0.40.
    assert decision.split == 0.45 and "model meets SLO at split 0.45" in decision.reason
    before, _ = controller.predict(0.40, 0.15)
    assert before is not None and before > 0.7


def test_only_tpot_missing_moves_share_to_decode() -> None:
    controller = SplitController(config(initial_split=0.85))
    (decision,) = run(controller, Plant(), 1)
    assert decision.ttft_s <= 0.7  # ttft holds ...
    assert decision.tpot_s > 0.035  # ... tpot misses
    assert decision.action is SplitAction.TO_DECODE and decision.split < 0.85
    assert decision.predicted_tpot_s is not None and decision.predicted_tpot_s <= 0.035
    assert decision.reason.startswith("tpot misses")


@pytest.mark.parametrize(
    ("ttft_slo", "tpot_slo", "reason"),
    [(0.7, 0.035, "meet"), (0.3, 0.012, "both miss")],  # both hold at 0.5; neither can
)
def test_holds_when_both_meet_and_when_both_miss(
    ttft_slo: float, tpot_slo: float, reason: str
) -> None:
    controller = SplitController(config(ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo))
    decisions = run(controller, Plant(noise=0.05), 20)
    assert all(d.action is SplitAction.HOLD and reason in d.reason for d in decisions)
    assert controller.split == 0.5


# --- closed loop -----------------------------------------------------------------------------


@pytest.mark.parametrize("initial", [0.2, 0.9])
def test_converges_from_a_bad_split_and_stays(initial: float) -> None:
    controller = SplitController(config(initial_split=initial))
    decisions = run(controller, Plant(noise=0.1, seed=3), 120)
    moves = [i for i, d in enumerate(decisions) if d.action is not SplitAction.HOLD]
    assert moves and moves[-1] < 10  # a few moves, early
    assert decisions[0].action is (
        SplitAction.TO_PREFILL if initial < 0.5 else SplitAction.TO_DECODE
    )
    settled = decisions[moves[-1] + 2 :]  # after the cool-down window
    assert all(d.ttft_s <= 0.7 and d.tpot_s <= 0.035 for d in settled)
    assert all(d.split == controller.split for d in settled)
    assert 0.15 + 0.2 / 0.65 <= controller.split <= 1 - 0.01 / 0.03  # inside the plant's band


def narrow_band() -> SplitControllerConfig:
    # Both SLOs hold only for 0.54 <= x <= 0.64 (at p90 the noise lifts both curves a little).
    return config(ttft_slo_s=0.6, tpot_slo_s=0.033, window_samples=16, min_samples=8)


@pytest.mark.parametrize("seed", range(5))
def test_no_oscillation_in_a_narrow_band_under_noise(seed: int) -> None:
    controller = SplitController(narrow_band())
    decisions = run(controller, Plant(noise=0.05, seed=seed), 200)
    assert reversals(decisions) <= 1
    assert sum(d.action is not SplitAction.HOLD for d in decisions) <= 4


def test_without_the_margin_the_same_band_oscillates() -> None:
    # The check above can fail: with no hysteresis margin this run flips back and forth.
    controller = SplitController(dataclasses.replace(narrow_band(), margin=0.0))
    decisions = run(controller, Plant(noise=0.05, seed=0), 200)
    assert reversals(decisions) >= 3


def test_follows_a_rise_in_prefill_load() -> None:
    controller = SplitController(config(ttft_slo_s=0.8, tpot_slo_s=0.04))
    plant = Plant(noise=0.05, seed=1)
    before = run(controller, plant, 30)
    settled_at = controller.split
    plant.load = 0.35
    after = run(controller, plant, 40)
    assert after[0].prefill_load == pytest.approx(0.35)
    assert controller.split > settled_at
    assert all(d.action is not SplitAction.TO_DECODE for d in before + after)
    assert all(d.ttft_s <= 0.8 and d.tpot_s <= 0.04 for d in after[-20:])


def test_stays_within_max_share() -> None:
    # TTFT ≤ 0.3 needs x ≥ 0.95: unreachable inside the bounds; TPOT is loose.
    controller = SplitController(config(ttft_slo_s=0.3, tpot_slo_s=1.0, max_steps=2))
    decisions = run(controller, Plant(), 30)
    assert max(d.split for d in decisions) == controller.split == 0.9
    assert "at max_share" in decisions[-1].reason
    assert decisions[-1].action is SplitAction.HOLD


def test_stays_within_min_share() -> None:
    # TPOT ≤ 0.012 is unreachable; TTFT is loose and the controller knows no prefill cost.
    cfg = config(ttft_slo_s=100.0, tpot_slo_s=0.012, prefill_s_per_token=None, max_steps=2)
    controller = SplitController(cfg)
    decisions = run(controller, Plant(load=0.0), 30)
    assert min(d.split for d in decisions) == controller.split == 0.1
    assert "at min_share" in decisions[-1].reason


def test_never_takes_prefill_below_the_share_its_load_needs() -> None:
    cfg = config(ttft_slo_s=100.0, tpot_slo_s=0.012, max_steps=2)
    controller = SplitController(cfg)
    decisions = run(controller, Plant(load=0.15), 30)
    assert min(d.split for d in decisions) == controller.split == 0.2
    assert decisions[-1].action is SplitAction.HOLD
    assert "ttft past its limit" in decisions[-1].reason


# --- hysteresis, windows, learning -----------------------------------------------------------


def feed(controller: SplitController, ttft: float, tpot: float, n: int = 8) -> None:
    for _ in range(n):
        controller.observe_ttft(ttft)
        controller.observe_tpot(tpot)


def test_a_reversal_needs_clear_headroom_on_the_donor_side() -> None:
    controller = SplitController(
        config(
            ttft_slo_s=1.0,
            tpot_slo_s=0.03,
            window_samples=8,
            cooldown_windows=0,
            prefill_s_per_token=None,
        )
    )
    feed(controller, ttft=1.2, tpot=0.02)
    first = controller.maybe_decide(1.0)
    assert first is not None and first.action is SplitAction.TO_PREFILL
    feed(controller, ttft=0.95, tpot=0.04)  # ttft holds, but within 10% of its SLO
    guarded = controller.maybe_decide(2.0)
    assert guarded is not None and guarded.action is SplitAction.HOLD
    assert "reversal needs ttft headroom" in guarded.reason
    feed(controller, ttft=0.3, tpot=0.04)  # now ttft has room to give
    back = controller.maybe_decide(3.0)
    assert back is not None and back.action is SplitAction.TO_DECODE
    assert back.split < first.split


def test_when_a_move_makes_both_miss_it_goes_back_and_does_not_retry_soon() -> None:
    """What happened live: one noisy TTFT window at a split where both held moved share to
    prefill; there decode fell behind too, and holding on "both miss" kept it there."""
    controller = SplitController(
        config(
            ttft_slo_s=1.0,
            tpot_slo_s=0.05,
            window_samples=8,
            cooldown_windows=0,
            prefill_s_per_token=None,
            recover_block_windows=3,
        )
    )

    def window(now: float, ttft: float, tpot: float) -> SplitDecision:
        feed(controller, ttft=ttft, tpot=tpot)
        decision = controller.maybe_decide(now)
        assert decision is not None
        return decision

    assert window(1, 0.5, 0.03).action is SplitAction.HOLD  # both hold at 0.5
    moved = window(2, 1.3, 0.03)  # one TTFT miss
    assert moved.action is SplitAction.TO_PREFILL and moved.split > 0.5
    back = window(3, 1.5, 0.09)  # there both miss
    assert back.action is SplitAction.TO_DECODE and back.split == 0.5
    assert "back to 0.50, where both held" in back.reason
    blocked = [window(4 + i, 1.3, 0.03) for i in range(3)]  # TTFT misses alone again
    assert all(d.action is SplitAction.HOLD and "blocked" in d.reason for d in blocked)
    assert controller.split == 0.5
    assert window(7, 1.3, 0.03).action is SplitAction.TO_PREFILL  # the block has run out


def test_both_missing_at_the_last_good_split_holds() -> None:
    controller = SplitController(config(window_samples=8, prefill_s_per_token=None))
    for now in (1.0, 2.0):
        feed(controller, ttft=5.0, tpot=0.5)
        decision = controller.maybe_decide(now)
        assert decision is not None and decision.action is SplitAction.HOLD
        assert decision.reason == "ttft and tpot both miss"


def test_an_overloaded_window_is_not_fitted_and_prefill_steps_once() -> None:
    controller = SplitController(config(initial_split=0.15))  # exactly the prefill load
    (decision,) = run(controller, Plant(load=0.15), 1)
    assert controller.ttft_model is None and decision.predicted_ttft_s is None
    assert decision.action is SplitAction.TO_PREFILL and decision.split == 0.2
    assert "no model, one step" in decision.reason


def test_loads_alone_do_not_pin_both_parameters() -> None:
    # Two windows at one split, different loads: the fit stays through the origin.
    controller = SplitController(config(ttft_slo_s=1.0, window_samples=8))
    for now, (prompt_tokens, ttft) in enumerate([(150, 0.5), (100, 0.45)], start=1):
        for _ in range(ARRIVALS_PER_WINDOW):
            controller.observe_arrival(prompt_tokens)
        feed(controller, ttft=ttft, tpot=0.01)
        decision = controller.maybe_decide(float(now))
        assert decision is not None and decision.action is SplitAction.HOLD
    assert [p.prefill_load for p in controller.history] == pytest.approx([0.15, 0.10])
    assert controller.ttft_model is not None and controller.ttft_model.through_origin


def test_the_window_after_a_move_holds_and_is_not_fitted() -> None:
    controller = SplitController(config(initial_split=0.3, cooldown_windows=1))
    decisions = run(controller, Plant(), 2)
    assert decisions[0].action is SplitAction.TO_PREFILL
    assert decisions[1].action is SplitAction.HOLD and "cooldown" in decisions[1].reason
    assert [p.split for p in controller.history] == [0.3]


def test_the_controller_learns_its_models_in_closed_loop() -> None:
    controller = SplitController(config(initial_split=0.2, cooldown_windows=0))
    run(controller, Plant(), 6)
    assert len({p.split for p in controller.history}) >= 2
    ttft, tpot = controller.ttft_model, controller.tpot_model
    assert ttft is not None and tpot is not None
    assert (ttft.a, ttft.b) == (pytest.approx(0.2, abs=1e-6), pytest.approx(0.05, abs=1e-6))
    assert (tpot.a, tpot.b) == (pytest.approx(0.01, abs=1e-6), pytest.approx(0.005, abs=1e-6))


def test_a_window_closes_on_samples_or_on_time_but_never_without_both_series() -> None:
    controller = SplitController(config(window_samples=32, min_samples=4, window_s=2.0))
    for _ in range(40):
        controller.observe_ttft(0.1)
    assert controller.maybe_decide(5.0) is None  # no tpot samples yet
    feed(controller, ttft=0.1, tpot=0.01, n=4)
    decision = controller.maybe_decide(5.0)
    assert decision is not None and decision.num_ttft_samples == 44
    feed(controller, ttft=0.1, tpot=0.01, n=4)
    assert controller.maybe_decide(6.0) is None  # 1 s of 2, 4 samples of 32
    timed = controller.maybe_decide(7.0)
    assert timed is not None and (timed.window_start, timed.window_end) == (5.0, 7.0)


def test_learns_the_prefill_cost_per_token() -> None:
    controller = SplitController(config(prefill_s_per_token=None, history_windows=2))
    controller.observe_prefill_batch(num_tokens=1000, seconds=0.1)  # at share 0.5
    controller.observe_prefill_batch(num_tokens=500, seconds=0.025, share=0.8)
    assert controller.prefill_s_per_token == pytest.approx((0.05 + 0.02) / 1500)
    for _ in range(10):
        controller.observe_arrival(300)
    feed(controller, ttft=0.1, tpot=0.01, n=32)
    decision = controller.maybe_decide(1.0)
    assert decision is not None
    assert decision.prefill_load == pytest.approx(10 * 300 * 0.07 / 1500)
    feed(controller, ttft=0.1, tpot=0.01, n=32)
    assert controller.maybe_decide(2.0) is not None
    assert controller.prefill_s_per_token is None  # the timings aged out of the history


def test_observations_are_checked() -> None:
    controller = SplitController(config())
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            controller.observe_ttft(bad)
    with pytest.raises(ValueError):
        controller.observe_arrival(-1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ttft_slo_s": 0.0}, "slo"),
        ({"tpot_slo_s": -1.0}, "slo"),
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 101.0}, "percentile"),
        ({"min_samples": 40}, "min_samples"),
        ({"window_s": 0.0}, "window_s"),
        ({"min_share": 0.6, "max_share": 0.4}, "min_share"),
        ({"max_share": 1.0}, "max_share"),
        ({"initial_split": 0.95}, "initial_split"),
        ({"step": 0.0}, "step"),
        ({"step": 0.9}, "step"),
        ({"max_steps": 0}, "max_steps"),
        ({"cooldown_windows": -1}, "cooldown_windows"),
        ({"history_windows": 0}, "history_windows"),
        ({"margin": 1.0}, "margin"),
        ({"prefill_s_per_token": 0.0}, "prefill_s_per_token"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**overrides)


# --- joint attainment ------------------------------------------------------------------------


def test_joint_attainment_counts_requests_within_both_limits() -> None:
    outcomes = [(0.5, 0.02), (0.8, 0.02), (0.5, 0.04), (None, 0.02), (0.6, None)]
    assert joint_attainment(outcomes, 0.7, 0.035) == 3 / 5
    # scaled: TTFT x 0.8 brings 0.8 to 0.64; TPOT x 0.8 brings 0.04 to 0.032
    assert joint_attainment(outcomes, 0.7, 0.035, ttft_scale=0.8, tpot_scale=0.8) == 1.0
    assert joint_attainment(outcomes, 0.7, 0.035, ttft_scale=1.2) == 2 / 5  # 0.6 -> 0.72
    with pytest.raises(ValueError):
        joint_attainment([], 0.7, 0.035)


def feed_requests(
    controller: SplitController, outcomes: list[tuple[float, float]], joint: bool = True
) -> SplitDecision:
    """One window of finished requests with these (TTFT, TPOT); decides at its end."""
    for ttft, tpot in outcomes:
        controller.observe_ttft(ttft)
        controller.observe_tpot(tpot)
        if joint:
            controller.observe_finished(ttft, tpot)
    prompt_tokens = round(0.15 / (ARRIVALS_PER_WINDOW * S_PER_TOKEN))  # λ = 0.15, as the Plant
    for _ in range(ARRIVALS_PER_WINDOW):
        controller.observe_arrival(prompt_tokens)
    decision = controller.maybe_decide(1.0)
    assert decision is not None
    return decision


def test_misses_split_between_the_sides_move_the_split_though_each_percentile_holds() -> None:
    # 32 requests: 3 just past the TTFT target, 3 well past the TPOT target. Each side misses
    # 3/32 < 10%, so both percentiles hold, yet only 26/32 = 81% met both.
    outcomes = [(0.707, 0.02)] * 3 + [(0.3, 0.05)] * 3 + [(0.3, 0.02)] * 26
    per_side = feed_requests(SplitController(config()), outcomes, joint=False)
    assert per_side.action is SplitAction.HOLD and per_side.reason.startswith("ttft and tpot meet")
    decision = feed_requests(SplitController(config()), outcomes)
    assert decision.attainment == 26 / 32 and decision.num_finished == 32
    # One step to prefill (x 0.50 -> 0.55, λ 0.15) scales TTFT by 0.35 / 0.40: the three TTFT
    # misses come in, the TPOT ones (x 1.11) stay out, nobody else crosses: 29/32.
    assert decision.action is SplitAction.TO_PREFILL and decision.split == 0.55
    assert decision.predicted_attainment == 29 / 32
    assert decision.reason.startswith("joint attainment 81%")


def test_a_move_that_trades_tpot_for_no_ttft_gain_is_not_taken() -> None:
    # The live failure (docs/benchmarks.md): TTFT's p90 misses by far more than any split
    # within reach recovers, and moving share to prefill would push the requests decoding
    # close to their TPOT target past it. Per side, the controller moves; jointly, it holds.
    outcomes = [(1.5, 0.02)] * 5 + [(0.3, 0.034)] * 3 + [(0.3, 0.02)] * 24
    per_side = feed_requests(SplitController(config()), outcomes, joint=False)
    assert per_side.action is SplitAction.TO_PREFILL and per_side.split > 0.5
    decision = feed_requests(SplitController(config()), outcomes)
    assert decision.attainment == 27 / 32
    assert decision.action is SplitAction.HOLD and decision.split == 0.5
    assert "no split within reach predicts better" in decision.reason


def test_joint_attainment_at_the_goal_holds() -> None:
    outcomes = [(0.8, 0.02)] * 3 + [(0.3, 0.02)] * 29  # 29/32 = 90.6% met both
    decision = feed_requests(SplitController(config()), outcomes)
    assert decision.action is SplitAction.HOLD and decision.attainment == 29 / 32
    assert decision.reason == "joint attainment 91% meets the goal"


@pytest.mark.parametrize("initial", [0.2, 0.9])
def test_joint_converges_from_a_bad_split_and_meets_the_goal(initial: float) -> None:
    controller = SplitController(config(initial_split=initial))
    decisions = run(controller, Plant(noise=0.1, seed=3), 120, joint=True)
    moves = [i for i, d in enumerate(decisions) if d.action is not SplitAction.HOLD]
    assert moves and moves[-1] < 12
    settled = decisions[moves[-1] + 2 :]
    assert settled and all(d.split == controller.split for d in settled)
    mean = sum(d.attainment or 0.0 for d in settled) / len(settled)
    assert mean >= 0.9
    assert 0.15 + 0.2 / 0.65 <= controller.split <= 1 - 0.01 / 0.03


@pytest.mark.parametrize("seed", range(5))
def test_joint_rule_does_not_oscillate_in_a_narrow_band(seed: int) -> None:
    controller = SplitController(narrow_band())
    decisions = run(controller, Plant(noise=0.05, seed=seed), 200, joint=True)
    assert reversals(decisions) <= 2
    assert sum(d.action is not SplitAction.HOLD for d in decisions) <= 6


def test_a_ttft_target_no_split_meets_still_gets_the_share_when_it_costs_nothing() -> None:
    # Every request misses TTFT at every split within reach and meets TPOT with room to spare:
    # no move changes the joint attainment (0%), so the per-side move is taken, as it costs no
    # request its TPOT (the live test in tests/e2e/test_compute_split.py).
    outcomes = [(5.0, 0.005)] * 32
    decision = feed_requests(SplitController(config()), outcomes)
    assert decision.attainment == 0.0
    assert decision.action is SplitAction.TO_PREFILL and decision.split > 0.5
    assert decision.reason.startswith("joint attainment 0% at best the same within reach; ttft")
