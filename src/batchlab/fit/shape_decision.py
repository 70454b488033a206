"""The decision at one shape of a shape table: which size next, to the table's tolerance (issue 12, item 1).

Pure functions over numbers, like :mod:`batchlab.fit.decision`, whose single-shape search this replaces
*inside a table* only (``find_batch_size`` without ``shapes=`` is unchanged). Why a decision of its own:

- **The tolerance is the issue's, 3%.** Issue 12 asks that every entry of a table be >= 0.97 of its true
  maximum for <= 2x the probes of one single-shape search. The single search closes its bracket to 1% and, at
  answers below 100, probes the step past its prediction to find the exact edge; over five shapes that edge
  hunt (and the CPU's noise at the edge) cost 19 probes, 4.1x one search (benchmarks/RESULTS.md). Here an
  entry ``b`` that ran in full is accepted as soon as the measurements *bound* the true maximum ``T`` by
  ``b / (1 - TABLE_TOLERANCE)``: ``T`` is below the smallest size that failed clear of the readings' noise
  (:func:`clear_failure`), and below ``b + (budget - peak(b) + 2 slack) / slope_low`` -- the room left at
  ``b`` at the lowest per-sample slope the measurements allow (see :func:`accepts`). Nothing is accepted on a prediction alone: an entry is a size
  that ran its full verification within the budget, as in the single search.
- **The slope at a shape is measured with one probe.** The fixed part of ``peak(b, L) = fixed + b s(L)`` is
  the same at every length (:mod:`batchlab.fit.peak_model`) and known from the shapes searched before, so
  one size that ran at a new shape gives its slope: ``s(L) = (peak(b) - fixed) / b``. That is what makes the
  second shape cheap although its prior -- from one length, the linear-in-``L`` bound -- over-states the
  slope when attention's ``L^2`` term is real: the first probe lands low, the second at the answer.
- **Every size that may be the answer runs in full** (no scouts): a scout that ends a single search costs a
  second probe for its verification, and the table counts probes.

The shape's first size is the prior's prediction ``slack`` below the budget, less half the tolerance
(:func:`conservative`; ``slack``: the readings' noise -- the most any prior has under-stated a measured peak
at the shapes before, or the most a reading at any shape so far sits off the line through its sizes,
:func:`reading_noise`). The acceptance bound takes the slopes as low as that noise allows
(:func:`credible_slopes`). After a failure with nothing
fitting, the line through the failure (the measured slope, or the prior's) aims ``slack`` below the budget;
after a second failure, or an out-of-memory error without a peak, the next try is ``PRIOR_BACKOFF`` of the
smallest failure (geometric: a process whose baseline creeps up per probe cannot keep every try just over).
Once a size fits, a bracket with nothing to aim by is split by ratio (``sqrt(lo hi)``: 2..16 -> 5), never
below the size whose failure would settle the entry. The first shape of a table, with no prior, starts like the single search (2, then up to 8x) and stops at the
same 3%; seeded from a plan (``ShapeGuide.estimated_slope``), it goes from 2 straight to where the planned slope
puts the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.fit.decision import (
    CAP,
    MAX_GROWTH,
    VERIFY_LARGEST,
    Decision,
    align_down,
    first_size,
    fit_memory_line,
    largest_fit,
    latest_probes,
    least_squares_line,
    line_points,
    next_candidate,
    upper_slope,
)
from batchlab.fit.records import Limit, MemoryLine, Outcome, Probe

# Issue 12, item 1: every entry of a shape table >= 0.97 of its true maximum. A table stops at that, not at
# the single search's 1%: the last 2% at five shapes is what cost the edge hunts (benchmarks/RESULTS.md).
TABLE_TOLERANCE = 0.03
# While nothing fits at a shape started from a prediction, after an out-of-memory error with no peak to aim by,
# or after a second failure, the next try is a quarter lower: past the 1-3% a prediction from other shapes is
# off by (benchmarks/RESULTS.md, issue 12), far above the first size a plain search would climb from again, and
# geometric, so that a process whose baseline creeps up per probe (oneDNN caches a primitive per new batch
# shape: +0.45 MiB a probe measured on cnn, issue 12) cannot keep every try just over the budget.
PRIOR_BACKOFF = 0.75
PRIOR_PREDICTION = "prediction from other shapes"


@dataclass(frozen=True)
class ShapeGuide:
    """What the shapes searched before tell the search at this one (:func:`batchlab.fit.shapes.search_shapes`).

    ``prior``: the peak model's line at this shape (None at the first shape); ``fixed_bytes``: the model's
    fixed part, through which one probe here gives this shape's slope (None at the first shape);
    ``slack_bytes``: the most a prior has put a measured peak below its reading so far (the noise allowance,
    in both directions); ``tolerance``: the share of the true maximum an entry may fall short of;
    ``estimated_slope``: a planned per-sample slope at a shape with no prior (the first shape of a table
    seeded from fake tensors, ``find_batch_size(..., estimate=...)``) -- aimed by once a size has run, never
    part of an acceptance bound (see :func:`credible_slopes`).
    """

    prior: MemoryLine | None = None
    fixed_bytes: float | None = None
    slack_bytes: float = 0.0
    tolerance: float = TABLE_TOLERANCE
    estimated_slope: float | None = None


def slopes_at(probes: Sequence[Probe], lo_probe: Probe, guide: ShapeGuide) -> list[float]:
    """The per-sample slopes at this shape the measurements support, the best first.

    This shape's own line (two sizes or more ran here), the slope through the model's fixed part and the
    largest fit (one size is enough), the prior's slope, the planned slope; the positive ones.
    """
    slopes = []
    line = fit_memory_line(probes)
    if line is not None:
        slopes.append(line.bytes_per_sample)
    if guide.fixed_bytes is not None and lo_probe.peak_bytes is not None:
        slopes.append((lo_probe.peak_bytes - guide.fixed_bytes) / lo_probe.batch_size)
    if guide.prior is not None:
        slopes.append(guide.prior.bytes_per_sample)
    if guide.estimated_slope is not None:
        slopes.append(guide.estimated_slope)
    return [s for s in slopes if s > 0]


def credible_slopes(probes: Sequence[Probe], lo_probe: Probe, guide: ShapeGuide, slack: float) -> list[float]:
    """:func:`slopes_at`, each as low as readings within ``slack`` of the truth allow: the shape's own line
    less ``2 slack`` over the span of the sizes it is fitted on, the slope through the model's fixed part less
    ``2 slack / b`` (the reading at ``b`` and the fixed part each off by the noise); the prior's as it is.

    The acceptance bound divides the room by the lowest slope, so a slope that the noise put high shrinks the
    room in samples: at 0.3% repeatable noise a line through 2129 and 2549 read 1.5% steep, and 2549 was
    accepted where 2629 fit (tests/test_shapes.py). A planned slope (``guide.estimated_slope``) is left out: a
    fake-tensor estimate misses what the process holds beyond tensors (oneDNN's buffers read the resnet step
    8.6% above its estimate, benchmarks/RESULTS.md, issue 7), so an entry is accepted on measured slopes only.
    """
    slopes = []
    points = line_points(probes)
    if len(points) >= 2:
        span = max(points) - min(points)
        slopes.append(least_squares_line(points).bytes_per_sample - 2 * slack / span)
    if guide.fixed_bytes is not None and lo_probe.peak_bytes is not None:
        slopes.append((lo_probe.peak_bytes - guide.fixed_bytes - 2 * slack) / lo_probe.batch_size)
    if guide.prior is not None:
        slopes.append(guide.prior.bytes_per_sample)
    return [s for s in slopes if s > 0]


def accepts(
    lo_probe: Probe,
    slopes: Sequence[float],
    hi: int | None,
    budget_bytes: int,
    slack: float,
    tolerance: float,
) -> bool:
    """Whether the largest verified fit ``lo_probe`` is provably >= ``1 - tolerance`` of the true maximum.

    With readings within ``slack`` of a line, the true maximum ``T`` is at most ``b + (budget - peak(b) +
    2 slack) / s_low``, ``s_low`` the lowest slope in ``slopes`` (the reading at ``b`` may sit ``slack`` over
    the line, one past the budget ``slack`` under it; a lower slope leaves more samples in the room) -- and
    below ``hi``, a failure clear of the noise (:func:`clear_failure`). ``b >= (1 - tol) T`` then holds for
    every ``T`` those bounds leave.
    """
    b, peak = lo_probe.batch_size, lo_probe.peak_bytes
    bound = math.inf if hi is None else hi - 1
    if slopes and peak is not None:
        bound = min(bound, math.floor(b + (budget_bytes - peak + 2 * slack) / min(slopes)))
    return b >= (1 - tolerance) * bound


def clear_failure(probe: Probe, budget_bytes: int, slack: float) -> bool:
    """A failure that no larger size can undo: an out-of-memory error, or a peak over the budget by more than
    the readings' noise either way (a size past it cannot read under the budget); a failure inside the noise
    says nothing about the sizes above it."""
    return probe.peak_bytes is None or probe.peak_bytes > budget_bytes + 2 * slack


def reading_noise(probes: Sequence[Probe]) -> float:
    """The readings' noise at one shape: the most a reading sits off the least-squares line through every size
    measured there (three sizes or more; 0 with fewer, where a line passes through its points).

    Every size counts, the small ones too: the first shape's line runs through two sizes near its answer (16
    and 66), which says nothing about the noise, while batch 2 off that line does -- by the noise of the
    readings, or by a small batch's own kernels, an uncertainty of the line all the same. Without it, at 0.3%
    repeatable noise (a simulated peak ``x (1 +- 0.003)``), a two-point line accepted 16 where 17 fit, 0.941 of
    the truth, and 9 of 3,000 entries fell under 0.97 (benchmarks/RESULTS.md, issue 12).
    """
    measured = {b: p.peak_bytes for b, p in latest_probes(probes).items() if p.measured}
    if len(measured) < 3:
        return 0.0
    line = least_squares_line(measured)
    return max(abs(peak - line.peak(b)) for b, peak in measured.items())


def noise_known(probes: Sequence[Probe], guide: ShapeGuide) -> bool:
    """Whether a seeded first shape knows its readings' noise: from three sizes or more (:func:`reading_noise`;
    a line passes through two whatever their noise). Where it does not, its entry is accepted on the line only
    with the noise the planned slope shows (:func:`planned_noise`), else below a failure.

    A seeded first shape runs batch 2 and then the answer, and a line through those two, taken as exact, put 4
    of 1,905 simulated entries under 0.97 of their truth, the worst 0.909 (tests/test_shapes.py). Every later
    shape has the noise of the shapes before (``slack_bytes``); an unseeded first shape climbs through batch
    16, three sizes but after an out-of-memory error there, and is left as measured (benchmarks/RESULTS.md)."""
    return guide.estimated_slope is None or len({p.batch_size for p in probes if p.measured}) >= 3


def planned_noise(probes: Sequence[Probe], guide: ShapeGuide) -> float | None:
    """The readings' noise as a planned slope shows it at a shape with two measured sizes: how far the line
    through them is from ``guide.estimated_slope``, times their span (None without both).

    Two estimates of one slope: a reading off by ``e`` bytes moves a two-point line's slope by ``e / span``,
    while the plan's slope comes from the tensors' own bytes and has no reading noise. A right plan then shows
    the noise; a wrong one shows more, which only makes the acceptance stricter. What it cannot see is both
    readings off by the same bytes (the line's level, not its slope). Over 378 simulated tables with exact plans
    at 0.3% noise, 2 entries fell under 0.97 with it and 2 without, at 7.58 mean probes against 8.27; with
    plans off by up to 10%, 1 against 2, at 8.46 against 8.59 (benchmarks/RESULTS.md).
    """
    points = line_points(probes)
    if guide.estimated_slope is None or len(points) != 2:
        return None
    span = max(points) - min(points)
    return abs(least_squares_line(points).bytes_per_sample - guide.estimated_slope) * span


def slack_at(probes: Sequence[Probe], guide: ShapeGuide) -> float:
    """The noise allowance at this shape: the other shapes' (``guide.slack_bytes``), or this shape's own
    :func:`reading_noise`, whichever is larger."""
    return max(guide.slack_bytes, reading_noise(probes))


def next_shape_candidate(
    probes: Sequence[Probe],
    budget_bytes: int,
    guide: ShapeGuide,
    *,
    multiple_of: int = 1,
    cap: int | None = None,
    hard_limit_bytes: int | None = None,
    created_bytes: int = 0,
) -> Decision:
    """The next size at one shape of a table (see the module), or ``Decision(None, reason=...)`` to stop.

    Stops when the largest fit is accepted (:func:`accepts`), at the cap, or at the hard-limit guard; as the
    single search, only on a size that ran in full after the last out-of-memory error. Where nothing fits and
    the smallest failure is already the first size (batch 2), the single search's fallbacks decide.
    """
    limits = {"multiple_of": multiple_of, "cap": cap, "hard_limit_bytes": hard_limit_bytes}
    lo_probe = largest_fit(probes, verified=True)
    if lo_probe is None:
        return _opening(probes, budget_bytes, guide, created_bytes, **limits)
    lo = lo_probe.batch_size
    slopes = slopes_at(probes, lo_probe, guide)
    slack = slack_at(probes, guide)
    failed = {b: p for b, p in latest_probes(probes).items() if not p.fits and b > lo}
    hi = min(failed, default=None)
    clear = min((b for b, p in failed.items() if clear_failure(p, budget_bytes, slack)), default=None)
    if cap is not None and lo >= cap:
        return _stop_after_verified(probes, lo_probe, CAP)
    credible, accept_slack = [], slack
    if noise_known(probes, guide):
        credible = credible_slopes(probes, lo_probe, guide, slack)
    elif (seen := planned_noise(probes, guide)) is not None:
        accept_slack = max(slack, seen)
        credible = credible_slopes(probes, lo_probe, guide, accept_slack)
    if accepts(lo_probe, credible, clear, budget_bytes, accept_slack, guide.tolerance):
        return _stop_after_verified(probes, lo_probe, Limit.MEMORY)
    # The smallest size whose failure would prove lo within the tolerance: below it a try cannot settle lo.
    closing = math.ceil((math.floor(lo / (1 - guide.tolerance)) + 1) / multiple_of) * multiple_of
    if not slopes or lo_probe.peak_bytes is None:  # one size and nothing to measure a slope by: grow
        target, how = float(lo * MAX_GROWTH), "growth"
    else:
        best = lo + (budget_bytes - lo_probe.peak_bytes - slack) / slopes[0]
        target, how = conservative(best, guide.tolerance), "line prediction"
        if guide.fixed_bytes is None and guide.estimated_slope is None and best > lo * MAX_GROWTH:
            target, how = float(lo * MAX_GROWTH), "growth"  # a line from small probes: 8x at most
    target = max(target, closing)
    if hi is not None:
        two_failed = sum(1 for p in probes[-2:] if not p.fits) == 2
        if target >= hi or two_failed:  # the middle by ratio: the tolerance is relative (and 2..16 -> 5)
            target, how = max(math.sqrt(lo * hi), closing), "bisection"
    if cap is not None:
        target = min(target, cap)
    if hard_limit_bytes is not None and lo_probe.peak_bytes is not None:
        slope = upper_slope(probes, lo_probe, created_bytes)
        if slope > 0 and target > lo + (hard_limit_bytes - lo_probe.peak_bytes) / slope:
            target, how = lo + (hard_limit_bytes - lo_probe.peak_bytes) / slope, "hard-limit guard"
    candidate = align_down(target, multiple_of)
    tried = {p.batch_size for p in probes}
    middle = align_down(math.sqrt(lo * hi), multiple_of) if hi is not None else lo
    if candidate in failed and lo < middle < hi and middle not in tried:
        # a failure inside the noise cannot settle lo: a size between them can raise lo instead (halving the
        # gap by ratio each time, never creeping a sample at a time)
        candidate, how = middle, "below a failure in the noise"
    elif candidate in failed and slopes and lo_probe.peak_bytes is not None:
        # nothing left below it: once, where the line puts a size clear of the noise (it fits, or settles lo);
        # a failure inside the noise already above the size that would settle lo ends the search at lo: that try
        # was made (on the CPU each probe's readings creep up, and the point with them: cnn went on 78, 79, 81,
        # 82, 83, 84, every one over, tests/test_shapes.py)
        past = align_down(lo + (budget_bytes + 2 * slack - lo_probe.peak_bytes) / min(slopes), multiple_of)
        made = [b for b, p in failed.items() if b > closing and not clear_failure(p, budget_bytes, slack)]
        candidate, how = min(made, default=past + multiple_of), "past the noise"
    if candidate <= lo or candidate in failed:
        return _stop_after_verified(
            probes, lo_probe, Limit.HARD_LIMIT if how == "hard-limit guard" else Limit.MEMORY
        )
    return Decision(candidate, _predicted(lo_probe, slopes, candidate), how)


def _opening(
    probes: Sequence[Probe],
    budget_bytes: int,
    guide: ShapeGuide,
    created_bytes: int,
    *,
    multiple_of: int,
    cap: int | None,
    hard_limit_bytes: int | None,
) -> Decision:
    """The sizes while nothing at this shape has fit: the prior's prediction, then below each failure."""
    smallest = first_size(multiple_of)
    failed = min(probes, key=lambda p: p.batch_size) if probes else None
    if guide.prior is None or guide.prior.bytes_per_sample <= 0 or (failed and failed.batch_size <= smallest):
        return next_candidate(
            probes, budget_bytes, multiple_of=multiple_of, cap=cap, hard_limit_bytes=hard_limit_bytes,
            created_bytes=created_bytes,
        )  # fmt: skip
    line = guide.prior
    if failed is None:
        target = conservative(line.largest_under(budget_bytes - guide.slack_bytes), guide.tolerance)
    elif len(probes) == 1 and failed.peak_bytes is not None:  # over by a measured amount: aim below it
        slope = line.bytes_per_sample
        if guide.fixed_bytes is not None and failed.peak_bytes > guide.fixed_bytes:
            slope = (failed.peak_bytes - guide.fixed_bytes) / failed.batch_size  # measured at this shape
        line = MemoryLine(failed.peak_bytes - slope * failed.batch_size, slope)
        target = min(line.largest_under(budget_bytes - guide.slack_bytes), failed.batch_size - multiple_of)
    else:
        target = failed.batch_size * PRIOR_BACKOFF
    if cap is not None:
        target = min(target, cap)
    if hard_limit_bytes is not None:
        target = min(target, line.largest_under(hard_limit_bytes))
    candidate = max(align_down(target, multiple_of), smallest)
    return Decision(candidate, int(line.peak(candidate)), PRIOR_PREDICTION)


def conservative(best: float, tolerance: float) -> int:
    """The size to try where a line puts ``best`` at the budget: ``tolerance / 2`` below it, where that still
    leaves a size within the tolerance of ``best`` -- else ``best`` itself, rounded down.

    Half the tolerance absorbs a prediction that is up to 1.5% high (the table's predictions were 0-3% off,
    benchmarks/RESULTS.md) and still lands an entry within 3% of the truth; at small sizes, where one sample
    is more than that, the rounding down is the margin (14.0 -> 14, not 13: 13/14 is below 0.97).
    """
    lowered = math.floor(best * (1 - tolerance / 2))
    return lowered if lowered >= (1 - tolerance) * best else math.floor(best)


def _stop_after_verified(probes: Sequence[Probe], lo_probe: Probe, reason: str) -> Decision:
    """Stop -- unless the largest fit ran before the last out-of-memory error (see ``next_candidate``)."""
    last_oom = max((i for i, p in enumerate(probes) if p.outcome == Outcome.OOM), default=-1)
    if next(i for i, p in enumerate(probes) if p is lo_probe) < last_oom:
        return Decision(lo_probe.batch_size, lo_probe.peak_bytes, VERIFY_LARGEST)
    return Decision(None, reason=reason)


def _predicted(lo_probe: Probe, slopes: Sequence[float], size: int) -> int | None:
    if not slopes or lo_probe.peak_bytes is None:
        return None
    return int(lo_probe.peak_bytes + slopes[0] * (size - lo_probe.batch_size))
