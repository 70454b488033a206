"""The search's decisions, as pure functions over the probes so far: no torch, no device.

:func:`next_candidate` says which batch size to try next (or to stop), from the probe history, the budget and
the limits; :func:`fit_memory_line` fits the line it predicts with. Tested on simulated memory shapes with
exact sequences (tests/test_search.py): 1,500 shapes, every answer verified, >= 0.97 of the true maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.fit.records import Limit, MemoryLine, Outcome, Probe

MAX_GROWTH = 8  # never extrapolate more than 8x past the largest size that ran: a line from tiny probes lies
TOLERANCE = 0.01  # stop when the next candidate would move the answer by less than 1%
MAX_PROBES = 32  # a safety net; the property tests show searches well under it (see tests/test_search.py)
LINE_WINDOW = 8  # the memory line uses probes with b >= largest_fit / 8: small batches are not affine
# An estimate's jump goes a quarter of the way to its predicted size, in place of the small probes' 8x ladder:
# the measured line then extrapolates 4x (8x without an estimate) and a slope off even by 2x lands inside. On
# the CPU, where a step's time grows with the batch, nearer the edge cost more time (benchmarks/RESULTS.md).
ESTIMATE_JUMP = 0.25

# Reasons a decision gives that are not a Limit of the answer.
CAP = "cap"  # the largest size allowed (max_batch_size / dataset size) fits
SMALLEST_DOES_NOT_FIT = "smallest size does not fit"


def fit_memory_line(probes: Sequence[Probe]) -> MemoryLine | None:
    """Least-squares line through the measured peaks of the larger probes, or None with < 2 usable sizes.

    Uses probes that ran (fits or over budget) with b >= largest-that-fit / LINE_WINDOW; batch 1 and other
    tiny sizes drop out once larger ones exist, as their kernels and overheads differ.
    """
    points = line_points(probes)
    return least_squares_line(points) if len(points) >= 2 else None


def line_points(probes: Sequence[Probe]) -> dict[int, float]:
    """``{batch size: peak}`` that :func:`fit_memory_line` fits its line on (see there; empty without a fit)."""
    measured = [p for p in latest_probes(probes).values() if p.measured]
    fitting = [p.batch_size for p in measured if p.fits]
    if not fitting:
        return {}
    floor = max(fitting) / LINE_WINDOW
    points = {p.batch_size: p.peak_bytes for p in measured if p.batch_size >= floor}
    if len(points) < 2:
        points = {p.batch_size: p.peak_bytes for p in sorted(measured, key=lambda p: -p.batch_size)[:2]}
    return points


def least_squares_line(points: dict[int, float]) -> MemoryLine:
    """The least-squares line through ``{batch size: peak}`` (two sizes or more)."""
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return MemoryLine(mean_y - slope * mean_x, slope)


BATCH_ONE_FALLBACK = "batch 2 does not fit; try 1"


def first_size(multiple_of: int) -> int:
    """The first size probed: 2, not 1, unless a multiple is required.

    BatchNorm cannot train on one sample ("Expected more than 1 value per channel"), and batch-1 kernels
    are unrepresentative anyway; batch 1 is tried only when 2 does not fit (Lightning also starts at 2).
    """
    return multiple_of if multiple_of > 1 else 2


def upper_slope(probes: Sequence[Probe], lo_probe: Probe, created_bytes: int = 0) -> float:
    """An upper bound on the memory per sample past the largest fit ``lo_probe``, for the hard-limit guard.

    A step's peak is at most its memory before the step plus what it creates once plus a per-sample part, so
    the per-sample slope is at most ``(peak - baseline - created_bytes) / b`` at the largest fit -- a bound
    that holds even where peaks look flat (fixed temporaries can hide the activations' slope until the
    activations outgrow them, and a line through flat readings would then let one jump cross the limit).
    ``created_bytes`` is the optimizer state a step creates (known for a Workload): it exists through the
    second step's forward and backward whatever the batch, and leaving it in would freeze a model with large
    state near batch 2. The fitted line's slope is the bound when it is steeper.
    """
    step_bytes = (lo_probe.peak_bytes or 0) - (lo_probe.baseline_bytes or 0) - created_bytes
    line = fit_memory_line(probes)
    return max(line.bytes_per_sample if line else 0.0, max(step_bytes, 0) / lo_probe.batch_size)


def _clearly_over(
    line: MemoryLine, size: int, budget: int, probes: Sequence[Probe], multiple_of: int
) -> bool:
    """Whether the line puts ``size`` over the budget by more than half a step and more than it has been off.

    Then trying it is an out-of-memory error for nothing. Half a step at least, as one measured error can be
    small by chance: over 5,000 simulated shapes (tests/test_search.py) with the error alone, 3 answers lost a
    sample they had (0.96 of 23-33); with half a step as the floor -- also before any error is measured --
    none.
    """
    over = line.peak(size) - budget
    return over > max([*_prediction_errors(probes), line.bytes_per_sample * multiple_of / 2])


def _failed_tail(probes: Sequence[Probe]) -> set[int]:
    """The sizes of the failures that ended the probe history (none if the last probe fit)."""
    tail: set[int] = set()
    for probe in reversed(probes):
        if probe.fits:
            break
        tail.add(probe.batch_size)
    return tail


def _prediction_errors(probes: Sequence[Probe], recent: int = 3) -> list[float]:
    """|measured - predicted| peak of the last ``recent`` probes that had both."""
    errors = [
        float(abs(p.peak_bytes - p.predicted_peak_bytes))
        for p in probes
        if p.peak_bytes is not None and p.predicted_peak_bytes is not None
    ]
    return errors[-recent:]


def _prediction_error(probes: Sequence[Probe], recent: int = 3) -> float:
    """The largest |measured - predicted| peak among the last ``recent`` probes that had both."""
    return max(_prediction_errors(probes, recent), default=0.0)


def align_down(batch_size: float, multiple_of: int) -> int:
    """``batch_size`` rounded down to a multiple of ``multiple_of`` (the search's and the tables' sizes)."""
    return int(batch_size // multiple_of) * multiple_of


@dataclass(frozen=True)
class Decision:
    """What the search does next: run ``batch_size`` (with its predicted peak), or stop (``batch_size`` None)."""

    batch_size: int | None
    predicted_peak_bytes: int | None = None
    reason: str = ""
    scout: bool = False  # run as a scout: one state-creating step at the first size, then one at batch_size


VERIFY_LARGEST = "verify the largest fit"


def latest_probes(probes: Sequence[Probe]) -> dict[int, Probe]:
    """Each batch size's latest probe, which decides it: a scout that fit and then failed its verification
    does not fit; an out-of-memory error followed by a fit (the state copy moved out) fits."""
    return {probe.batch_size: probe for probe in probes}


def largest_fit(probes: Sequence[Probe], *, verified: bool = False) -> Probe | None:
    """The probe of the largest size that fits (by its latest probe), or None; ``verified``: answers only."""
    fitting = [p for p in latest_probes(probes).values() if p.fits and (p.verified or not verified)]
    return max(fitting, key=lambda p: p.batch_size, default=None)


def next_candidate(
    probes: Sequence[Probe],
    budget_bytes: int,
    *,
    multiple_of: int = 1,
    cap: int | None = None,
    hard_limit_bytes: int | None = None,
    estimate: MemoryLine | None = None,
    created_bytes: int = 0,
) -> Decision:
    """Decide the next batch size to try from the probes so far (pure; no torch, no device).

    Returns ``Decision(None, reason=...)`` when the search is done: the bracket is closed, the cap is reached,
    or the next candidate would move the answer by less than ``TOLERANCE`` -- and the largest fit ran in full
    after the last out-of-memory error. That error may leave the process heavier (on the CPU the first one pages
    in ~4 MiB of torch's unwinder for good: 50 of 50 later steps at cnn's answer read 2-3 MiB over the budget,
    benchmarks/RESULTS.md), and the answer must fit the process as the search leaves it.

    Scouts: a size that would not be the answer as it stands -- the growth that feeds the line, an estimate's
    jump, a bracket's refinement -- runs as a scout (``Decision.scout``): one step at the smallest verified fit,
    from the user's state, creates the optimizer state (and, under fp16, the skip patch's,
    :mod:`batchlab.workload.skipped_steps`); one step at the size then runs with it. That step holds what a verified
    probe's second step holds -- the optimizer state, the gradients, the size's activations -- and meets the
    size's first-shape costs, so its peak is the verified probe's (measured on the CPU: gpt 1075.0 / 1075.1
    MiB, resnet 948.2 / 948.3 MiB at 16, scout / full), at one step at the size instead of two: on the CPU
    benchmark a growth probe at 16 took 0.64 s instead of 1.59 s (resnet); over 5,000 simulated memory shapes
    (tests/test_search.py) the searches' cost in sample-steps fell 15% (median) and 23% (95th percentile) at
    the same answers. A size that may be the answer as it stands -- a prediction from below, the step past it,
    the hard-limit guard's size, one that closes the bracket -- runs in full. A scout is never an answer: when
    the search would stop on one, the next decision is that size's full run (``VERIFY_LARGEST``); each size
    counts by its latest probe (:func:`latest_probes`), so a scout that fit and then failed in full does not
    fit.

    ``estimate`` (optional, e.g. from :func:`batchlab.planning.estimate_memory_line`) stands in for the memory line
    while the probes cannot give one (fewer than two measured sizes): its slope, anchored on the largest
    measured fit, predicts the budget's size and the search jumps ``ESTIMATE_JUMP`` of the way there instead
    of climbing by ``MAX_GROWTH``; the measured line takes over from there. Every size is still run for real.

    ``hard_limit_bytes`` bounds every candidate by :func:`upper_slope` (``created_bytes``: what a step creates
    once, whatever the batch -- gradients and optimizer state -- where the workload can tell).
    """
    decision = _next_size(probes, budget_bytes, multiple_of, cap, hard_limit_bytes, estimate, created_bytes)
    largest = largest_fit(probes)
    if decision.batch_size is None and largest is not None:
        last_oom = max((i for i, p in enumerate(probes) if p.outcome == Outcome.OOM), default=-1)
        if not largest.verified or next(i for i, p in enumerate(probes) if p is largest) < last_oom:
            return Decision(largest.batch_size, largest.peak_bytes, VERIFY_LARGEST)
    return decision


def _next_size(
    probes: Sequence[Probe],
    budget_bytes: int,
    multiple_of: int,
    cap: int | None,
    hard_limit_bytes: int | None,
    estimate: MemoryLine | None,
    created_bytes: int,
) -> Decision:
    """:func:`next_candidate` before the verification of a scout it would stop on."""
    if not probes:
        return Decision(first_size(multiple_of), None, "first size")
    lo_probe = largest_fit(probes)
    if lo_probe is None:
        if multiple_of == 1 and [p.batch_size for p in probes] == [2]:
            return Decision(1, None, BATCH_ONE_FALLBACK)
        return Decision(None, reason=SMALLEST_DOES_NOT_FIT)
    lo = lo_probe.batch_size
    failed = [b for b, p in latest_probes(probes).items() if not p.fits and b > lo]
    hi = min(failed) if failed else None
    if cap is not None and lo >= cap:
        return Decision(None, reason=CAP)
    if hi is not None and hi - lo <= max(multiple_of, TOLERANCE * lo):
        return Decision(None, reason=Limit.MEMORY)  # the bracket is closed to within 1% (or one step)

    line = fit_memory_line(probes)
    seeded = (
        line is None
        and estimate is not None
        and estimate.bytes_per_sample > 0
        and lo_probe.peak_bytes is not None
    )
    if seeded:
        # The estimate's fixed part is not the device's (process, runtime, allocator): anchor it on a measured fit.
        line = MemoryLine(lo_probe.peak_bytes - estimate.bytes_per_sample * lo, estimate.bytes_per_sample)
    if line is None or line.bytes_per_sample <= 0:
        # No slope resolved yet (one size, or memory per sample below the noise): grow as fast as allowed;
        # the hard-limit guard below still bounds the step with an upper-bound slope.
        target, how = float(lo * MAX_GROWTH), "growth"
    elif hi is None:
        target, how = line.largest_under(budget_bytes), "line prediction"
    else:
        # Something already failed: aim below the budget by the line's recent prediction error, so the
        # next try lands inside instead of bouncing off the edge (noise, allocator rounding, jumps).
        target, how = (
            line.largest_under(budget_bytes - _prediction_error(probes)),
            "line prediction with margin",
        )
    if seeded:
        target = lo + ESTIMATE_JUMP * (target - lo)
    elif target > lo * MAX_GROWTH:
        target, how = float(lo * MAX_GROWTH), "growth"  # capped: a step toward the prediction, not the answer
    if hi is not None:
        last = probes[-1]
        last_two_failed = len(_failed_tail(probes)) >= 2  # two sizes in a row (a retry of one is one)
        # An OOM says nothing about the slope -- unless the line expected it (the step past a prediction).
        expected = last.predicted_peak_bytes is not None and last.predicted_peak_bytes > budget_bytes
        no_peak = not last.fits and last.peak_bytes is None and not expected
        # A secant step that would not cut at least a quarter of the bracket is too timid (a stale margin after
        # a jump): bisect instead, so the bracket always shrinks geometrically.
        bold = max(lo * (1 + TOLERANCE), lo + (hi - lo) / 4) <= align_down(target, multiple_of) < hi
        if not bold or last_two_failed or no_peak:
            target, how = (lo + hi) / 2, "bisection"
    if cap is not None:
        target = min(target, cap)
    if hard_limit_bytes is not None:
        # Never run a step that could exceed the hard limit (CPU RAM: the kernel kills, it does not raise).
        slope = upper_slope(probes, lo_probe, created_bytes)
        if slope > 0 and target > lo + (hard_limit_bytes - lo_probe.peak_bytes) / slope:
            target, how = lo + (hard_limit_bytes - lo_probe.peak_bytes) / slope, "hard-limit guard"
    candidate = align_down(target, multiple_of)
    stop_reason = Limit.HARD_LIMIT if how == "hard-limit guard" else Limit.MEMORY
    settled = candidate <= lo or (
        hi is None and how == "line prediction" and (candidate - lo) / lo < TOLERANCE
    )
    # At small sizes one more sample is more than 1%: try the size past the prediction rather than trust the
    # rounding of the line -- in full, as it may be the answer, and before the prediction itself, so that the
    # prediction's run (which then closes the bracket) comes after the out-of-memory error the step past
    # usually is: the answer must fit the process as the search leaves it (see next_candidate).
    base = lo if settled else candidate  # the size the line puts at the budget: the largest fit, or untried
    past = base + multiple_of
    from_below = hi is None and how == "line prediction" and not seeded
    if from_below and multiple_of / base >= TOLERANCE and (cap is None or past <= cap):
        if not _clearly_over(line, past, budget_bytes, probes, multiple_of):
            return Decision(past, int(line.peak(past)), "one step past the prediction")
    if settled:
        return Decision(None, reason=stop_reason)
    predicted = int(line.peak(candidate)) if line else None
    # A size that would be the answer if it fits -- a prediction from below, the hard-limit guard's size, or
    # one that would close the bracket -- runs in full; every other size is a scout (the growth that feeds the
    # line, an estimate's jump, a bracket's refinement), verified at the end if it is the largest fit.
    closes = hi is not None and hi - candidate <= max(multiple_of, TOLERANCE * candidate)
    answer_if_fits = how in ("line prediction", "hard-limit guard") and not seeded
    return Decision(candidate, predicted, how, scout=not (answer_if_fits or closes))
