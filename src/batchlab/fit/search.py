"""AutoBatch done right: the largest batch whose whole training step fits, found with few probes and verified.

The search (device-agnostic; it sees a Device and a Workload, nothing above them):

1. Probe a small size (2, see :func:`~batchlab.fit.decision.first_size`), then grow geometrically (at most x8
   per probe) toward the size a robust line through the larger probes predicts for the budget. Batch 1 alone
   is never trusted: the line uses only probes within 1/8 of the largest that fit, where memory is affine.
2. Run the predicted size for real (``VERIFY_STEPS`` full steps from the user's own starting state); a size is
   an answer only if it ran without an out-of-memory error *and* its measured peak stayed within the budget.
3. Refine between the largest size that fit and the smallest that did not -- secant from measured peaks,
   bisection when the secant stalls or a failure left no peak -- until the next candidate would move the
   answer by less than 1%.

Sizes that only feed the line or refine a bracket run as *scouts* -- one state-creating step at a small size,
then one step at the size -- at half the cost; the answer is always a size verified in full. It never answers
a size that failed or was not run, never runs a step its prediction puts above the device's hard limit (CPU
RAM: the kernel kills rather than raises), and restores the workload's state after every probe. What to try
next is decided by pure functions (:mod:`batchlab.fit.decision`); this module runs them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from batchlab import checks
from batchlab.devices import CPUDevice, Device, resolve_device
from batchlab.devices.cpu import host_room_bytes, measuring_allocator
from batchlab.errors import BatchlabError, DoesNotFitError
from batchlab.fit.decision import (
    BATCH_ONE_FALLBACK,
    CAP,
    MAX_GROWTH,
    MAX_PROBES,
    first_size,
    fit_memory_line,
    largest_fit,
    next_candidate,
)
from batchlab.fit.probe import breakdown_of, run_probe
from batchlab.fit.records import FitResult, Limit, MemoryLine, Outcome, Probe
from batchlab.fit.shape_decision import ShapeGuide, next_shape_candidate
from batchlab.fit.shapes import Shape, ShapeTable, search_shapes
from batchlab.spec import parse_amp, parse_batch
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload.evaluation import EvalStep, StepMode, for_mode
from batchlab.workload.skipped_steps import skip_note
from batchlab.workload.state import StateSnapshot, copy_storage
from batchlab.workload.workload import StepFunction, Workload, as_workload

log = logging.getLogger("batchlab")

# Never run a step predicted above 95% of the hard limit (CPU RAM or the container's limit): the prediction is
# a line through noisy readings, and the kernel's OOM kill -- unlike an exception -- ends the search.
HARD_LIMIT_MARGIN = 0.05
# A CPU state copy below 1% of the budget stays in RAM even where it crowds the hard limit: moving it to disk
# would cost a file read per probe to win back less than the search's own 1% tolerance.
NEGLIGIBLE_COPY = 0.01


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
    estimate: MemoryLine | Mapping[Shape, MemoryLine] | None = None,
    state_copy: str = "auto",
    mode: str = "train",
    shapes: Sequence[Shape] | None = None,
) -> FitResult | ShapeTable:
    """Find the largest batch size whose full training step fits in memory -- or check a fixed one.

    Args:
        workload: a :class:`~batchlab.Workload`, or any callable ``step(batch_size)`` that runs one training
            step (pass ``preserve=(model, optimizer)`` to have their state restored after each probe).
        device: ``"auto"`` (where the model lives), ``"cpu"``, ``"cuda:N"`` or a :class:`~batchlab.devices.Device`.
        batch: ``-1``/``"auto"`` (largest at 0.90 of capacity), a fraction ``0 < f < 1``, or a fixed int to
            validate; parsed by :func:`batchlab.spec.parse_batch`.
        memory_budget: treat the device as having this much memory ("4GiB", bytes): like a container limit.
            The fraction applies to it. Default: the device's capacity.
        amp: ``"bf16"`` / ``"fp16"`` to probe under autocast; only for a Workload built without ``amp``.
        max_batch_size, dataset_size: the answer never exceeds either (a Workload's own ``dataset_size`` is
            used when this is None).
        multiple_of: the answer is a multiple of this (e.g. 8 for tensor cores).
        on_probe: called with each :class:`~batchlab.fit.records.Probe` as it completes (progress displays).
        estimate: a predicted memory line (``batchlab.planning.estimate_memory_line``, ``PlanResult.memory_line``): after
            the first probe the search jumps toward its predicted size instead of climbing 8x at a time; only
            its slope is used (see :func:`~batchlab.fit.decision.next_candidate`). The answer is still a size
            that ran. With ``shapes=``: one line per shape, ``{shape: line}``
            (``batchlab.planning.estimate_memory_lines``), that seeds the table (:mod:`batchlab.fit.shapes`).
        state_copy: where the copy of the user's state lives between probes: ``"memory"`` (host RAM),
            ``"disk"`` (a temporary folder, ``BATCHLAB_STATE_DIR``), or ``"auto"``: RAM unless it would take
            more than half the host's free memory -- or, on the CPU, push the probes past the hard limit --
            then disk (:func:`batchlab.workload.state.copy_storage`).
        mode: ``"train"`` (the full training step) or ``"eval"``: the largest *evaluation* batch -- the
            Workload's batch and loss under ``no_grad`` with the model in eval mode, no backward, no optimizer
            step (:class:`~batchlab.workload.evaluation.EvalStep`), verified the same way. It is the evaluation
            alone: an evaluation between training steps also holds the gradients and optimizer state, for
            which :meth:`batchlab.fit.SearchOptions.run` (``beside=``) leaves room. A plain step callable is
            refused: batchlab cannot make it evaluate.
        shapes: batch shapes to answer for -- sequence lengths ``[128, 256, 512]`` or image sizes
            ``[(320, 320), (640, 640)]``, sorted, each once -- for a workload whose ``make_batch`` (or step)
            takes a ``shape`` keyword: returns a :class:`~batchlab.fit.shapes.ShapeTable` with the largest
            batch of each shape, each verified by real steps, the later shapes started from a peak model fitted
            over the earlier ones (:mod:`batchlab.fit.shapes`).

    Raises:
        DoesNotFitError: when even the smallest allowed size does not fit; it says what that size needs.
        BatchlabError: when the state copy fits neither host RAM nor the disk (said before copying).
        ValueError / TypeError: for bad arguments, before anything runs.

    Process-wide effects that cannot be avoided (CUDA): the device's peak statistics are reset and its cache is
    emptied before each probe (``torch.cuda.reset_peak_memory_stats`` / ``empty_cache``), so peaks you read
    yourself afterwards start from the search.
    """
    spec = parse_batch(batch)
    budget_override = parse_bytes(memory_budget) if memory_budget is not None else None
    max_batch_size = checks.integer("max_batch_size", max_batch_size, none=True)
    dataset_size = checks.integer("dataset_size", dataset_size, none=True)
    multiple_of = checks.integer("multiple_of", multiple_of)
    if shapes is None and estimate is not None and not isinstance(estimate, MemoryLine):
        raise TypeError(f"estimate must be a batchlab.fit.MemoryLine or None, got {type(estimate).__name__}")
    mode = checks.choice("mode", mode, [m.value for m in StepMode])
    work = _with_amp(as_workload(workload, preserve=preserve), parse_amp(amp))
    home = work.device if isinstance(work, Workload) else None
    if shapes is not None:
        checked = checks.shapes("shapes", shapes)
        planned = None if estimate is None else _lines_per_shape(estimate, checked)
        shaped = {shape: for_mode(work.with_shape(shape), mode) for shape in checked}
    work = for_mode(work, mode)
    caps = _caps(max_batch_size, dataset_size or work.dataset_size)
    cap = min(caps.values()) if caps else None
    if cap is not None and cap < multiple_of:
        raise ValueError(f"multiple_of={multiple_of} is larger than the batch cap {cap} ({', '.join(caps)})")
    if spec.is_fixed and cap is not None and spec.size > cap:
        raise ValueError(f"batch {spec.size} exceeds the cap {cap} ({', '.join(caps)})")
    dev = resolve_device(device, home)
    capacity = budget_override or dev.capacity_bytes()
    budget = capacity if spec.is_fixed else int(capacity * spec.fraction)

    def fit(
        work: Workload | StepFunction, estimate: MemoryLine | None, guide: ShapeGuide | None
    ) -> FitResult:
        return _fit(
            work, dev, spec, capacity, budget, multiple_of, caps, estimate, guide, state_copy, on_probe
        )

    if shapes is None:
        return fit(work, estimate, None)
    return search_shapes(list(shaped), lambda shape, guide: fit(shaped[shape], None, guide),
                         seconds=time.perf_counter, estimate=planned)  # fmt: skip


def _lines_per_shape(estimate: Any, shapes: Sequence[Shape]) -> dict[Shape, MemoryLine]:
    """``estimate`` with ``shapes=``: a planned :class:`MemoryLine` for every shape, each with a positive slope."""
    if not isinstance(estimate, Mapping):
        raise TypeError(
            "with shapes=, estimate must map each shape to a batchlab.fit.MemoryLine "
            f"(batchlab.planning.estimate_memory_lines), got {type(estimate).__name__}"
        )
    lines = {checks.shape("shape in estimate", shape): line for shape, line in estimate.items()}
    if set(lines) != set(shapes):
        raise ValueError(
            f"estimate has lines for {sorted(lines, key=checks.shape_size)}; expected one for each of the shapes {shapes}"
        )
    for shape, line in lines.items():
        if not isinstance(line, MemoryLine) or not line.bytes_per_sample > 0:
            raise ValueError(
                f"estimate for shape {shape!r} is {line!r}; expected a MemoryLine with bytes_per_sample > 0"
            )
    return {shape: lines[shape] for shape in shapes}


def _fit(
    work: Workload | StepFunction,
    dev: Device,
    spec: Any,
    capacity: int,
    budget: int,
    multiple_of: int,
    caps: dict[Limit, int],
    estimate: MemoryLine | None,
    guide: ShapeGuide | None,
    state_copy: str,
    on_probe: Callable[[Probe], None] | None,
) -> FitResult:
    """One search (or fixed check) of ``work`` on ``dev``, its arguments checked by :func:`find_batch_size`."""
    started = time.perf_counter()
    search = _Search(work, dev, budget, state_copy, on_probe)
    try:
        if spec.is_fixed:
            answer, limited_by = _check_fixed(search, spec.size, multiple_of), Limit.FIXED
        else:
            answer, limited_by = _search(search, budget, capacity, multiple_of, caps, estimate, guide)
    finally:
        search.close()

    line = fit_memory_line(search.probes)
    return FitResult(
        batch_size=answer.batch_size if answer is not None else spec.size,
        fits=answer is not None and answer.fits,
        mode="fixed" if spec.is_fixed else "fit",
        step_mode=StepMode.EVAL if isinstance(work, EvalStep) else StepMode.TRAIN,
        fraction=spec.fraction,
        device=dev.name,
        capacity_bytes=capacity,
        budget_bytes=budget,
        peak_bytes=answer.peak_bytes,
        predicted_peak_bytes=answer.predicted_peak_bytes,
        bytes_per_sample=line.bytes_per_sample if line else None,
        fixed_bytes=line.fixed_bytes if line else None,
        limited_by=limited_by,
        memory_breakdown=breakdown_of(answer, search.before) if answer.fits else None,
        probes=search.probes,
        search_seconds=time.perf_counter() - started,
        workload=work.name,
        notes=search.result_notes(limited_by),
        state_copy_bytes=search.snapshot.nbytes + search.snapshot.disk_bytes,
        state_copy_storage=search.snapshot.storage,
        skipped_optimizer_steps=sum(p.skipped_optimizer_steps for p in search.probes),
        device_settings=dev.settings(),
    )


def _with_amp(work: Workload | StepFunction, amp: str | None) -> Workload | StepFunction:
    if amp is None:
        return work
    if not isinstance(work, Workload):
        raise ValueError("amp= needs a Workload; a plain step callable must apply autocast itself")
    if work.amp not in (None, amp):
        raise ValueError(f"amp={amp!r} conflicts with the workload's amp={work.amp!r}")
    return work.with_amp(amp)


def _caps(max_batch_size: int | None, dataset_size: int | None) -> dict[Limit, int]:
    """The caps on the answer, by the limit each is; the user's own ``max_batch_size`` names a tie."""
    return {
        limit: value
        for limit, value in ((Limit.MAX_BATCH_SIZE, max_batch_size), (Limit.DATASET_SIZE, dataset_size))
        if value
    }


def _search(
    search: _Search,
    budget: int,
    capacity: int,
    multiple_of: int,
    caps: dict[Limit, int],
    estimate: MemoryLine | None,
    guide: ShapeGuide | None = None,
) -> tuple[Probe, Limit]:
    """The largest verified fit and what limited it: :func:`next_candidate` until it says stop -- or, at one
    shape of a table (``guide``), :func:`~batchlab.fit.shape_decision.next_shape_candidate`."""
    cap = min(caps.values()) if caps else None
    stop_reason: str = Limit.PROBE_LIMIT
    while len(search.probes) < MAX_PROBES:
        limits = {"multiple_of": multiple_of, "cap": cap, "hard_limit_bytes": search.hard_limit,
                  "created_bytes": search.optimizer_state_created()}  # fmt: skip
        if guide is None:
            decision = next_candidate(search.probes, budget, estimate=estimate, **limits)
        else:
            decision = next_shape_candidate(search.probes, budget, guide, **limits)
        if decision.batch_size is None:
            stop_reason = decision.reason
            break
        if decision.reason == BATCH_ONE_FALLBACK:
            _run_batch_one(search, search.probes[0], budget)
        else:
            search.run_and_retry(decision.batch_size, decision.predicted_peak_bytes, decision.scout)
    answer = largest_fit(search.probes, verified=True)
    if answer is None:
        _raise_does_not_fit(min(search.probes, key=lambda p: p.batch_size), budget, capacity)
    if stop_reason == CAP:
        return answer, next(limit for limit, value in caps.items() if value == cap)
    return answer, Limit(stop_reason)


class _Search:
    """The state of one search: the user's state copy, the hard limit in the readings' terms, the probes."""

    def __init__(
        self,
        work: Workload | StepFunction,
        dev: Device,
        budget: int,
        state_copy: str,
        on_probe: Callable[[Probe], None] | None,
    ):
        self.work, self.dev, self.budget, self.state_copy, self.on_probe = (
            work,
            dev,
            budget,
            state_copy,
            on_probe,
        )
        self.probes: list[Probe] = []
        self.notes: list[str] = []
        self.snapshot = _take_snapshot(work, dev, budget, state_copy)
        # On the CPU the whole process is measured, and it holds the state copy only while the search runs;
        # the user's run will not, so readings are taken net of it (a 14 MiB copy cost gpt a sample of 22).
        self.own_bytes = self.snapshot.nbytes if isinstance(dev, CPUDevice) else 0
        self.copy_in_ram_bytes = self.own_bytes  # for the notes: what the readings were netted of
        # The hard limit, by contrast, applies to what the process really holds -- the copy included -- so in
        # the net terms of the readings it sits ``own_bytes`` lower (read now that the copy exists).
        self.gross_limit = dev.hard_limit_bytes()
        self.hard_limit = _net_hard_limit(self.gross_limit, self.own_bytes)
        self.before = work.tensor_bytes()
        self.moved_copy_at: int | None = None  # the size whose out-of-memory error sent the copy to disk
        self.retried = False  # and whether that size ran again

    def run(self, batch_size: int, predicted: int | None, scout: bool = False) -> Probe:
        """Probe ``batch_size`` (a scout's state step at the smallest verified fit) and restore the state."""
        smallest = min((p.batch_size for p in self.probes if p.fits and p.verified), default=None)
        state_step = smallest if scout else None
        if self.hard_limit is not None and predicted is not None and predicted > self.hard_limit:
            probe = Probe(batch_size, Outcome.SKIPPED, None, None, predicted, 0.0, 0)
        else:
            # A failed step is released by the device after its except block (Device.run); what the restore
            # frees then -- the step's gradients and optimizer state -- goes by reference counting, and CUDA's
            # cache is emptied before the next probe (CUDADevice._begin), so nothing is left to release here.
            # A second full collection cost ~0.35 s per failed probe in a process that imports Lightning.
            try:
                probe = run_probe(
                    self.dev, self.work, batch_size, self.budget, predicted, self.own_bytes, state_step
                )
            finally:
                self.snapshot.restore()
        self.probes.append(probe)
        log.info("probe b=%d: %s (peak %s)", batch_size, probe.outcome, format_bytes(probe.peak_bytes))
        if self.on_probe is not None:
            self.on_probe(probe)
        return probe

    def run_and_retry(self, batch_size: int, predicted: int | None, scout: bool = False) -> Probe:
        """:meth:`run`, and once more with the state copy on disk where the copy may be what ran out.

        Readings are net of the copy, but a limit that raises (RLIMIT_AS, an allocator's, an emulated budget)
        counts the whole process: after the first out-of-memory error with the copy in the measured process,
        the copy goes to disk for the rest of the search (from then on it could only cost sizes the user's run
        can hold), and the size runs again unless the line expected it not to fit. Measured in
        benchmarks/autobatch.py (the emulated OOM at the budget): a 14 MiB copy made gpt fail at 22 of 22.
        """
        probe = self.run(batch_size, predicted, scout)
        if probe.outcome == Outcome.OOM and self.own_bytes and self.state_copy != "memory":
            if self._move_copy_to_disk():
                self.moved_copy_at = batch_size
                if predicted is None or predicted <= self.budget:  # not explained by the line
                    self.retried = True
                    probe = self.run(batch_size, predicted, scout)
        return probe

    def _move_copy_to_disk(self) -> bool:
        """Take the state copy out of the measured process (CPU); False where it must stay in RAM."""
        try:
            directory = copy_storage(self.work.snapshot_bytes(), host_room_bytes(), requested="disk")
        except BatchlabError as exc:
            self.notes.append(f"the state copy stayed in RAM: {exc}")
            return False
        moved = self.work.snapshot(directory)  # of the user's state: every probe restores it
        self.snapshot.close()
        self.snapshot, self.own_bytes = moved, moved.nbytes
        self.hard_limit = _net_hard_limit(self.gross_limit, self.own_bytes)
        return True

    def optimizer_state_created(self) -> int:
        """The optimizer state a probe's steps created (0 where the workload cannot tell: a step callable)."""
        for probe in self.probes:
            if probe.tensor_bytes is not None and self.before is not None:
                return max(probe.tensor_bytes.optimizer_state - self.before.optimizer_state, 0)
        return 0

    def close(self) -> None:
        self.snapshot.restore()
        self.snapshot.close()

    def result_notes(self, limited_by: Limit) -> list[str]:
        """What the result should say about how it was measured, in plain words."""
        notes = list(self.notes)
        if isinstance(self.dev, CPUDevice):
            notes.insert(
                0,
                "CPU peak counts the whole process, net of batchlab's own state copy "
                f"({format_bytes(self.copy_in_ram_bytes)}), which the search holds and your run will not",
            )
        if self.moved_copy_at is not None:
            notes.append(
                f"batch {self.moved_copy_at} ran out of memory with batchlab's state copy "
                f"({format_bytes(self.copy_in_ram_bytes)}) in the process, which your run will not hold: the "
                f"copy moved to disk ({format_bytes(self.snapshot.disk_bytes)})"
                + (f" and batch {self.moved_copy_at} ran again" if self.retried else "")
            )
        elif self.snapshot.storage == "disk":
            notes.append(
                f"the state copy ({format_bytes(self.snapshot.disk_bytes)}) was kept on disk, not in RAM"
            )
        skipped = sum(p.skipped_optimizer_steps for p in self.probes)
        if skipped:
            notes.append(skip_note(skipped, [scale for p in self.probes for scale in p.skipped_at_scales]))
        if any(p.optimizer_steps == 0 for p in self.probes if p.measured):
            notes.append(
                "an optimizer in preserve= never stepped during a probe, so its state may be missing from the "
                "peak: if a GradScaler skipped the step (fp16 overflow), pass the scaler in preserve= too"
            )
        if limited_by == Limit.HARD_LIMIT and self.own_bytes:
            notes.append(
                f"the hard limit ({format_bytes(self.gross_limit)}) stopped the search; it includes batchlab's "
                f"state copy ({format_bytes(self.own_bytes)}): state_copy='disk' frees that room"
            )
        return notes


def _net_hard_limit(gross_limit: int | None, own_bytes: int) -> int | None:
    """The hard limit in the readings' terms: ``HARD_LIMIT_MARGIN`` below it, net of the search's own copy."""
    return None if gross_limit is None else int(gross_limit * (1 - HARD_LIMIT_MARGIN)) - own_bytes


def _take_snapshot(work: Workload | StepFunction, dev: Device, budget: int, requested: str) -> StateSnapshot:
    """Copy the user's state, in RAM or on disk (:func:`batchlab.workload.state.copy_storage` decides; raises first)."""
    copy_bytes = work.snapshot_bytes()
    # On the CPU the copy shares the hard limit with the probes: when it would take room the budget needs
    # (and is not negligible next to it), keep it on disk.
    gross_limit = dev.hard_limit_bytes() if isinstance(dev, CPUDevice) else None
    crowded = (
        gross_limit is not None
        and copy_bytes > NEGLIGIBLE_COPY * budget
        and budget + copy_bytes > gross_limit * (1 - HARD_LIMIT_MARGIN)
    )
    directory = copy_storage(copy_bytes, host_room_bytes(), requested=requested, must_leave_ram=crowded)
    return work.snapshot(directory)


def _check_fixed(search: _Search, size: int, multiple_of: int) -> Probe:
    """Validate a fixed batch size: run it, unless a small-probe line puts it above the hard limit (CPU RAM)."""
    predicted = None
    if search.hard_limit is not None and size > 2 * first_size(multiple_of):
        for small in (first_size(multiple_of), 2 * first_size(multiple_of)):
            search.run_and_retry(small, None)
        line = fit_memory_line(search.probes)
        if line is not None:
            predicted = int(line.peak(size))
    return search.run_and_retry(size, predicted)


def check_host_room(workload: Workload, batch_size: int, *, what: str) -> None:
    """Refuse, before it runs, training at ``batch_size`` that the host cannot hold.

    On the CPU a step past the RAM is killed by the kernel, not raised (:mod:`batchlab.devices.cpu`): the
    process goes, and what the user had not saved goes with it. So this probes as the search grows -- from
    batch 2, x``MAX_GROWTH`` a probe while below ``batch_size``, each probe run only where the line through
    the last ones predicts it within the RAM -- and raises :class:`~batchlab.errors.DoesNotFitError` as soon
    as that line puts ``batch_size`` above the RAM (or a probe does not fit). It does not look for the largest
    batch that fits (``batchlab fit`` does): a refusal takes a few small probes, not a search to the edge. The
    state is restored bitwise, and the allocator left as fast as it was
    (:func:`~batchlab.devices.cpu.measuring_allocator`). Off the CPU, where running out raises, and for batch 2
    or less, it does nothing. ``what`` names the caller ("the noise measurement").
    """
    if workload.device.type != "cpu" or batch_size <= first_size(1):
        return
    with measuring_allocator():
        dev = resolve_device("cpu")
        search = _Search(workload, dev, dev.capacity_bytes(), "auto", None)
        try:
            size, predicted, fits, line = first_size(1), None, True, None
            while fits and size < batch_size:  # each probe run only where the last probes' line allows it
                fits = search.run_and_retry(size, None if line is None else int(line.peak(size))).fits
                line = fit_memory_line(search.probes)
                predicted = None if line is None else int(line.peak(batch_size))
                fits = fits and (predicted is None or predicted <= search.hard_limit)
                size *= MAX_GROWTH
        finally:
            search.close()
    if not fits:
        ran = max((p.batch_size for p in search.probes if p.fits), default=None)
        need = "more" if predicted is None else f"about {format_bytes(predicted)}"
        raise DoesNotFitError(
            f"{what} at batch {batch_size} would need {need} of RAM, above the {format_bytes(search.hard_limit)} "
            "this process can use: a CPU step past it is killed, not raised, so it did not run; give a smaller "
            f"batch ({f'batch {ran} ran' if ran else 'not even batch 2 fits'}; batchlab fit finds the largest "
            "that fits)",
            batch_size=batch_size,
            needed_bytes=predicted,
            budget_bytes=search.hard_limit,
        )


def _run_batch_one(search: _Search, batch_two: Probe, budget: int) -> None:
    """Try batch 1 after batch 2 did not fit.

    An error that is not an out-of-memory (a model that cannot train on one sample: BatchNorm) propagates
    unchanged, as every error of the user's model does (errors.py); a note on it says that batch 2 did not fit.
    """
    try:
        search.run(1, None)
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


def _raise_does_not_fit(first: Probe, budget: int, capacity: int) -> None:
    need = first.peak_bytes
    need_text = format_bytes(need) if need is not None else "more than is available (out-of-memory error)"
    raise DoesNotFitError(
        f"batch {first.batch_size} does not fit: one training step needs {need_text}, the budget is "
        f"{format_bytes(budget)} (of {format_bytes(capacity)}); free memory, use amp='bf16', or a smaller model",
        batch_size=first.batch_size,
        needed_bytes=need,
        budget_bytes=budget,
    )
