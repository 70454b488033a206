"""AutoBatch done right: the largest batch whose whole training step fits, found with few probes and verified.

The search (device-agnostic; it sees a Device and a Workload, nothing above them):

1. Probe a small size (2, see :func:`first_size`), then grow geometrically (at most x8 per probe, see ``MAX_GROWTH``) toward
   the size a robust line through the larger probes predicts for the budget. Batch 1 alone is never
   trusted: the line uses only probes within 1/8 of the largest that fit, where memory is affine.
2. Run the predicted size for real (``VERIFY_STEPS`` full steps from the user's own starting state); a size is
   an answer only if it ran without an out-of-memory error *and* its measured peak stayed within the budget.
3. Refine between the largest size that fit and the smallest that did not -- secant from measured peaks,
   bisection when the secant stalls or a failure left no peak -- until the next candidate would move the
   answer by less than 1% (``TOLERANCE``).

Sizes that only feed the line or refine a bracket run as *scouts* -- one state-creating step at a small size,
then one step at the size -- at half the cost; the answer is always a size verified in full
(:func:`next_candidate`). It never answers a size that failed or was not run, never runs a step its prediction
puts above the device's hard limit (CPU RAM: the kernel kills rather than raises), and restores the workload's
state after every probe. The decision logic (:func:`next_candidate`) is a pure function over the probe history.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab.devices import CPUDevice, Device, resolve_device
from batchlab.devices.base import Measurement
from batchlab.devices.cpu import host_room_bytes
from batchlab.errors import BatchlabError, DoesNotFitError
from batchlab.skipped_steps import skip_note, steps_always_create_state
from batchlab.spec import parse_amp, parse_batch
from batchlab.state import copy_storage
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload import StepFunction, Workload, as_workload

log = logging.getLogger("batchlab")

VERIFY_STEPS = (
    2  # every probe runs two full steps: the first creates optimizer state, the second runs with it
)
MAX_GROWTH = 8  # never extrapolate more than 8x past the largest size that ran: a line from tiny probes lies
TOLERANCE = 0.01  # stop when the next candidate would move the answer by less than 1%
MAX_PROBES = 32  # a safety net; the property tests show searches well under it (see tests/test_search.py)
LINE_WINDOW = 8  # the memory line uses probes with b >= largest_fit / 8: small batches are not affine
# An estimate's jump goes a quarter of the way to its predicted size, in place of the small probes' 8x ladder:
# the measured line then extrapolates 4x (8x without an estimate) and a slope off even by 2x lands inside. On
# the CPU, where a step's time grows with the batch, nearer the edge cost more time (benchmarks/RESULTS.md).
ESTIMATE_JUMP = 0.25
# Never run a step predicted above 95% of the hard limit (CPU RAM or the container's limit): the prediction is
# a line through noisy readings, and the kernel's OOM kill -- unlike an exception -- ends the search.
HARD_LIMIT_MARGIN = 0.05
# A CPU state copy below 1% of the budget stays in RAM even where it crowds the hard limit: moving it to disk
# would cost a file read per probe to win back less than the search's own 1% tolerance.
NEGLIGIBLE_COPY = 0.01


@dataclass(frozen=True)
class Probe:
    """One try of a batch size: what it measured and whether it fits the budget.

    ``outcome`` is ``"fits"``, ``"over budget"`` (ran, but peaked above the budget), ``"oom"`` (raised an
    out-of-memory error) or ``"skipped"`` (not run: predicted above the device's hard limit). ``state_step`` is
    set for a scout (:func:`next_candidate`): the size of the one step run first, from the user's state, to
    create the optimizer state; ``steps`` and ``seconds`` are then the one step at ``batch_size`` alone. A
    probe without it is *verified*: ``VERIFY_STEPS`` full steps at ``batch_size``.
    """

    batch_size: int
    outcome: str
    peak_bytes: int | None
    baseline_bytes: int | None
    predicted_peak_bytes: int | None
    seconds: float
    steps: int
    allocated_bytes: int | None = None
    tensor_bytes: dict[str, int] | None = None
    error: str | None = None
    skipped_optimizer_steps: int = 0  # steps a GradScaler skipped; run on zeroed gradients (skipped_steps.py)
    skipped_at_scales: tuple[float, ...] = ()
    optimizer_steps: int | None = (
        None  # optimizer steps seen (None: no optimizer known, a bare step callable)
    )
    state_step: int | None = None

    @property
    def fits(self) -> bool:
        return self.outcome == "fits"

    @property
    def verified(self) -> bool:
        """Ran ``VERIFY_STEPS`` full steps at its size from the user's state: only such a size is an answer."""
        return self.state_step is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryLine:
    """peak(b) ~= fixed_bytes + bytes_per_sample * b, fitted on the larger probes."""

    fixed_bytes: float
    bytes_per_sample: float

    def peak(self, batch_size: float) -> float:
        return self.fixed_bytes + self.bytes_per_sample * batch_size

    def largest_under(self, budget: float) -> float:
        return (budget - self.fixed_bytes) / self.bytes_per_sample if self.bytes_per_sample > 0 else math.inf


@dataclass
class FitResult:
    """The answer of :func:`find_batch_size`, with everything it measured.

    ``batch_size`` is a size that ran ``VERIFY_STEPS`` full training steps within ``budget_bytes``
    (``fits``), or -- for a fixed batch that does not fit -- the size that was asked for, with ``fits=False``.
    ``limited_by`` says what stopped the search from going larger. ``state_copy_bytes`` is the size of the
    copy of the user's state that the search restored after each probe (``state_copy_storage``: "memory" or
    "disk"); ``skipped_optimizer_steps`` counts probe steps a GradScaler skipped, each run on zeroed
    gradients so that the optimizer state was created and counted; ``device_settings`` records what shapes
    the device's readings (CUDA: ``PYTORCH_CUDA_ALLOC_CONF``, ``cudnn.benchmark``; CPU: how the peak is read).
    """

    batch_size: int
    fits: bool
    mode: str
    fraction: float | None
    device: str
    capacity_bytes: int
    budget_bytes: int
    peak_bytes: int | None
    predicted_peak_bytes: int | None
    bytes_per_sample: float | None
    fixed_bytes: float | None
    limited_by: str
    memory_breakdown: dict[str, int] | None
    probes: list[Probe] = field(default_factory=list)
    search_seconds: float = 0.0
    workload: str = ""
    notes: list[str] = field(default_factory=list)
    state_copy_bytes: int = 0
    state_copy_storage: str = "memory"
    skipped_optimizer_steps: int = 0
    device_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_run(self) -> int:
        return sum(probe.steps + (not probe.verified) for probe in self.probes if probe.outcome != "skipped")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps_run"] = self.steps_run
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """One paragraph in plain words."""
        if self.mode == "fixed":
            verdict = "fits" if self.fits else "does NOT fit"
            need = format_bytes(self.peak_bytes if self.peak_bytes is not None else self.predicted_peak_bytes)
            return f"batch {self.batch_size} {verdict}: needs {need} of a {format_bytes(self.budget_bytes)} budget on {self.device}"
        return (
            f"largest batch that fits: {self.batch_size} (limited by {self.limited_by}); peak "
            f"{format_bytes(self.peak_bytes)} of a {format_bytes(self.budget_bytes)} budget "
            f"({self.fraction:.0%} of {format_bytes(self.capacity_bytes)}) on {self.device}, verified with real steps"
        )


def fit_memory_line(probes: Sequence[Probe]) -> MemoryLine | None:
    """Least-squares line through the measured peaks of the larger probes, or None with < 2 usable sizes.

    Uses probes that ran (fits or over budget) with b >= largest-that-fit / LINE_WINDOW; batch 1 and other
    tiny sizes drop out once larger ones exist, as their kernels and overheads differ.
    """
    measured = [
        p
        for p in latest_probes(probes).values()
        if p.peak_bytes is not None and p.outcome in ("fits", "over budget")
    ]
    fitting = [p.batch_size for p in measured if p.fits]
    if not fitting:
        return None
    floor = max(fitting) / LINE_WINDOW
    points = {p.batch_size: p.peak_bytes for p in measured if p.batch_size >= floor}
    if len(points) < 2:
        points = {p.batch_size: p.peak_bytes for p in sorted(measured, key=lambda p: -p.batch_size)[:2]}
    if len(points) < 2:
        return None
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


def _align(batch_size: float, multiple_of: int) -> int:
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
    :mod:`batchlab.skipped_steps`); one step at the size then runs with it. That step holds what a verified
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

    ``estimate`` (optional, e.g. from :func:`batchlab.estimate_memory_line`) stands in for the memory line
    while the probes cannot give one (fewer than two measured sizes): its slope, anchored on the largest
    measured fit, predicts the budget's size and the search jumps ``ESTIMATE_JUMP`` of the way there instead
    of climbing by ``MAX_GROWTH``; the measured line takes over from there. Every size is still run for real.

    ``hard_limit_bytes`` bounds every candidate by :func:`upper_slope` (``created_bytes``: what a step creates
    once, whatever the batch -- gradients and optimizer state -- where the workload can tell).
    """
    decision = _next_size(probes, budget_bytes, multiple_of, cap, hard_limit_bytes, estimate, created_bytes)
    largest = largest_fit(probes)
    if decision.batch_size is None and largest is not None:
        last_oom = max((i for i, p in enumerate(probes) if p.outcome == "oom"), default=-1)
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
        return Decision(None, reason="smallest size does not fit")
    lo = lo_probe.batch_size
    failed = [b for b, p in latest_probes(probes).items() if not p.fits and b > lo]
    hi = min(failed) if failed else None
    if cap is not None and lo >= cap:
        return Decision(None, reason="cap")
    if hi is not None and hi - lo <= max(multiple_of, TOLERANCE * lo):
        return Decision(None, reason="memory")  # the bracket is closed to within 1% (or one step)

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
        bold = max(lo * (1 + TOLERANCE), lo + (hi - lo) / 4) <= _align(target, multiple_of) < hi
        if not bold or last_two_failed or no_peak:
            target, how = (lo + hi) / 2, "bisection"
    if cap is not None:
        target = min(target, cap)
    if hard_limit_bytes is not None:
        # Never run a step that could exceed the hard limit (CPU RAM: the kernel kills, it does not raise).
        slope = upper_slope(probes, lo_probe, created_bytes)
        if slope > 0 and target > lo + (hard_limit_bytes - lo_probe.peak_bytes) / slope:
            target, how = lo + (hard_limit_bytes - lo_probe.peak_bytes) / slope, "hard-limit guard"
    candidate = _align(target, multiple_of)
    stop_reason = "hard limit" if how == "hard-limit guard" else "memory"
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


def _probe(
    device: Device,
    workload: Workload | StepFunction,
    batch_size: int,
    budget: int,
    predicted: int | None,
    own_bytes: int = 0,
    state_step: int | None = None,
) -> Probe:
    """Run one probe; the verdict is the search's, not the device's.

    ``own_bytes`` is memory the search itself holds in the measured process (the CPU state copy): it is taken
    off the reading, since the user's own run will not hold it. A step that the workload's GradScaler skips
    still creates the optimizer state (:func:`~batchlab.skipped_steps.steps_always_create_state`).
    ``state_step``: run a scout (:func:`next_candidate`), its first step at this size; it is timed apart (the
    device synchronised after it) and left out of the probe's ``steps`` and ``seconds``.
    """
    tensor_bytes: dict[str, int] | None = None
    calls = 0
    state_seconds = 0.0

    def step_and_record(b: int) -> None:
        nonlocal tensor_bytes, calls, state_seconds
        calls += 1
        if state_step is not None and calls == 1:
            started = time.perf_counter()
            workload.step(state_step)
            device.synchronize()  # the clock must include the state step's queued device work
            state_seconds = time.perf_counter() - started
        else:
            workload.step(b)
        tensor_bytes = workload.tensor_bytes()

    with steps_always_create_state(workload.scalers, workload.optimizers) as skips:
        measurement: Measurement = device.run(step_and_record, batch_size, VERIFY_STEPS)
    peak = (
        measurement.peak_bytes - own_bytes if measurement.ok and measurement.peak_bytes is not None else None
    )
    if not measurement.ok:
        outcome = "oom"
    elif peak is not None and peak > budget:
        outcome = "over budget"
    else:
        outcome = "fits"
    return Probe(
        batch_size,
        outcome,
        peak,
        None if measurement.baseline_bytes is None else measurement.baseline_bytes - own_bytes,
        predicted,
        max(measurement.seconds - state_seconds, 0.0),
        measurement.steps - (state_step is not None),
        measurement.allocated_bytes,
        tensor_bytes if measurement.ok else None,
        measurement.error,
        skips.skipped,
        tuple(skips.scales),
        skips.optimizer_steps if workload.optimizers else None,
        state_step,
    )


def _positive_int_or_none(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name} {value!r}: expected a positive int or None")
    return value


def _breakdown(probe: Probe, before: dict[str, int] | None) -> dict[str, int] | None:
    """Name the memory of a fitting probe by what it is, where the workload can tell."""
    if probe.peak_bytes is None or probe.baseline_bytes is None:
        return None
    step = probe.peak_bytes - probe.baseline_bytes
    # CUDA: the caching allocator holds more than the live tensors (rounding, fragmentation, cached blocks).
    overhead = (
        {}
        if probe.allocated_bytes is None
        else {"allocator_overhead": probe.peak_bytes - probe.allocated_bytes}
    )
    if probe.tensor_bytes is None or before is None:
        return {"before_step": probe.baseline_bytes, "step": step, **overhead}
    created_grads = probe.tensor_bytes["gradients"] - before["gradients"]
    created_state = probe.tensor_bytes["optimizer_state"] - before["optimizer_state"]
    return {
        "before_step": probe.baseline_bytes,  # everything already there: runtime, parameters, data, ...
        "parameters": probe.tensor_bytes["parameters"],
        "buffers": probe.tensor_bytes["buffers"],
        "gradients_created": created_grads,
        "optimizer_state_created": created_state,
        "activations_and_temporaries": step - created_grads - created_state - sum(overhead.values()),
        **overhead,
    }


def find_batch_size(
    workload: Workload | StepFunction | Callable[[int], Any],
    *,
    device: str | torch.device | Device = "auto",
    batch: int | float | str = -1,
    memory_budget: int | str | None = None,
    amp: str | None = None,
    max_batch_size: int | None = None,
    dataset_size: int | None = None,
    multiple_of: int = 1,
    preserve: Sequence[Any] = (),
    on_probe: Callable[[Probe], None] | None = None,
    estimate: MemoryLine | None = None,
    state_copy: str = "auto",
) -> FitResult:
    """Find the largest batch size whose full training step fits in memory -- or check a fixed one.

    Args:
        workload: a :class:`~batchlab.Workload`, or any callable ``step(batch_size)`` that runs one training
            step (pass ``preserve=(model, optimizer)`` to have their state restored after each probe).
        device: ``"auto"`` (where the model lives), ``"cpu"``, ``"cuda:N"`` or a :class:`~batchlab.devices.Device`.
        batch: ``-1``/``"auto"`` (largest at 0.90 of capacity), a fraction ``0 < f < 1``, or a fixed int to
            validate; parsed by :func:`batchlab.parse_batch`.
        memory_budget: treat the device as having this much memory ("4GiB", bytes): like a container limit.
            The fraction applies to it. Default: the device's capacity.
        amp: ``"bf16"`` / ``"fp16"`` to probe under autocast; only for a Workload built without ``amp``.
        max_batch_size, dataset_size: the answer never exceeds either (a Workload's own ``dataset_size`` is
            used when this is None).
        multiple_of: the answer is a multiple of this (e.g. 8 for tensor cores).
        on_probe: called with each :class:`Probe` as it completes (progress displays).
        estimate: a predicted memory line (``batchlab.estimate_memory_line``, ``PlanResult.memory_line``): after
            the first probe the search jumps toward its predicted size instead of climbing 8x at a time; only
            its slope is used (see :func:`next_candidate`). The answer is still a size that ran.
        state_copy: where the copy of the user's state lives between probes: ``"memory"`` (host RAM),
            ``"disk"`` (a temporary folder, ``BATCHLAB_STATE_DIR``), or ``"auto"``: RAM unless it would take
            more than half the host's free memory -- or, on the CPU, push the probes past the hard limit --
            then disk (:func:`batchlab.state.copy_storage`).

    Raises:
        DoesNotFitError: when even the smallest allowed size does not fit; it says what that size needs.
        BatchlabError: when the state copy fits neither host RAM nor the disk (said before copying).
        ValueError / TypeError: for bad arguments, before anything runs.

    Process-wide effects that cannot be avoided (CUDA): the device's peak statistics are reset and its cache is
    emptied before each probe (``torch.cuda.reset_peak_memory_stats`` / ``empty_cache``), so peaks you read
    yourself afterwards start from the search.
    """
    started = time.perf_counter()
    spec = parse_batch(batch)
    budget_override = parse_bytes(memory_budget) if memory_budget is not None else None
    max_batch_size = _positive_int_or_none("max_batch_size", max_batch_size)
    dataset_size = _positive_int_or_none("dataset_size", dataset_size)
    multiple_of = _positive_int_or_none("multiple_of", multiple_of)
    if estimate is not None and not isinstance(estimate, MemoryLine):
        raise TypeError(
            f"estimate must be a batchlab.search.MemoryLine or None, got {type(estimate).__name__}"
        )
    work = as_workload(workload, preserve=preserve)
    amp = parse_amp(amp)
    if amp is not None:
        if not isinstance(work, Workload):
            raise ValueError("amp= needs a Workload; a plain step callable must apply autocast itself")
        if work.amp not in (None, amp):
            raise ValueError(f"amp={amp!r} conflicts with the workload's amp={work.amp!r}")
        work = work.with_amp(amp)
    dataset_size = dataset_size or work.dataset_size
    caps = {
        name: value
        for name, value in (("max_batch_size", max_batch_size), ("dataset size", dataset_size))
        if value
    }
    cap = min(caps.values()) if caps else None
    if cap is not None and cap < multiple_of:
        raise ValueError(f"multiple_of={multiple_of} is larger than the batch cap {cap} ({', '.join(caps)})")
    if spec.is_fixed and cap is not None and spec.size > cap:
        raise ValueError(f"batch {spec.size} exceeds the cap {cap} ({', '.join(caps)})")
    dev = resolve_device(device, work.device if isinstance(work, Workload) else None)

    capacity = budget_override or dev.capacity_bytes()
    fraction = spec.fraction
    budget = capacity if spec.is_fixed else int(capacity * fraction)

    probes: list[Probe] = []
    notes: list[str] = []
    snapshot = _take_snapshot(work, dev, budget, state_copy)
    # On the CPU the whole process is measured, and it holds the state copy only while the search runs; the
    # user's run will not, so readings are taken net of it (a 14 MiB copy cost the gpt workload a sample of 22).
    own_bytes = snapshot.nbytes if isinstance(dev, CPUDevice) else 0
    copy_in_ram_bytes = own_bytes  # for the notes: what the readings were netted of
    # The hard limit, by contrast, applies to what the process really holds -- the copy included -- so in the
    # net terms of the readings it sits ``own_bytes`` lower (read now that the copy exists).
    gross_limit = dev.hard_limit_bytes()
    hard_limit = _net_hard_limit(gross_limit, own_bytes)
    before = work.tensor_bytes()

    def run(batch_size: int, predicted: int | None, scout: bool = False) -> Probe:
        # A scout's state step runs at the smallest verified fit: it always fits, whatever the first size.
        smallest = min((p.batch_size for p in probes if p.fits and p.verified), default=None)
        state_step = smallest if scout else None
        if hard_limit is not None and predicted is not None and predicted > hard_limit:
            probe = Probe(batch_size, "skipped", None, None, predicted, 0.0, 0)
        else:
            # A failed step is released by the device after its except block (Device.run); what the restore
            # frees then -- the step's gradients and optimizer state -- goes by reference counting, and CUDA's
            # cache is emptied before the next probe (CUDADevice._begin), so nothing is left to release here. A
            # second full collection cost ~0.35 s per failed probe in a process that imports Lightning.
            try:
                probe = _probe(dev, work, batch_size, budget, predicted, own_bytes, state_step)
            finally:
                snapshot.restore()
        probes.append(probe)
        log.info("probe b=%d: %s (peak %s)", batch_size, probe.outcome, format_bytes(probe.peak_bytes))
        if on_probe is not None:
            on_probe(probe)
        return probe

    moved_copy_at: int | None = None  # the size whose out-of-memory error sent the state copy to disk
    retried = False  # and whether that size ran again

    def move_copy_to_disk() -> bool:
        """Take the state copy out of the measured process (CPU); False where it must stay in RAM."""
        nonlocal snapshot, own_bytes, hard_limit
        try:
            directory = copy_storage(work.snapshot_bytes(), host_room_bytes(), requested="disk")
        except BatchlabError as exc:
            notes.append(f"the state copy stayed in RAM: {exc}")
            return False
        moved = work.snapshot(directory)  # of the user's state: every probe restores it
        snapshot.close()
        snapshot, own_bytes = moved, moved.nbytes
        hard_limit = _net_hard_limit(gross_limit, own_bytes)
        return True

    def run_and_retry(batch_size: int, predicted: int | None, scout: bool = False) -> Probe:
        """:func:`run`, and once more with the state copy on disk where the copy may be what ran out.

        Readings are net of the copy, but a limit that raises (RLIMIT_AS, an allocator's, an emulated budget)
        counts the whole process: after the first out-of-memory error with the copy in the measured process,
        the copy goes to disk for the rest of the search (from then on it could only cost sizes the user's run
        can hold), and the size runs again unless the line expected it not to fit. Measured in
        benchmarks/autobatch.py (the emulated OOM at the budget): a 14 MiB copy made gpt fail at 22 of 22.
        """
        nonlocal moved_copy_at, retried
        probe = run(batch_size, predicted, scout)
        if probe.outcome == "oom" and own_bytes and state_copy != "memory" and move_copy_to_disk():
            moved_copy_at = batch_size
            if predicted is None or predicted <= budget:  # not explained by the line
                retried = True
                probe = run(batch_size, predicted, scout)
        return probe

    try:
        if spec.is_fixed:
            result_probe = _check_fixed(run_and_retry, probes, spec.size, budget, multiple_of, hard_limit)
            limited_by, chosen = "fixed", spec.size
        else:
            stop_reason = ""
            while len(probes) < MAX_PROBES:
                decision = next_candidate(
                    probes,
                    budget,
                    multiple_of=multiple_of,
                    cap=cap,
                    hard_limit_bytes=hard_limit,
                    estimate=estimate,
                    created_bytes=_optimizer_state_created(probes, before),
                )
                if decision.batch_size is None:
                    stop_reason = decision.reason
                    break
                if decision.reason == BATCH_ONE_FALLBACK:
                    _run_batch_one(run, probes[0], budget, capacity)
                else:
                    run_and_retry(decision.batch_size, decision.predicted_peak_bytes, decision.scout)
            else:
                stop_reason = "probe limit"
            result_probe = largest_fit(probes, verified=True)
            if result_probe is None:
                _raise_does_not_fit(min(probes, key=lambda p: p.batch_size), budget, capacity)
            chosen = result_probe.batch_size
            limited_by = {"cap": " / ".join(name for name, v in caps.items() if v == cap)}.get(
                stop_reason, stop_reason
            )
    finally:
        snapshot.restore()
        snapshot.close()

    line = fit_memory_line(probes)
    if isinstance(dev, CPUDevice):
        notes.insert(
            0,
            "CPU peak counts the whole process, net of batchlab's own state copy "
            f"({format_bytes(copy_in_ram_bytes)}), which the search holds and your run will not",
        )
    if moved_copy_at is not None:
        notes.append(
            f"batch {moved_copy_at} ran out of memory with batchlab's state copy "
            f"({format_bytes(copy_in_ram_bytes)}) in the process, which your run will not hold: the copy moved "
            f"to disk ({format_bytes(snapshot.disk_bytes)})"
            + (f" and batch {moved_copy_at} ran again" if retried else "")
        )
    elif snapshot.storage == "disk":
        notes.append(f"the state copy ({format_bytes(snapshot.disk_bytes)}) was kept on disk, not in RAM")
    skipped = sum(p.skipped_optimizer_steps for p in probes)
    if skipped:
        notes.append(skip_note(skipped, [scale for p in probes for scale in p.skipped_at_scales]))
    if any(p.optimizer_steps == 0 for p in probes if p.outcome in ("fits", "over budget")):
        notes.append(
            "an optimizer in preserve= never stepped during a probe, so its state may be missing from the "
            "peak: if a GradScaler skipped the step (fp16 overflow), pass the scaler in preserve= too"
        )
    if limited_by == "hard limit" and own_bytes:
        notes.append(
            f"the hard limit ({format_bytes(gross_limit)}) stopped the search; it includes batchlab's state copy "
            f"({format_bytes(own_bytes)}): state_copy='disk' frees that room"
        )
    return FitResult(
        batch_size=chosen,
        fits=result_probe is not None and result_probe.fits,
        mode="fixed" if spec.is_fixed else "fit",
        fraction=fraction,
        device=dev.name,
        capacity_bytes=capacity,
        budget_bytes=budget,
        peak_bytes=result_probe.peak_bytes if result_probe else None,
        predicted_peak_bytes=result_probe.predicted_peak_bytes if result_probe else None,
        bytes_per_sample=line.bytes_per_sample if line else None,
        fixed_bytes=line.fixed_bytes if line else None,
        limited_by=limited_by,
        memory_breakdown=_breakdown(result_probe, before) if result_probe and result_probe.fits else None,
        probes=probes,
        search_seconds=time.perf_counter() - started,
        workload=work.name,
        notes=notes,
        state_copy_bytes=snapshot.nbytes + snapshot.disk_bytes,
        state_copy_storage=snapshot.storage,
        skipped_optimizer_steps=skipped,
        device_settings=dev.settings(),
    )


def _optimizer_state_created(probes: Sequence[Probe], before: dict[str, int] | None) -> int:
    """The optimizer state a probe's steps created (0 where the workload cannot tell: a step callable)."""
    for probe in probes:
        if probe.tensor_bytes is not None and before is not None:
            return max(probe.tensor_bytes["optimizer_state"] - before["optimizer_state"], 0)
    return 0


def _net_hard_limit(gross_limit: int | None, own_bytes: int) -> int | None:
    """The hard limit in the readings' terms: ``HARD_LIMIT_MARGIN`` below it, net of the search's own copy."""
    return None if gross_limit is None else int(gross_limit * (1 - HARD_LIMIT_MARGIN)) - own_bytes


def _take_snapshot(work: Workload | StepFunction, dev: Device, budget: int, requested: str):
    """Copy the user's state, in RAM or on disk (:func:`batchlab.state.copy_storage` decides; raises first)."""
    copy_bytes = work.snapshot_bytes()
    host_room = host_room_bytes()
    # On the CPU the copy shares the hard limit with the probes: when it would take room the budget needs
    # (and is not negligible next to it), keep it on disk.
    gross_limit = dev.hard_limit_bytes() if isinstance(dev, CPUDevice) else None
    crowded = (
        gross_limit is not None
        and copy_bytes > NEGLIGIBLE_COPY * budget
        and budget + copy_bytes > gross_limit * (1 - HARD_LIMIT_MARGIN)
    )
    directory = copy_storage(copy_bytes, host_room, requested=requested, must_leave_ram=crowded)
    return work.snapshot(directory)


def _check_fixed(run, probes, size, budget, multiple_of, hard_limit) -> Probe:
    """Validate a fixed batch size: run it, unless a small-probe line puts it above the hard limit (CPU RAM)."""
    predicted = None
    if hard_limit is not None and size > 2 * first_size(multiple_of):
        for small in (first_size(multiple_of), 2 * first_size(multiple_of)):
            run(small, None)
        line = fit_memory_line(probes)
        if line is not None:
            predicted = int(line.peak(size))
    return run(size, predicted)


def _run_batch_one(run, batch_two: Probe, budget: int, capacity: int) -> None:
    """Try batch 1 after batch 2 did not fit.

    An error that is not an out-of-memory (a model that cannot train on one sample: BatchNorm) propagates
    unchanged, as every error of the user's model does (errors.py); a note on it says that batch 2 did not fit.
    """
    try:
        run(1, None)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            need = (
                format_bytes(batch_two.peak_bytes)
                if batch_two.peak_bytes is not None
                else "an out-of-memory error"
            )
            exc.add_note(
                f"batchlab: batch 2 did not fit ({need} against a {format_bytes(budget)} budget), and batch 1 "
                "raised this error"
            )
        raise


def _raise_does_not_fit(
    first: Probe, budget: int, capacity: int, extra: str = "", cause: BaseException | None = None
) -> None:
    need = first.peak_bytes if first.peak_bytes is not None else None
    need_text = format_bytes(need) if need is not None else "more than is available (out-of-memory error)"
    raise DoesNotFitError(
        f"batch {first.batch_size} does not fit: one training step needs {need_text}, the budget is "
        f"{format_bytes(budget)} (of {format_bytes(capacity)}){extra}; free memory, use amp='bf16', or a smaller model",
        batch_size=first.batch_size,
        needed_bytes=need,
        budget_bytes=budget,
    ) from cause
