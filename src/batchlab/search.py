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

It never answers a size that failed or was not run, never runs a step its prediction puts above the device's
hard limit (CPU RAM: the kernel kills rather than raises), and restores the workload's state after every
probe. The decision logic (:func:`next_candidate`) is a pure function over the probe history.
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
from batchlab.errors import DoesNotFitError
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
    out-of-memory error) or ``"skipped"`` (not run: predicted above the device's hard limit).
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

    @property
    def fits(self) -> bool:
        return self.outcome == "fits"

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
        return sum(probe.steps for probe in self.probes if probe.outcome != "skipped")

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
    measured = [p for p in probes if p.peak_bytes is not None and p.outcome in ("fits", "over budget")]
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


def _prediction_error(probes: Sequence[Probe], recent: int = 3) -> float:
    """The largest |measured - predicted| peak among the last ``recent`` probes that had both."""
    errors = [
        abs(p.peak_bytes - p.predicted_peak_bytes)
        for p in probes
        if p.peak_bytes is not None and p.predicted_peak_bytes is not None
    ]
    return float(max(errors[-recent:], default=0))


def _align(batch_size: float, multiple_of: int) -> int:
    return int(batch_size // multiple_of) * multiple_of


@dataclass(frozen=True)
class Decision:
    """What the search does next: run ``batch_size`` (with its predicted peak), or stop (``batch_size`` None)."""

    batch_size: int | None
    predicted_peak_bytes: int | None = None
    reason: str = ""


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
    or the next candidate would move the answer by less than ``TOLERANCE``.

    ``estimate`` (optional, e.g. from :func:`batchlab.estimate_memory_line`) stands in for the memory line
    while the probes cannot give one (fewer than two measured sizes): its slope, anchored on the largest
    measured fit, predicts the budget's size and the search jumps ``ESTIMATE_JUMP`` of the way there instead
    of climbing by ``MAX_GROWTH``; the measured line takes over from there. Every size is still run for real.

    ``hard_limit_bytes`` bounds every candidate by :func:`upper_slope` (``created_bytes``: what a step creates
    once, whatever the batch -- gradients and optimizer state -- where the workload can tell).
    """
    if not probes:
        return Decision(first_size(multiple_of), None, "first size")
    ran = [p for p in probes if p.outcome != "skipped"]
    fitting = [p for p in ran if p.fits]
    if not fitting:
        if multiple_of == 1 and [p.batch_size for p in probes] == [2]:
            return Decision(1, None, BATCH_ONE_FALLBACK)
        return Decision(None, reason="smallest size does not fit")
    lo_probe = max(fitting, key=lambda p: p.batch_size)
    lo = lo_probe.batch_size
    failed = [p.batch_size for p in probes if not p.fits and p.batch_size > lo]
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
    else:
        target = min(target, lo * MAX_GROWTH)
    if hi is not None:
        last_two_failed = len(probes) >= 2 and not probes[-1].fits and not probes[-2].fits
        no_peak = not probes[-1].fits and probes[-1].peak_bytes is None  # an OOM says nothing about the slope
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
    if settled and hi is None and how == "line prediction" and multiple_of / lo >= TOLERANCE:
        # At small sizes one more sample is more than 1%: try it rather than trust the rounding of the line.
        step_up = lo + multiple_of
        if cap is None or step_up <= cap:
            return Decision(step_up, int(line.peak(step_up)), "one step past the prediction")
    if settled:
        return Decision(None, reason=stop_reason)
    predicted = int(line.peak(candidate)) if line else None
    return Decision(candidate, predicted, how)


def _probe(
    device: Device,
    workload: Workload | StepFunction,
    batch_size: int,
    budget: int,
    predicted: int | None,
    own_bytes: int = 0,
) -> Probe:
    """Run one probe; the verdict is the search's, not the device's.

    ``own_bytes`` is memory the search itself holds in the measured process (the CPU state copy): it is taken
    off the reading, since the user's own run will not hold it. A step that the workload's GradScaler skips
    still creates the optimizer state (:func:`~batchlab.skipped_steps.steps_always_create_state`).
    """
    tensor_bytes: dict[str, int] | None = None

    def step_and_record(b: int) -> None:
        nonlocal tensor_bytes
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
        measurement.seconds,
        measurement.steps,
        measurement.allocated_bytes,
        tensor_bytes if measurement.ok else None,
        measurement.error,
        skips.skipped,
        tuple(skips.scales),
        skips.optimizer_steps if workload.optimizers else None,
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
    snapshot = _take_snapshot(work, dev, budget, state_copy)
    # On the CPU the whole process is measured, and it holds the state copy only while the search runs; the
    # user's run will not, so readings are taken net of it (a 14 MiB copy cost the gpt workload a sample of 22).
    own_bytes = snapshot.nbytes if isinstance(dev, CPUDevice) else 0
    # The hard limit, by contrast, applies to what the process really holds -- the copy included -- so in the
    # net terms of the readings it sits ``own_bytes`` lower (read now that the copy exists).
    gross_limit = dev.hard_limit_bytes()
    hard_limit = None if gross_limit is None else int(gross_limit * (1 - HARD_LIMIT_MARGIN)) - own_bytes
    before = work.tensor_bytes()

    def run(batch_size: int, predicted: int | None) -> Probe:
        if hard_limit is not None and predicted is not None and predicted > hard_limit:
            probe = Probe(batch_size, "skipped", None, None, predicted, 0.0, 0)
        else:
            try:
                probe = _probe(dev, work, batch_size, budget, predicted, own_bytes)
            finally:
                snapshot.restore()
            if not probe.fits:
                dev.release()  # the failed step's gradients and state were only freed by the restore
        probes.append(probe)
        log.info("probe b=%d: %s (peak %s)", batch_size, probe.outcome, format_bytes(probe.peak_bytes))
        if on_probe is not None:
            on_probe(probe)
        return probe

    try:
        if spec.is_fixed:
            result_probe = _check_fixed(run, probes, spec.size, budget, multiple_of, hard_limit)
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
                    run(decision.batch_size, decision.predicted_peak_bytes)
            else:
                stop_reason = "probe limit"
            fitting = [p for p in probes if p.fits]
            if not fitting:
                _raise_does_not_fit(min(probes, key=lambda p: p.batch_size), budget, capacity)
            result_probe = max(fitting, key=lambda p: p.batch_size)
            chosen = result_probe.batch_size
            limited_by = {"cap": " / ".join(name for name, v in caps.items() if v == cap)}.get(
                stop_reason, stop_reason
            )
    finally:
        snapshot.restore()
        snapshot.close()

    line = fit_memory_line(probes)
    notes = []
    if isinstance(dev, CPUDevice):
        notes.append(
            "CPU peak counts the whole process, net of batchlab's own state copy "
            f"({format_bytes(snapshot.nbytes)}), which the search holds and your run will not"
        )
    if snapshot.storage == "disk":
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
