"""Steps to a target and the critical batch size: pure functions over numbers (no torch).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11: the optimizer steps S and
training samples E = S·B needed to reach a given loss at batch size B trade off as

    S = S_min (1 + B_crit / B),        E = E_min (1 + B / B_crit),        E_min = S_min · B_crit,

so below B_crit doubling the batch nearly halves the steps (perfect scaling), and above it extra samples buy
few steps. :func:`fit_critical_batch` fits S_min and B_crit to measured steps-to-target; :func:`crossing`
finds where a sampled curve first reaches a target, interpolated between the two points that bracket it;
:func:`critical_batch_along` predicts B_crit over a stretch of training from the noise scale read along it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "CriticalBatchFit",
    "NoiseWindow",
    "critical_batch_along",
    "crossing",
    "fit_critical_batch",
    "noise_window",
    "pooled_noise_scale",
]

# The fit searches B_crit over [min(B)/SPAN, max(B)·SPAN]: outside the measured range by this factor the data
# cannot tell B_crit apart from 0 or infinity, and the answer is reported as a bound (``bounded=False``).
SPAN = 64.0
GRID_POINTS = 1201  # log-spaced grid, then golden-section refinement on the best bracket
# The noise scale "at the target" averages the per-update estimates over the last half of the steps before the
# target: B_simple grows as the loss falls (McCandlish et al. 2018, fig. 8), so the whole run would bias it low,
# while a single update's estimate is noisier than its mean. At least MIN_WINDOW_UPDATES updates are used.
WINDOW_FRACTION = 0.5
MIN_WINDOW_UPDATES = 4


@dataclass(frozen=True)
class CriticalBatchFit:
    """S = S_min (1 + B_crit/B) fitted to (batch size, steps-to-target) points, in log space.

    ``rms_log_error`` is the root-mean-square of log(S_measured / S_fit) (0.1 is about 10% scatter).
    ``bounded`` is False when the best B_crit lies at the edge of the searched range: the data then only say
    B_crit is below the smallest (``b_crit`` tiny) or above the largest measured batch; ``note`` says which.
    """

    s_min: float
    b_crit: float
    e_min: float
    points: int
    rms_log_error: float
    bounded: bool
    note: str

    def steps(self, batch_size: float) -> float:
        """Fitted optimizer steps to the target at ``batch_size``."""
        return self.s_min * (1.0 + self.b_crit / batch_size)

    def samples(self, batch_size: float) -> float:
        """Fitted training samples to the target at ``batch_size``."""
        return self.e_min * (1.0 + batch_size / self.b_crit) if self.b_crit > 0 else math.inf

    def samples_at_steps(self, steps: float) -> float:
        """Fitted training samples of the fixed batch that reaches the target in ``steps`` steps: the trade-off
        curve (S/S_min - 1)(E/E_min - 1) = 1 solved for E (inf at or below S_min, which no batch reaches).

        Any batch schedule under a constant B_crit costs at least this many samples in the same steps: each
        stretch at batch B lies on the curve, the curve is convex and a schedule averages its stretches
        (Jensen). A schedule below it is the mark of a critical batch that grows during training, the one case
        where growing the batch can beat every fixed batch (McCandlish et al. 2018 test such schedules in their
        appendix on adaptive batch sizes)."""
        if steps <= self.s_min or self.b_crit <= 0:
            return math.inf
        return self.e_min * steps / (steps - self.s_min)

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field."""
        return asdict(self)


def _loss_for(b_crit: float, log_b: list[float], log_s: list[float]) -> tuple[float, float]:
    """(sum of squared log errors, best log S_min) for a fixed B_crit; log S_min has a closed form."""
    shifts = [math.log1p(b_crit / math.exp(lb)) for lb in log_b]
    log_s_min = sum(ls - sh for ls, sh in zip(log_s, shifts)) / len(log_s)
    return sum((ls - log_s_min - sh) ** 2 for ls, sh in zip(log_s, shifts)), log_s_min


def fit_critical_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> CriticalBatchFit:
    """Fit S = S_min (1 + B_crit/B) to measured steps-to-target ``steps`` at ``batch_sizes``.

    Least squares on log S (steps span orders of magnitude; relative errors are what matter): for each
    B_crit the best S_min is closed-form, so the search is one-dimensional -- a log-spaced grid over
    [min(B)/64, max(B)·64], then golden-section refinement. Needs at least three points at two or more
    distinct batch sizes; raises ``ValueError`` otherwise or for non-positive values.
    """
    if len(batch_sizes) != len(steps):
        raise ValueError(f"batch_sizes and steps differ in length: {len(batch_sizes)} vs {len(steps)}")
    pairs = [(float(b), float(s)) for b, s in zip(batch_sizes, steps)]
    for b, s in pairs:
        if not (math.isfinite(b) and math.isfinite(s) and b > 0 and s > 0):
            raise ValueError(f"batch sizes and steps must be finite and > 0, got ({b!r}, {s!r})")
    if len(pairs) < 3 or len({b for b, _ in pairs}) < 2:
        raise ValueError(
            f"fitting S_min and B_crit needs >= 3 points at >= 2 batch sizes, got {len(pairs)} point(s)"
        )
    log_b = [math.log(b) for b, _ in pairs]
    log_s = [math.log(s) for _, s in pairs]
    lo, hi = math.log(min(b for b, _ in pairs) / SPAN), math.log(max(b for b, _ in pairs) * SPAN)
    grid = [lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    losses = [_loss_for(math.exp(x), log_b, log_s)[0] for x in grid]
    best = min(range(GRID_POINTS), key=losses.__getitem__)
    a, c = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):  # golden section on log B_crit; 60 rounds shrink the bracket by ~1e-12
        x1, x2 = c - ratio * (c - a), a + ratio * (c - a)
        if _loss_for(math.exp(x1), log_b, log_s)[0] < _loss_for(math.exp(x2), log_b, log_s)[0]:
            c = x2
        else:
            a = x1
    log_bc = (a + c) / 2.0
    sse, log_s_min = _loss_for(math.exp(log_bc), log_b, log_s)
    b_crit, s_min = math.exp(log_bc), math.exp(log_s_min)
    bounded = 0 < best < GRID_POINTS - 1
    if bounded:
        note = f"B_crit ≈ {b_crit:.3g}, S_min ≈ {s_min:.3g} steps from {len(pairs)} points"
    elif best == 0:
        note = (
            f"steps barely fall with the batch: B_crit is below the smallest batch measured "
            f"({min(b for b, _ in pairs):g}); only an upper bound"
        )
    else:
        note = (
            f"steps fall in proportion to the batch everywhere measured: B_crit is above the largest batch "
            f"({max(b for b, _ in pairs):g}); only a lower bound"
        )
    return CriticalBatchFit(
        s_min=s_min,
        b_crit=b_crit,
        e_min=s_min * b_crit,
        points=len(pairs),
        rms_log_error=math.sqrt(sse / len(pairs)),
        bounded=bounded,
        note=note,
    )


def crossing(
    xs: Sequence[Sequence[float]] | Sequence[float],
    values: Sequence[float],
    target: float,
    mode: str = "min",
) -> list[float] | None:
    """Where ``values`` first reaches ``target`` (``<=`` for ``mode="min"``, ``>=`` for ``"max"``).

    ``xs`` is one sequence of positions (e.g. steps) or several aligned ones (steps, samples, seconds); the
    answer interpolates each linearly between the last point short of the target and the first point at it,
    so coarse evaluation does not round steps-to-target up to the next evaluation. Returns one value per
    sequence in ``xs`` (a list), or None if the target is never reached. Non-finite values never count as
    reaching it. A target met at the very first point returns that point's positions.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    columns = [list(xs)] if xs and not isinstance(xs[0], Sequence) else [list(c) for c in xs]
    if any(len(c) != len(values) for c in columns):
        raise ValueError("every position sequence must be as long as values")
    sign = 1.0 if mode == "min" else -1.0
    for i, v in enumerate(values):
        if math.isfinite(v) and sign * (v - target) <= 0:
            if i == 0:
                return [c[0] for c in columns]
            prev = values[i - 1]
            if not math.isfinite(prev) or prev == v:
                return [c[i] for c in columns]
            t = (prev - target) / (prev - v)  # in (0, 1]: the fraction of the way from point i-1 to i
            return [c[i - 1] + t * (c[i] - c[i - 1]) for c in columns]
    return None


@dataclass(frozen=True)
class NoiseWindow:
    """Means of the per-update |G|² and tr(Σ) estimates over steps ``first_step..last_step`` (``updates`` of them).

    ``b_simple`` is their ratio (None unless |G|² > 0 and tr(Σ) > 0: gradient noise swamped the signal).
    """

    g2: float
    trace: float
    updates: int
    first_step: int
    last_step: int

    @property
    def b_simple(self) -> float | None:
        return self.trace / self.g2 if self.g2 > 0 and self.trace > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "b_simple": self.b_simple}


def noise_window(
    steps: Sequence[int],
    g2: Sequence[float],
    trace: Sequence[float],
    end: float,
    fraction: float = WINDOW_FRACTION,
    min_updates: int = MIN_WINDOW_UPDATES,
) -> NoiseWindow | None:
    """Average the updates (step, |G|², tr Σ) with ``(1 - fraction)·end < step <= end``.

    When fewer than ``min_updates`` fall in that window, the last ``min_updates`` up to ``end`` are used (or all
    there are). Returns None when no update precedes ``end``. The estimates are each unbiased (eq. A.2), so
    their mean is too; B_simple is the ratio of the means, as the EMA tracker does.
    """
    upto = [(s, a, b) for s, a, b in zip(steps, g2, trace) if s <= end]
    if not upto:
        return None
    window = [u for u in upto if u[0] > (1.0 - fraction) * end]
    if len(window) < min_updates:
        window = upto[-min_updates:]
    n = len(window)
    return NoiseWindow(
        g2=sum(u[1] for u in window) / n,
        trace=sum(u[2] for u in window) / n,
        updates=n,
        first_step=window[0][0],
        last_step=window[-1][0],
    )


def pooled_noise_scale(windows: Sequence[NoiseWindow]) -> float | None:
    """B_simple from several runs' windows: mean tr(Σ) over mean |G|², each run weighted equally.

    Runs stopped at the same target loss sit at about the same point of the loss landscape, so their |G|² and
    tr(Σ) estimate the same two numbers; pooling the components (not averaging ratios) keeps one noisy run
    with |G|² near 0 from dominating. None when the pooled |G|² or tr(Σ) is not positive.
    """
    if not windows:
        return None
    g2 = sum(w.g2 for w in windows) / len(windows)
    trace = sum(w.trace for w in windows) / len(windows)
    return trace / g2 if g2 > 0 and trace > 0 else None


def critical_batch_along(steps: Sequence[float], noise_scales: Sequence[float], batch_size: float) -> float:
    """The critical batch of a stretch of training, from the noise scale read along a run at ``batch_size``.

    The noise scale grows as the loss falls, so B_crit for going from one loss to another is not the noise
    scale at either end. Applying S = S_min(1 + B_noise/B) to each small piece of the run, a run at batch B
    that takes dS steps makes the progress of dS_min = dS / (1 + B_noise/B) steps of an infinitely large
    batch, and B_crit = E_min/S_min = ∫B_noise dS_min / ∫dS_min: the noise scale averaged over the stretch,
    weighted by the minimal steps, so where a run at B crawls (noise scale far above B) counts for less.
    ``noise_scales[i]`` is read at ``steps[i]`` of that run (ascending, at least two points; trapezoid rule).
    """
    if len(steps) != len(noise_scales):
        raise ValueError(f"steps and noise_scales differ in length: {len(steps)} vs {len(noise_scales)}")
    if len(steps) < 2:
        raise ValueError(f"the stretch needs at least two readings, got {len(steps)}")
    if not (math.isfinite(batch_size) and batch_size > 0):
        raise ValueError(f"batch_size must be finite and > 0, got {batch_size!r}")
    for s, b in zip(steps, noise_scales):
        if not (math.isfinite(s) and math.isfinite(b) and b > 0):
            raise ValueError(f"steps must be finite and noise scales finite and > 0, got ({s!r}, {b!r})")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be strictly ascending, got {list(steps)}")
    weights = [1.0 / (1.0 + b / batch_size) for b in noise_scales]  # dS_min per step of the run at B
    s_min = e_min = 0.0
    for i in range(len(steps) - 1):
        width = steps[i + 1] - steps[i]
        s_min += width * (weights[i] + weights[i + 1]) / 2
        e_min += width * (weights[i] * noise_scales[i] + weights[i + 1] * noise_scales[i + 1]) / 2
    return e_min / s_min
