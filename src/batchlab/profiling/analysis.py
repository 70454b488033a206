"""The profile's decision and summary math: plain functions over batch sizes, throughputs and peak bytes.

No torch, no device: each function takes numbers (or the profile's records) and returns numbers or a
:class:`~batchlab.profiling.records.VariantSummary`, so the knee, the memory line, the timing budget and a
variant's summary are tested exactly, without running a step. The one knee of the project lives here
(:func:`knee_batch_size`); the advice and the CLI use it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from batchlab import checks
from batchlab.defaults import KNEE_THRESHOLD
from batchlab.profiling.records import ProfilePoint, VariantSummary

MIN_TIMED_STEPS = 3  # the median of 3 already ignores one outlier (a GC pause, a noisy neighbour)
MAX_TIMED_STEPS = 30  # enough for a stable median of a fast step; more only costs time
SECONDS_PER_POINT = 1.0  # timed seconds aimed for per (variant, batch size): a small model gets many steps,
# a large one MIN_TIMED_STEPS -- a profile of ~10 sizes x 2 variants stays around a minute plus warm-up
# The profile times each size in one window by default. ``rounds=R`` times the fitting sizes in R interleaved
# (round-robin) rounds instead, each 1/R of a size's timed steps, pooled per size: a burst of other work that
# covers one size's whole window then falls on every size alike. It was built for a loaded shared CPU -- under
# two busy loops even the 10th-percentile step was 2-30x the quiet one, unevenly across sizes (benchmarks/RESULTS.md,
# "advise end to end under a controlled load") -- and measured there ("interleaved rounds"): four rounds made the
# inflation more even across sizes (8 of 9 paired advise runs) but left every step 3-11x its quiet time, did not
# improve advise's batch against the best fixed one (switched up on 3 of 9 seeds, one window on 4 of 9; char-lm
# 3.24x against 1.91x), and cost 23-137 ms per size and extra round (advise 1.6-2.2x slower under load). Not shown
# to pay, so it is an option for a machine whose load comes in short bursts, not the default.
DEFAULT_TIMING_ROUNDS = 1
LINE_WINDOW = 8  # memory per sample: sizes >= largest / 8, like the search's line (small b is not affine)
SCALING_SPAN = 4  # small-batch scaling compares the smallest size with the first size >= 4x it
# The coverage of a step time's interval (the median's, a low quantile's): 68.27%, the mass within one standard
# deviation of a normal -- the footing B_noise ± 1 standard error stands on, which the advice carries beside it
# (issue 13, item 6).
INTERVAL_COVERAGE = 0.6827


def knee_batch_size(
    batch_sizes: Sequence[int], throughputs: Sequence[float | None], threshold: float = KNEE_THRESHOLD
) -> int | None:
    """The smallest batch size whose throughput reaches ``threshold`` x the best one; None without points.

    Sizes without a positive throughput (not timed, or did not fit) are left out. ``threshold`` is a number in
    (0, 1]; the default, :data:`batchlab.defaults.KNEE_THRESHOLD`, says why 0.95.
    """
    threshold = checks.fraction("threshold", threshold, include_one=True)
    pairs = [(b, t) for b, t in zip(batch_sizes, throughputs) if t is not None and t > 0]
    if not pairs:
        return None
    best = max(t for _, t in pairs)
    return min(b for b, t in pairs if t >= threshold * best)


def default_batch_sizes(fit_batch_size: int, smallest: int = 1) -> list[int]:
    """``smallest``, the powers of two above it up to the fit answer, and the answer itself."""
    sizes = {smallest, fit_batch_size}
    b = 1
    while b <= fit_batch_size:
        if b > smallest:
            sizes.add(b)
        b *= 2
    return sorted(s for s in sizes if s <= fit_batch_size)


def timed_steps_for(step_seconds: float, seconds_per_point: float) -> int:
    """How many steps to time: about ``seconds_per_point`` worth, within MIN/MAX_TIMED_STEPS."""
    if step_seconds <= 0 or not math.isfinite(step_seconds):
        return MAX_TIMED_STEPS
    return int(min(MAX_TIMED_STEPS, max(MIN_TIMED_STEPS, round(seconds_per_point / step_seconds))))


def check_rounds(rounds: object, name: str = "rounds") -> int | None:
    """``rounds`` (the profile's interleaved timing rounds) as an int from 1 to MAX_TIMED_STEPS -- every round
    times at least one step of a size's MAX_TIMED_STEPS at most -- or None (the device's default). ``name``
    names it in the message (the CLI's ``--rounds``)."""
    checked = checks.integer(name, rounds, none=True)
    if checked is not None and checked > MAX_TIMED_STEPS:
        raise ValueError(
            f"invalid {name} {rounds!r}: expected an int from 1 to {MAX_TIMED_STEPS} (every round times at least "
            "one of a size's at most MAX_TIMED_STEPS steps) or None"
        )
    return checked


def sample_quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` read as one of them: the ``ceil(n q)``-th smallest (at least the first).

    The inverse of the empirical distribution function (Hyndman & Fan 1996, "Sample quantiles in statistical
    packages", definition 1): an order statistic, so it always lies inside :func:`quantile_interval`'s ends and
    is a time a step really took. 0.5 of an even count is the lower middle value.
    """
    xs = _sorted_times(values, "sample_quantile")
    q = checks.fraction("q", q)
    rank = max(1, math.ceil(round(len(xs) * q, 9)))  # round: 30 x 0.1 is 3.0000000000000004 in floats
    return xs[rank - 1]


def quantile_interval(
    values: Sequence[float], q: float, coverage: float = INTERVAL_COVERAGE
) -> tuple[float, float]:
    """The distribution-free confidence interval of the population ``q``-quantile: ``(x_(r), x_(s))``.

    For any continuous distribution, with Y ~ Binomial(n, q), ``P(x_(r) <= x_q < x_(s)) = P(r <= Y <= s - 1)``
    (Conover 1999, *Practical Nonparametric Statistics*, 3rd ed., sec. 3.2, the interval for a quantile): r is
    the largest with ``P(Y <= r - 1) <= (1 - coverage)/2`` and s the smallest with ``P(Y <= s - 1) >= (1 +
    coverage)/2``, so each tail misses with at most half the rest and the interval covers at least
    ``coverage``. Where n is too small for an end (the 10th percentile's lower one below 18 values, an end past
    the n-th), that end is the sample's extreme: the most the sample can say, and less than ``coverage``.
    At ``q = 0.5`` the binomial is symmetric and the interval is the median's, ``(x_(k), x_(n+1-k))`` with
    coverage ``1 - 2 P(Y <= k - 1)``: the full range for 3-5 values (~75-94%), the 12th..19th of 30. Only the
    order of the values matters, so one step slowed 10x moves an end only if it is that end's order statistic --
    why not the full range of many steps: one slowed step would stretch it however many were timed (measured in
    benchmarks/advise_check.py: the full range of 30 steps kept batch 32 on digits against a 128 three times
    faster to the target).
    """
    xs = _sorted_times(values, "quantile_interval")
    q = checks.fraction("q", q)
    checks.fraction("coverage", coverage)
    n, tail = len(xs), (1.0 - coverage) / 2.0
    cdf, total = [], 0.0  # cdf[j] = P(Y <= j)
    for j in range(n + 1):
        total += math.comb(n, j) * q**j * (1.0 - q) ** (n - j)
        cdf.append(total)
    r = max((j + 1 for j in range(n) if cdf[j] <= tail), default=1)  # r - 1: the largest j in the lower tail
    s = 1 + next(j for j in range(n + 1) if cdf[j] >= 1.0 - tail - 1e-12)  # 1e-12: the sum's rounding
    r, s = min(r, n), min(s, n)  # clamped to the sample's extremes
    return xs[r - 1], xs[max(r, s) - 1]


def _sorted_times(values: Sequence[float], what: str) -> list[float]:
    xs = sorted(checks.number("step time", v, inclusive=True) for v in values)
    if not xs:
        raise ValueError(f"{what} needs at least one value")
    return xs


def memory_per_sample(
    batch_sizes: Sequence[int], peaks: Sequence[float | None]
) -> tuple[float, float] | None:
    """``(fixed_bytes, bytes_per_sample)``: a least-squares line through the peaks of sizes >= largest/8.

    Falls back to the two largest sizes when the window holds fewer than two; None with fewer than two sizes.
    """
    points = {b: p for b, p in zip(batch_sizes, peaks) if p is not None}
    if len(points) < 2:
        return None
    floor = max(points) / LINE_WINDOW
    window = {b: p for b, p in points.items() if b >= floor}
    if len(window) < 2:
        window = dict(sorted(points.items())[-2:])
    xs, ys = list(window), list(window.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return mean_y - slope * mean_x, slope


def small_batch_scaling(
    batch_sizes: Sequence[int], throughputs: Sequence[float | None]
) -> tuple[int, int, float] | None:
    """``(b0, b1, efficiency)`` over the small sizes: the smallest size b0, the first b1 >= SCALING_SPAN * b0
    (or the largest), and efficiency = (throughput gain) / (batch gain). 1.0 when the step time stays
    constant as the batch grows (throughput doubles with the batch); 1/(b1/b0) when it is flat."""
    pairs = sorted((b, t) for b, t in zip(batch_sizes, throughputs) if t is not None and t > 0)
    if len(pairs) < 2:
        return None
    b0, t0 = pairs[0]
    b1, t1 = next(((b, t) for b, t in pairs if b >= SCALING_SPAN * b0), pairs[-1])
    return b0, b1, (t1 / t0) / (b1 / b0)


def summarize_variant(
    variant: str,
    precision: str,
    checkpointing: bool,
    points: Sequence[ProfilePoint],
    *,
    knee_threshold: float = KNEE_THRESHOLD,
    fit_batch_size: int | None = None,
    checkpointed: str | None = None,
) -> VariantSummary:
    """The knee, the best and the largest fitting size, and memory per sample, from one variant's points."""
    fitting = sorted((p for p in points if p.fits), key=lambda p: p.batch_size)
    timed = [p for p in fitting if p.samples_per_second is not None]
    by_batch = {p.batch_size: p for p in timed}
    knee = knee_batch_size(
        [p.batch_size for p in timed], [p.samples_per_second for p in timed], knee_threshold
    )
    best = max(timed, key=lambda p: p.samples_per_second, default=None)
    largest = fitting[-1] if fitting else None
    line = memory_per_sample([p.batch_size for p in fitting], [p.peak_bytes for p in fitting])
    return VariantSummary(
        variant=variant,
        precision=precision,
        checkpointing=checkpointing,
        fit_batch_size=fit_batch_size,
        largest_fitting_batch=largest.batch_size if largest else None,
        largest_fitting_samples_per_second=largest.samples_per_second if largest else None,
        best_batch=best.batch_size if best else None,
        best_samples_per_second=best.samples_per_second if best else None,
        knee_batch=knee,
        knee_samples_per_second=by_batch[knee].samples_per_second if knee is not None else None,
        bytes_per_sample=line[1] if line else None,
        fixed_bytes=line[0] if line else None,
        checkpointed=checkpointed,
    )
