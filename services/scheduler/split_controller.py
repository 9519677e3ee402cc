"""The unit's SLO-aware compute-split controller (semi-PD's Algorithm 1): pure, no I/O, no clock.

The prefill worker runs on a share x of the device and the decode worker on y = 1 − x; the
controller owns x (`split`). The service feeds it latency samples (TTFT per first token, TPOT
per finished request), each finished request's pair of them, arrivals (prompt tokens to compute)
and optionally prefill batch timings, and calls `maybe_decide(now)`. When a window is
complete the controller measures both latencies at its percentile, refits its models and returns
a `SplitDecision`; the service applies the new split and turns the decision into metrics and
trace events.

Window. A window closes when both series hold at least `min_samples` samples and either series
holds `window_samples` samples or `window_s` seconds have passed. A decision therefore always
rests on both measurements.

Percentile. Nearest rank: the measured p90 is at most the SLO exactly when at least 90% of the
window's samples met it.

Models, over the last `history_windows` fitted windows (split x, load λ, measured latencies):
    TTFT = a1 / (x − λ) + b1      TPOT = a2 / y + b2
λ is the share of the device the offered prefill work needs: arrival rate × mean prompt tokens ×
seconds per prompt token on the whole device (configured, or learned from prefill batch timings
as busy seconds × share / tokens; with neither, λ = 0). Each window is fitted with its own λ and
predictions use the latest window's. (a, b) come from least squares; with points from fewer than
two distinct splits (different loads alone do not count), or when the free fit is unphysical
(a ≤ 0: more compute would not help; b < 0: a negative latency floor), b is pinned to 0 and a
fitted alone, which for one split is "latency scales with 1/share". So a model exists as soon as
a point does, and is monotone: TTFT non-increasing in x, TPOT non-increasing in y. Windows with
x − λ below `MIN_EFFECTIVE_SHARE` (prefill overloaded: the queue, not the share, sets TTFT) are
not fitted, and the model predicts an infinite TTFT there.

Objective: joint attainment, the share of the window's finished requests that met BOTH their
SLOs (`observe_finished`). Each side's percentile can hold while the requests that miss one or
the other add up to far more than the goal allows, and a move that rescues one side's
percentile can push the other side's requests just past their targets: measured live, moving
share to prefill for TTFT's p90 cost more TPOT misses than it saved. So when the window has at
least `min_samples` finished requests and both models exist:
- joint attainment at least the percentile (90%: nine in ten requests met both): HOLD, and
  remember the split as the last where both held;
- else every split within `max_steps` steps either way is scored by the joint attainment the
  models predict for this window's requests there: each request's TTFT scaled by
  TTFT-model(x') / TTFT-model(x), its TPOT by TPOT-model(1 − x') / TPOT-model(1 − x) (the
  models are of the percentile; applying their ratio to every request assumes the whole
  distribution scales with the share, as it does for a device-bound phase). The best split
  wins if it gains at least `joint_min_gain` over staying (the fewest steps among equals);
  otherwise the per-side rule's move is taken if the models predict it costs no joint
  attainment (a TTFT target no split meets, TPOT far inside its own: TTFT still gets the
  share), else HOLD. Reversing the last move needs the donor's clear headroom as the per-side
  rule's reversal guard does (below): a window of few requests flips on one request's noise;
- both sides missing at their percentile still goes back to the last good split, as below.
Without enough finished requests, or without both models, the per-side rule below decides.

Per-side rule. "Own" is the side that misses its SLO, "donor" the side that gives up share.
- Both meet: HOLD, and remember the split as the last where both held.
- Both miss: HOLD (no split helps both) — unless the controller has moved off the last split
  where both held: then it goes back there (RECOVER), and the move that left it is blocked
  for `recover_block_windows` windows. (Measured live on two cores: one noisy TTFT window at a
  good split moved share to prefill, decode then fell behind too, and "both miss: hold" kept
  the unit at the bad split for the rest of the run.)
- Exactly one misses: move share to it, `step` at a time, at most `max_steps` steps and never
  outside [min_share, max_share]; stop at the first split where the own model meets its SLO.
  A step is only taken while the donor model still predicts the donor meets its limit (its
  SLO); when no step is allowed, HOLD.
- Without a model for a side (all its points overloaded), move one step at a time.

Hysteresis (so it does not oscillate):
- Cool-down: the `cooldown_windows` windows after a move HOLD and are not fitted (their samples
  mix the old and the new split).
- Reversal guard: a move opposite to the previous move needs the donor to have clear headroom,
  measured ≤ SLO × (1 − margin), and the donor model must predict ≤ SLO × (1 − margin) at the
  target. The split we left was left because that side missed there, so going back needs the
  model to be wrong by more than the margin, or the load to have changed.

Invariants: min_share ≤ split ≤ max_share; a move only ever goes toward the side that missed,
by at most max_steps × step, or back to the last split where both held; it never plans the
donor past its limit; the same observations give the same decisions.
"""

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np

MIN_EFFECTIVE_SHARE = 0.01  # x − λ (or y) below this: that phase cannot keep up at all
_SPLIT_DECIMALS = 6  # splits are rounded so repeated steps stay on the grid


class SplitAction(StrEnum):
    HOLD = "hold"
    TO_PREFILL = "to_prefill"
    TO_DECODE = "to_decode"


@dataclass(frozen=True, slots=True)
class SplitControllerConfig:
    ttft_slo_s: float
    tpot_slo_s: float
    percentile: float = 90.0
    window_samples: int = 64  # a window closes when either series has this many samples ...
    window_s: float | None = None  # ... or when this many seconds have passed
    min_samples: int = 8  # ... and in any case only once both series have this many
    step: float = 0.05  # share moved per step
    max_steps: int = 4  # steps per move
    min_share: float = 0.1  # bounds on the prefill share x
    max_share: float = 0.9
    margin: float = 0.1  # donor headroom a reversal needs, as a fraction of its SLO
    cooldown_windows: int = 1
    history_windows: int = 16  # window points the fits use
    initial_split: float = 0.5
    prefill_s_per_token: float | None = None  # prior; learned from observe_prefill_batch
    recover_block_windows: int = 8  # after a recovery: windows the failed move stays blocked
    joint_min_gain: float = 0.02  # predicted joint attainment a move must add (see the module)

    def __post_init__(self) -> None:
        if not (self.ttft_slo_s > 0 and self.tpot_slo_s > 0):
            raise ValueError("ttft_slo_s and tpot_slo_s must be > 0")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 1 <= self.min_samples <= self.window_samples:
            raise ValueError("need 1 <= min_samples <= window_samples")
        if self.window_s is not None and not self.window_s > 0:
            raise ValueError(f"window_s must be > 0 or None, got {self.window_s}")
        if not 0 < self.min_share < self.max_share < 1:
            raise ValueError("need 0 < min_share < max_share < 1")
        if not self.min_share <= self.initial_split <= self.max_share:
            raise ValueError("initial_split must lie in [min_share, max_share]")
        if not 0 < self.step <= self.max_share - self.min_share:
            raise ValueError("step must be in (0, max_share - min_share]")
        if self.max_steps < 1 or self.history_windows < 1 or self.cooldown_windows < 0:
            raise ValueError("need max_steps >= 1, history_windows >= 1, cooldown_windows >= 0")
        if self.recover_block_windows < 0:
            raise ValueError("recover_block_windows must be >= 0")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.joint_min_gain < 1:
            raise ValueError(f"joint_min_gain must be in [0, 1), got {self.joint_min_gain}")
        if self.prefill_s_per_token is not None and not self.prefill_s_per_token > 0:
            raise ValueError("prefill_s_per_token must be > 0 or None")


class InverseModel(NamedTuple):
    """latency = a / share + b, with a ≥ 0 and b ≥ 0 (so non-increasing in share)."""

    a: float
    b: float
    num_points: int
    through_origin: bool  # b was pinned to 0 (one split only, or the free fit was unphysical)

    def predict(self, share: float) -> float:
        if share < MIN_EFFECTIVE_SHARE:
            return math.inf
        return self.a / share + self.b


class WindowPoint(NamedTuple):
    """One fitted window: where the split was, the load, and what was measured."""

    split: float
    prefill_load: float
    ttft_s: float
    tpot_s: float


class SplitDecision(NamedTuple):
    split: float  # the prefill share from now on
    previous_split: float
    action: SplitAction
    reason: str
    ttft_s: float  # measured at the percentile over the window
    tpot_s: float
    predicted_ttft_s: float | None  # the models at the new split (None: no model yet)
    predicted_tpot_s: float | None
    num_ttft_samples: int
    num_tpot_samples: int
    prefill_load: float  # λ of the window
    window_start: float
    window_end: float
    attainment: float | None = None  # joint, over the window's finished requests (None: few)
    predicted_attainment: float | None = None  # the joint models' at the new split
    num_finished: int = 0


# --- pure helpers ----------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least q% of samples at or below."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered) / 100 - 1e-9))
    return ordered[rank - 1]


Outcome = tuple[float | None, float | None]  # a finished request's (TTFT, TPOT); None: no target


def joint_attainment(
    outcomes: Sequence[Outcome],
    ttft_limit: float,
    tpot_limit: float,
    ttft_scale: float = 1.0,
    tpot_scale: float = 1.0,
) -> float:
    """The share of `outcomes` within both limits once each TTFT is multiplied by `ttft_scale`
    and each TPOT by `tpot_scale`; a side a request has no sample of counts as met."""
    if not outcomes:
        raise ValueError("joint attainment of no requests")
    met = sum(
        1
        for ttft, tpot in outcomes
        if (ttft is None or ttft * ttft_scale <= ttft_limit)
        and (tpot is None or tpot * tpot_scale <= tpot_limit)
    )
    return met / len(outcomes)


def prefill_load(arrival_rate: float, mean_prompt_tokens: float, s_per_token: float) -> float:
    """λ: the share of the whole device that keeps up with the offered prefill work."""
    return arrival_rate * mean_prompt_tokens * s_per_token


def fit_through_origin(shares: Sequence[float], latencies: Sequence[float]) -> InverseModel:
    """Least squares of latency = a / share (b = 0); for one split, a = mean latency × share."""
    u, t = _regressors(shares, latencies)
    a = float(np.dot(u, t) / np.dot(u, u))
    return InverseModel(max(a, 0.0), 0.0, len(t), through_origin=True)


def fit_inverse(shares: Sequence[float], latencies: Sequence[float]) -> InverseModel:
    """Least squares of latency = a / share + b; through the origin when the points cannot pin
    both parameters (one share) or the free fit is unphysical (a ≤ 0 or b < 0)."""
    u, t = _regressors(shares, latencies)
    if u.max() - u.min() <= 1e-9 * u.max():
        return fit_through_origin(shares, latencies)
    design = np.column_stack([u, np.ones_like(u)])
    (a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
    if a <= 0 or b < 0:
        return fit_through_origin(shares, latencies)
    return InverseModel(float(a), float(b), len(t), through_origin=False)


def _regressors(
    shares: Sequence[float], latencies: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    if len(shares) != len(latencies) or not shares:
        raise ValueError("need as many latencies as shares, and at least one")
    s = np.asarray(shares, dtype=np.float64)
    if np.any(s <= 0):
        raise ValueError("shares must be > 0")
    return 1.0 / s, np.asarray(latencies, dtype=np.float64)


# --- the controller --------------------------------------------------------------------------


class _Choice(NamedTuple):
    action: SplitAction
    split: float
    reason: str


class SplitController:
    """Owns the prefill share of one unit. Feed it observations; ask it for decisions."""

    def __init__(self, config: SplitControllerConfig, start: float = 0.0) -> None:
        self.config = config
        self._split = config.initial_split
        self._window_start = start
        self._ttft: list[float] = []
        self._tpot: list[float] = []
        self._finished: list[Outcome] = []
        self._window_finished: list[Outcome] = []  # the closed window's, for the rule
        self._arrivals = 0
        self._prompt_tokens = 0
        self._prefill_cost: deque[tuple[int, float]] = deque(maxlen=config.history_windows)
        self._prefill_cost.append((0, 0.0))  # (tokens, device-seconds) of the open window
        self._history: deque[WindowPoint] = deque(maxlen=config.history_windows)
        self._cooldown_left = 0
        self._last_move: SplitAction | None = None
        self._last_good: float | None = None  # the split of the last window where both held
        self._blocked: SplitAction | None = None  # the move a recovery undid ...
        self._blocked_left = 0  # ... for this many more windows
        self.ttft_model: InverseModel | None = None
        self.tpot_model: InverseModel | None = None

    @property
    def split(self) -> float:
        """The prefill share x; the decode share is 1 − x."""
        return self._split

    @property
    def history(self) -> tuple[WindowPoint, ...]:
        return tuple(self._history)

    @property
    def prefill_s_per_token(self) -> float | None:
        """Seconds per prompt token on the whole device: learned when timings came, else prior."""
        tokens = sum(n for n, _ in self._prefill_cost)
        if tokens > 0:
            return sum(s for _, s in self._prefill_cost) / tokens
        return self.config.prefill_s_per_token

    # --- observations ----------------------------------------------------------------------

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.append(_checked(seconds))

    def observe_tpot(self, seconds: float) -> None:
        self._tpot.append(_checked(seconds))

    def observe_finished(self, ttft_s: float | None, tpot_s: float | None) -> None:
        """A finished request's TTFT and TPOT, in the units of the other samples; None for a
        side it has no target on (or, for TPOT, a single output token)."""
        if ttft_s is None and tpot_s is None:
            return
        self._finished.append(
            (
                None if ttft_s is None else _checked(ttft_s),
                None if tpot_s is None else _checked(tpot_s),
            )
        )

    def observe_arrival(self, prompt_tokens: int) -> None:
        """A request arrived with this many prompt tokens to compute (cached ones excluded)."""
        if prompt_tokens < 0:
            raise ValueError("prompt_tokens must be >= 0")
        self._arrivals += 1
        self._prompt_tokens += prompt_tokens

    def observe_prefill_batch(
        self, num_tokens: int, seconds: float, share: float | None = None
    ) -> None:
        """A prefill batch of `num_tokens` took `seconds` on prefill share `share` (default: the
        current split). Prefill throughput is taken as proportional to the share."""
        if num_tokens < 0 or not seconds >= 0 or (share is not None and not 0 < share <= 1):
            raise ValueError("need num_tokens >= 0, seconds >= 0 and a share in (0, 1]")
        on = self._split if share is None else share
        tokens, device_s = self._prefill_cost[-1]
        self._prefill_cost[-1] = (tokens + num_tokens, device_s + seconds * on)

    # --- decisions -------------------------------------------------------------------------

    def window_ready(self, now: float) -> bool:
        cfg = self.config
        if min(len(self._ttft), len(self._tpot)) < cfg.min_samples:
            return False
        if max(len(self._ttft), len(self._tpot)) >= cfg.window_samples:
            return True
        return cfg.window_s is not None and now - self._window_start >= cfg.window_s

    def maybe_decide(self, now: float) -> SplitDecision | None:
        """Close the window and decide, or None while the window is still open."""
        if not self.window_ready(now):
            return None
        measured = self._close_window(now)
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            choice = _Choice(SplitAction.HOLD, self._split, "cooldown after a move")
        else:
            self._history.append(
                WindowPoint(self._split, measured.prefill_load, measured.ttft_s, measured.tpot_s)
            )
            self._refit()
            choice = self._choose(measured)
            if self._blocked_left > 0:
                self._blocked_left -= 1
        predicted_ttft, predicted_tpot = self.predict(choice.split, measured.prefill_load)
        decision = measured._replace(
            predicted_attainment=self._predicted_attainment(measured, choice.split),
            split=choice.split,
            action=choice.action,
            reason=choice.reason,
            predicted_ttft_s=predicted_ttft,
            predicted_tpot_s=predicted_tpot,
        )
        if choice.action is not SplitAction.HOLD:
            self._split = choice.split
            self._cooldown_left = self.config.cooldown_windows
            self._last_move = choice.action
        return decision

    def _predicted_attainment(self, m: SplitDecision, split: float) -> float | None:
        """The joint attainment the models give the closed window's requests at `split`."""
        if m.attainment is None or split == m.previous_split:
            return m.attainment
        now_ttft, now_tpot = self.predict(m.previous_split, m.prefill_load)
        ttft, tpot = self.predict(split, m.prefill_load)
        if not (now_ttft and now_tpot and ttft is not None and tpot is not None):
            return None
        if not (math.isfinite(now_ttft) and math.isfinite(now_tpot)):
            return None
        return joint_attainment(
            self._window_finished,
            self.config.ttft_slo_s,
            self.config.tpot_slo_s,
            ttft / now_ttft,
            tpot / now_tpot,
        )

    def predict(self, split: float, load: float) -> tuple[float | None, float | None]:
        """The models' (TTFT, TPOT) at prefill share `split` under prefill load `load`."""
        ttft = None if self.ttft_model is None else self.ttft_model.predict(split - load)
        tpot = None if self.tpot_model is None else self.tpot_model.predict(1.0 - split)
        return ttft, tpot

    def _close_window(self, now: float) -> SplitDecision:
        """The window's measurements, as a HOLD at the current split with no predictions yet;
        the rule fills in the rest. Opens the next window."""
        q = self.config.percentile
        cfg = self.config
        duration = now - self._window_start
        cost = self.prefill_s_per_token
        load = 0.0
        if self._arrivals and duration > 0 and cost is not None:
            rate = self._arrivals / duration
            load = prefill_load(rate, self._prompt_tokens / self._arrivals, cost)
        measured = SplitDecision(
            split=self._split,
            previous_split=self._split,
            action=SplitAction.HOLD,
            reason="",
            ttft_s=percentile(self._ttft, q),
            tpot_s=percentile(self._tpot, q),
            predicted_ttft_s=None,
            predicted_tpot_s=None,
            num_ttft_samples=len(self._ttft),
            num_tpot_samples=len(self._tpot),
            prefill_load=load,
            window_start=self._window_start,
            window_end=now,
            num_finished=len(self._finished),
        )
        if len(self._finished) >= cfg.min_samples:
            measured = measured._replace(
                attainment=joint_attainment(self._finished, cfg.ttft_slo_s, cfg.tpot_slo_s)
            )
        self._window_finished, self._finished = self._finished, []
        self._ttft, self._tpot = [], []
        self._arrivals = self._prompt_tokens = 0
        self._prefill_cost.append((0, 0.0))
        self._window_start = now
        return measured

    def _refit(self) -> None:
        points = list(self._history)
        ttft_points = [p for p in points if p.split - p.prefill_load >= MIN_EFFECTIVE_SHARE]
        self.ttft_model = _fit(
            [p.split - p.prefill_load for p in ttft_points],
            [p.ttft_s for p in ttft_points],
            num_splits=len({p.split for p in ttft_points}),
        )
        self.tpot_model = _fit(
            [1.0 - p.split for p in points],
            [p.tpot_s for p in points],
            num_splits=len({p.split for p in points}),
        )

    def _choose(self, m: SplitDecision) -> _Choice:
        ttft_miss = m.ttft_s > self.config.ttft_slo_s
        tpot_miss = m.tpot_s > self.config.tpot_slo_s
        if ttft_miss and tpot_miss:
            return self._recover()
        if m.attainment is not None:
            joint = self._choose_joint(m)
            if joint is not None:
                return joint
        if not (ttft_miss or tpot_miss):
            self._last_good = self._split
            return _Choice(SplitAction.HOLD, self._split, "ttft and tpot meet their SLOs")
        direction = SplitAction.TO_PREFILL if ttft_miss else SplitAction.TO_DECODE
        if direction is self._blocked and self._blocked_left > 0:
            own = "ttft" if ttft_miss else "tpot"
            return _Choice(
                SplitAction.HOLD,
                self._split,
                f"{own} misses; that move made both miss before ({self._blocked_left} more "
                "window(s) blocked)",
            )
        return self._move(direction, m)

    def _choose_joint(self, m: SplitDecision) -> _Choice | None:
        """The joint-attainment rule (see the module); None where it cannot judge (no models,
        or an overloaded prefill side at the current split) and the per-side rule decides."""
        cfg = self.config
        goal = cfg.percentile / 100
        assert m.attainment is not None
        if m.attainment >= goal:
            self._last_good = self._split
            return _Choice(
                SplitAction.HOLD, self._split, f"joint attainment {m.attainment:.0%} meets the goal"
            )
        now_ttft, now_tpot = self.predict(self._split, m.prefill_load)
        if not (now_ttft and now_tpot and math.isfinite(now_ttft) and math.isfinite(now_tpot)):
            return None
        best, best_score = self._split, m.attainment
        for direction in (SplitAction.TO_PREFILL, SplitAction.TO_DECODE):
            if direction is self._blocked and self._blocked_left > 0:
                continue
            to_prefill = direction is SplitAction.TO_PREFILL
            # A reversal needs the donor's clear headroom, measured and predicted, as below.
            donor_slo = cfg.tpot_slo_s if to_prefill else cfg.ttft_slo_s
            reversal = self._last_move is not None and self._last_move is not direction
            if reversal and (m.tpot_s if to_prefill else m.ttft_s) > donor_slo * (1 - cfg.margin):
                continue
            for k in range(1, cfg.max_steps + 1):
                candidate = round(
                    min(
                        max(self._split + (k if to_prefill else -k) * cfg.step, cfg.min_share),
                        cfg.max_share,
                    ),
                    _SPLIT_DECIMALS,
                )
                if candidate == self._split:
                    break
                ttft, tpot = self.predict(candidate, m.prefill_load)
                assert ttft is not None and tpot is not None
                if reversal and (tpot if to_prefill else ttft) > donor_slo * (1 - cfg.margin):
                    break
                score = self._predicted_attainment(m, candidate)
                assert score is not None  # both models predict finitely at the current split
                if score - m.attainment >= cfg.joint_min_gain and score > best_score + 1e-12:
                    best, best_score = candidate, score
        if best == self._split:
            return self._per_side_tie(m)
        direction = SplitAction.TO_PREFILL if best > self._split else SplitAction.TO_DECODE
        return _Choice(
            direction,
            best,
            f"joint attainment {m.attainment:.0%}; the models predict {best_score:.0%} at "
            f"split {best:.2f}",
        )

    def _per_side_tie(self, m: SplitDecision) -> _Choice:
        """No split within reach predicts a better joint attainment: the side that misses at
        its percentile may still take a step the per-side rule allows, when the models predict
        that no fewer requests meet both there (a TTFT target no split meets, say, with TPOT
        far inside its own: latency improves, attainment cannot drop)."""
        cfg = self.config
        ttft_miss, tpot_miss = m.ttft_s > cfg.ttft_slo_s, m.tpot_s > cfg.tpot_slo_s
        hold = _Choice(
            SplitAction.HOLD,
            self._split,
            f"joint attainment {m.attainment:.0%}; no split within reach predicts better",
        )
        if ttft_miss == tpot_miss:
            return hold
        direction = SplitAction.TO_PREFILL if ttft_miss else SplitAction.TO_DECODE
        if direction is self._blocked and self._blocked_left > 0:
            return hold
        choice = self._move(direction, m)
        if choice.action is SplitAction.HOLD:
            return hold
        predicted = self._predicted_attainment(m, choice.split)
        assert predicted is not None and m.attainment is not None
        if predicted < m.attainment - 1e-12:
            return hold
        return choice._replace(
            reason=f"joint attainment {m.attainment:.0%} at best the same within reach; "
            + choice.reason
        )

    def _recover(self) -> _Choice:
        """Both miss: back to the last split where both held, if we have left it."""
        good = self._last_good
        if good is None or good == self._split:
            return _Choice(SplitAction.HOLD, self._split, "ttft and tpot both miss")
        direction = SplitAction.TO_PREFILL if good > self._split else SplitAction.TO_DECODE
        self._blocked = (
            SplitAction.TO_DECODE if direction is SplitAction.TO_PREFILL else SplitAction.TO_PREFILL
        )
        self._blocked_left = self.config.recover_block_windows + 1  # this window counts down
        return _Choice(
            direction, good, f"ttft and tpot both miss; back to {good:.2f}, where both held"
        )

    def _move(self, direction: SplitAction, m: SplitDecision) -> _Choice:
        cfg = self.config
        to_prefill = direction is SplitAction.TO_PREFILL
        own, donor = ("ttft", "tpot") if to_prefill else ("tpot", "ttft")
        donor_measured = m.tpot_s if to_prefill else m.ttft_s
        donor_slo = cfg.tpot_slo_s if to_prefill else cfg.ttft_slo_s
        reversal = self._last_move is not None and self._last_move is not direction
        donor_limit = donor_slo * (1 - cfg.margin) if reversal else donor_slo
        if reversal and donor_measured > donor_limit:
            return _Choice(
                SplitAction.HOLD, self._split, f"{own} misses; reversal needs {donor} headroom"
            )
        target, why = self._target(to_prefill, m.prefill_load, donor_limit)
        if target == self._split:
            return _Choice(SplitAction.HOLD, self._split, f"{own} misses; {why}")
        return _Choice(direction, target, f"{own} misses; {why}")

    def _target(self, to_prefill: bool, load: float, donor_limit: float) -> tuple[float, str]:
        """Step toward the missing side until its model meets its SLO, while the donor model
        stays within `donor_limit`; returns the split and why it stopped there."""
        cfg = self.config
        sign = 1.0 if to_prefill else -1.0
        own_slo = cfg.ttft_slo_s if to_prefill else cfg.tpot_slo_s
        donor = "tpot" if to_prefill else "ttft"
        best = self._split
        for k in range(1, cfg.max_steps + 1):
            candidate = round(
                min(max(self._split + sign * k * cfg.step, cfg.min_share), cfg.max_share),
                _SPLIT_DECIMALS,
            )
            if candidate == best:
                return best, f"at {'max' if to_prefill else 'min'}_share"
            ttft, tpot = self.predict(candidate, load)
            own_pred, donor_pred = (ttft, tpot) if to_prefill else (tpot, ttft)
            if donor_pred is not None and donor_pred > donor_limit:
                if best == self._split:
                    return best, f"a step would take {donor} past its limit (model)"
                return best, f"{donor} model stops the move at split {best:.2f}"
            best = candidate
            if own_pred is None or donor_pred is None:
                return best, "no model, one step"
            if own_pred <= own_slo:
                return best, f"model meets SLO at split {best:.2f}"
        return best, f"model short of SLO after {cfg.max_steps} steps"


def _fit(shares: list[float], latencies: list[float], num_splits: int) -> InverseModel | None:
    if not shares:
        return None
    if num_splits < 2:
        return fit_through_origin(shares, latencies)
    return fit_inverse(shares, latencies)


def _checked(seconds: float) -> float:
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"a latency must be finite and >= 0, got {seconds}")
    return seconds
