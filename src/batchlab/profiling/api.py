"""profile(): the orchestration -- per variant, one fit search and every planned size's memory; then each timed.

This module decides what to run and in which order, and restores the workload afterwards; the parts it
calls each have their own module: the records (:mod:`.records`), the pure math (:mod:`.analysis`), the
prose (:mod:`.findings`), the clock (:mod:`.timing`) and the input pipeline (:mod:`.loaders`).

The Tuning Playbook's first step in choosing a batch size is to find the feasible sizes and their throughput:
only sizes up to the one that maximises throughput are worth considering, and throughput that does not
roughly double with the batch points to an input or synchronisation bottleneck. :func:`profile` draws that
curve for every *variant* (a precision -- fp32, bf16 or fp16 autocast -- with or without activation
checkpointing) and says in plain words what each one buys.

Two passes. The first reads memory for every variant, on the measuring device; the second times, on the
device as training runs it (:meth:`~batchlab.devices.Device.for_training`). On the CPU they differ: exact
readings need glibc's 64 KiB mmap threshold, which made its samples/s read 1.35-1.75x low
(benchmarks/RESULTS.md, "The profile timed at training's speed"), and once steps ran at speed an exact
reading reads up to 20% high (:mod:`batchlab.devices.cpu`) -- so every reading comes first. Elsewhere both
passes use the same device.

1. **Which sizes, and what fits.** Run :func:`~batchlab.find_batch_size` once and reuse what it measured: the
   profiled sizes are the smallest size it found to fit, the powers of two above it up to its answer, and the
   answer itself. Every size it probed keeps the search's peak memory and verdict
   (``memory_source="fit search"``); every size it found too big is reported as not fitting without running
   again -- and when it stopped within 1% of the budget without a failure, the next power of two is run to
   show what lies over the edge. Any size the search did not probe runs a probe's ``VERIFY_STEPS`` steps once
   for its peak (``"profile run"``). A size up to the verified answer fits by that verification (memory
   grows with the batch), whatever a noisy reading says. Explicit ``batch_sizes`` skip the search; each then
   stands on its own run.
2. **Timing** (:mod:`.timing`). Each fitting size runs ``WARMUP_STEPS`` (:mod:`batchlab.defaults`) steps
   from the workload's own starting state (one device run), then -- in a second run -- enough steps for about
   ``seconds_per_point`` (``MIN_TIMED_STEPS``..``MAX_TIMED_STEPS``, estimated from the last warm-up step);
   each step is timed between device synchronisations and the median of the timed steps is the step time.
   State is restored after every run. With
   ``rounds`` > 1 (default 1, :data:`~.analysis.DEFAULT_TIMING_ROUNDS`) the fitting sizes are then timed again in
   round-robin rounds -- every size once per round, smallest first -- each window a ``1/rounds`` share of the
   steps, which are pooled per size: a burst of other work falls on every size alike instead of on one.
3. **Summary.** The knee (the smallest size reaching ``knee_threshold`` of the best throughput), the largest
   fitting size and its throughput, memory per sample (a line through the peaks), and findings such as
   "checkpointing lets batch 512 fit at 1.3x the step time".

The decision and summary math (:func:`~.analysis.knee_batch_size`, :func:`~.analysis.memory_per_sample`,
:func:`~.analysis.timed_steps_for`, :func:`~.analysis.summarize_variant`, :func:`~.findings.findings`) are
plain functions over numbers.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from batchlab import checks
from batchlab.defaults import DEFAULT_FRACTION, KNEE_THRESHOLD, MEASURED_MAX_BATCH, VERIFY_STEPS, WARMUP_STEPS
from batchlab.devices import Device, Measurement, resolve_device
from batchlab.errors import DoesNotFitError
from batchlab.fit import FitResult, Limit, Probe, find_batch_size
from batchlab.profiling.analysis import (
    DEFAULT_TIMING_ROUNDS,
    SECONDS_PER_POINT,
    check_rounds,
    default_batch_sizes,
    memory_per_sample,
    summarize_variant,
)
from batchlab.profiling.findings import findings
from batchlab.profiling.loaders import LoaderBatches, loader_factory, with_loader
from batchlab.profiling.records import (
    PRECISIONS,
    MemorySource,
    PointOutcome,
    Profile,
    ProfilePoint,
    VariantSummary,
    variant_name,
)
from batchlab.profiling.timing import Timing, time_steps
from batchlab.spec import parse_amp, parse_fraction
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload.checkpointing import activation_checkpointing, plan_checkpointing
from batchlab.workload.workload import StepFunction, Workload, as_workload

log = logging.getLogger("batchlab")


def parse_precisions(precisions: Sequence[str] | str | None) -> list[str] | None:
    """The precisions to profile, as names: ``"fp32,bf16"`` or ``["fp32", "half"]`` -> ``["fp32", "bf16"]``.

    Each goes through :func:`~batchlab.spec.parse_amp` (its aliases included) and duplicates are dropped;
    None -- the workload's own precision -- stays None. The CLI calls this before it builds a model.
    """
    if precisions is None:
        return None
    items = (
        [p for p in precisions.split(",") if p.strip()] if isinstance(precisions, str) else list(precisions)
    )
    parsed = list(dict.fromkeys(parse_amp(item) or "fp32" for item in items))
    if not parsed:
        raise ValueError(f"invalid precisions {precisions!r}: expected some of {', '.join(PRECISIONS)}")
    return parsed


def _parse_checkpointing(checkpointing: Sequence[bool] | bool) -> list[bool]:
    values = [checkpointing] if isinstance(checkpointing, bool) else list(checkpointing)
    if not values or not all(isinstance(v, bool) for v in values):
        raise ValueError(f"invalid checkpointing {checkpointing!r}: expected True, False or a list of them")
    return list(dict.fromkeys(values))


def _parse_batch_sizes(batch_sizes: Sequence[int] | None) -> list[int] | None:
    if batch_sizes is None:
        return None
    sizes = [checks.integer("batch_sizes", b) for b in batch_sizes]
    if not sizes:
        raise ValueError(f"invalid batch_sizes {batch_sizes!r}: expected at least one int >= 1")
    return sorted(set(sizes))


@contextmanager
def _variant_workload(
    work: Workload | StepFunction,
    precision: str,
    checkpointing: bool,
    checkpoint_modules: Sequence[torch.nn.Module] | None,
) -> Iterator[tuple[Workload | StepFunction, str | None]]:
    """The workload at ``precision`` (sharing model and optimizer), checkpointed inside the block."""
    amp = parse_amp(precision)
    if isinstance(work, StepFunction):
        yield work, None
        return
    variant = work.with_amp(amp)
    if not checkpointing:
        yield variant, None
        return
    with activation_checkpointing(work.model, checkpoint_modules) as plan:
        yield variant, plan.describe()


def profile(
    workload: Workload | StepFunction | Callable[[int], Any],
    *,
    device: str | torch.device | Device = "auto",
    batch_sizes: Sequence[int] | None = None,
    precisions: Sequence[str] | str | None = None,
    checkpointing: Sequence[bool] | bool = (False,),
    checkpoint_modules: Sequence[torch.nn.Module] | None = None,
    memory_budget: int | str | None = None,
    fraction: float = DEFAULT_FRACTION,
    max_batch_size: int | None = None,
    knee_threshold: float = KNEE_THRESHOLD,
    seconds_per_point: float = SECONDS_PER_POINT,
    rounds: int | None = None,
    loader: Any = None,
    on_point: Callable[[ProfilePoint], None] | None = None,
    on_probe: Callable[[str, Probe], None] | None = None,
) -> Profile:
    """Measure throughput and peak memory over batch sizes for each precision x checkpointing variant.

    Args:
        workload: a :class:`~batchlab.Workload` (or a plain ``step(batch_size)`` callable: fp32 only, no
            checkpointing, no loader -- batchlab cannot reach inside it).
        device: as for :func:`~batchlab.find_batch_size`.
        batch_sizes: the sizes to profile; default: per variant, the powers of two up to the largest that
            fits plus that size, from one :func:`~batchlab.find_batch_size` whose probes are reused.
        precisions: some of ``"fp32"``, ``"bf16"``, ``"fp16"`` (autocast; fp16 with a GradScaler), as a list
            or ``"fp32,bf16"``. Default: the workload's own (fp32 unless it was built with ``amp=``).
        checkpointing: ``False``, ``True`` or both ``(False, True)``: activation checkpointing of the model's
            repeated blocks (see :mod:`batchlab.workload.checkpointing`), or of ``checkpoint_modules`` when given.
        memory_budget: treat the device as having this much memory ("4GiB"); default: its capacity now. All
            variants are held to the same ``fraction`` of it.
        max_batch_size: never profile above this; default, when the sizes are searched:
            :data:`~batchlab.defaults.MEASURED_MAX_BATCH` (65,536: no larger batch can win on goodput, and a small
            model with no dataset size fits millions, minutes to search and time).
        knee_threshold: the knee is the smallest batch reaching this share of the best throughput.
        seconds_per_point: timed seconds aimed for per point (between MIN_ and MAX_TIMED_STEPS steps).
        rounds: time each variant's fitting sizes in this many interleaved round-robin windows, each with
            ``1/rounds`` of the point's timed steps (at least one) after its own ``WARMUP_STEPS`` dropped ones
            and followed by a state restore; a point's ``step_times`` pools them round by round. Every round
            times only what the memory pass found to fit, smallest size first, and reads no memory. An int
            from 1 to MAX_TIMED_STEPS; default (None): one window
            (:data:`~.analysis.DEFAULT_TIMING_ROUNDS`: rounds were measured not to pay under steady load). The
            loader's pass (``loader=``) is one window per size either way.
        loader: a DataLoader (rebuilt at each batch size) or ``make_loader(batch_size)``: each fitting point is
            timed again with batches drawn from it, to show what the input pipeline costs.
        on_point: called with each :class:`ProfilePoint` as it is measured (progress displays).
        on_probe: called with the variant's name and each :class:`~batchlab.fit.Probe` of its fit search
            as the probe completes (progress displays: on a large model the search is most of the time).

    The workload's model, optimizer, gradients and RNG states are restored bitwise afterwards, and every
    checkpointing patch is removed, also when a step raises. On the CPU the process is left with glibc's
    training speed (:func:`~batchlab.devices.cpu.fast_allocator`): a later memory reading in it reads high,
    never low.
    """
    started = time.perf_counter()
    work = as_workload(workload)
    names = parse_precisions(precisions) or [work.amp or "fp32"]
    variants = [(precision, ckpt) for ckpt in _parse_checkpointing(checkpointing) for precision in names]
    sizes = _parse_batch_sizes(batch_sizes)
    fraction = parse_fraction(fraction)
    knee_threshold = checks.fraction("knee_threshold", knee_threshold, include_one=True)
    seconds_per_point = checks.number("seconds_per_point", seconds_per_point, inclusive=True, what="seconds")
    max_batch_size = checks.integer("max_batch_size", max_batch_size, none=True)
    default_cap = max_batch_size is None and sizes is None
    if default_cap:
        max_batch_size = MEASURED_MAX_BATCH
    rounds = check_rounds(rounds)
    if isinstance(work, StepFunction):
        unsupported = [p for p, c in variants if p != "fp32" or c]
        if unsupported or loader is not None:
            raise ValueError(
                "precisions other than fp32, checkpointing and loader= need a batchlab.Workload: a plain "
                "step(batch_size) callable cannot be changed from outside"
            )
    if checkpoint_modules is not None and True not in _parse_checkpointing(checkpointing):
        raise ValueError("checkpoint_modules= needs checkpointing=True (or (False, True) to compare)")
    if any(ckpt for _, ckpt in variants):
        plan_checkpointing(work.model, checkpoint_modules)  # fails now, before anything runs
    cap = min((c for c in (max_batch_size, getattr(work, "dataset_size", None)) if c), default=None)
    if sizes is not None and cap is not None:
        sizes = [b for b in sizes if b <= cap] or None
        if sizes is None:
            raise ValueError(f"every batch size in {batch_sizes!r} exceeds the cap {cap}")
    make_loader = loader_factory(loader) if loader is not None else None
    dev = resolve_device(device, work.device if isinstance(work, Workload) else None)
    capacity = parse_bytes(memory_budget) if memory_budget is not None else dev.capacity_bytes()
    budget = int(capacity * fraction)
    hard_limit = dev.hard_limit_bytes()
    samples_per_step = work.grad_accum
    if rounds is None:
        rounds = DEFAULT_TIMING_ROUNDS

    points: list[ProfilePoint] = []
    summaries: list[VariantSummary] = []
    fits: dict[str, FitResult | None] = {}
    notes: list[str] = []
    snapshot = work.snapshot()

    def emit(point: ProfilePoint) -> None:
        points.append(point)
        log.info("profile %s b=%d: %s", point.variant, point.batch_size, point.outcome)
        if on_point is not None:
            on_point(point)

    try:
        # Pass 1, every variant: what fits and its memory, on the measuring device. Pass 2 then times on the
        # device as training runs it -- on the CPU glibc's speed back, after which an exact reading would read
        # high (batchlab.devices.cpu), so no reading may come after a step timed at speed.
        measured = []
        for precision, ckpt in variants:
            name = variant_name(precision, ckpt)
            with _variant_workload(work, precision, ckpt, checkpoint_modules) as (variant, plan):
                fit, planned, known = None, sizes, {}
                if sizes is None:
                    report = None if on_probe is None else functools.partial(on_probe, name)
                    fit, planned, known = _search(
                        variant, dev, capacity, fraction, max_batch_size, cap, report
                    )
                    fits[name] = fit
                first = _measure_variant(
                    variant, dev, name, precision, ckpt, planned, known, fit, budget, hard_limit, snapshot
                )
            measured.append((precision, ckpt, name, fit, plan, first))
        train_dev = dev.for_training()
        for precision, ckpt, name, fit, plan, first in measured:
            with _variant_workload(work, precision, ckpt, checkpoint_modules) as (variant, _):
                loaded = with_loader(variant, make_loader) if make_loader else None
                variant_points = _time_variant(
                    first, variant, train_dev, samples_per_step, seconds_per_point, snapshot, emit, loaded,
                    rounds,
                )  # fmt: skip
            summaries.append(
                summarize_variant(
                    name, precision, ckpt, variant_points, knee_threshold=knee_threshold,
                    fit_batch_size=fit.batch_size if fit else None, checkpointed=plan,
                )
            )  # fmt: skip
    finally:
        snapshot.restore()

    lines, warnings = findings(
        summaries, points, budget_bytes=budget, knee_threshold=knee_threshold, device_type=_device_type(dev)
    )
    timed = [p for p in points if p.fits and p.samples_per_second]
    if default_cap and any(f is not None and f.limited_by == Limit.MAX_BATCH_SIZE for f in fits.values()):
        notes.append(
            f"profiled up to {MEASURED_MAX_BATCH:,}, the default cap (no larger batch can win on goodput); "
            "max_batch_size (--max-batch-size) to go further"
        )
    if dev.name == "cpu":
        notes.append(
            f"CPU peak counts the whole process; batchlab's state copy ({format_bytes(snapshot.nbytes)}) is included"
        )
    return Profile(
        workload=work.name,
        device=dev.name,
        capacity_bytes=capacity,
        budget_bytes=budget,
        fraction=fraction,
        knee_threshold=knee_threshold,
        points=points,
        variants=summaries,
        best=max(timed, key=lambda p: p.samples_per_second, default=None),
        findings=lines,
        warnings=warnings,
        fits=fits,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _device_type(dev: Device) -> str:
    return dev.name.split(":")[0]


@dataclass(frozen=True)
class _Known:
    """A size the fit search already ran: its verdict and peak, reused instead of measured again."""

    batch_size: int
    outcome: PointOutcome
    peak_bytes: int | None
    allocated_bytes: int | None
    error: str | None = None


def _searched_point(name: str, precision: str, ckpt: bool, known: _Known) -> ProfilePoint:
    """The point of a size the fit search probed: its verdict and peak, not measured again."""
    return ProfilePoint(
        name, precision, ckpt, known.batch_size, known.outcome, known.peak_bytes, known.allocated_bytes,
        MemorySource.FIT_SEARCH, error=known.error,
    )  # fmt: skip


def _search(
    variant: Workload | StepFunction,
    dev: Device,
    capacity: int,
    fraction: float,
    max_batch_size: int | None,
    cap: int | None,
    on_probe: Callable[[Probe], None] | None = None,
) -> tuple[FitResult | None, list[int], dict[int, _Known]]:
    """One fit search; returns it, the sizes to profile, and what it measured of each size it ran."""
    try:
        fit = find_batch_size(
            variant,
            device=dev,
            batch=fraction,
            memory_budget=capacity,
            max_batch_size=max_batch_size,
            on_probe=on_probe,
        )
    except DoesNotFitError as exc:
        outcome = PointOutcome.OVER_BUDGET if exc.needed_bytes is not None else PointOutcome.OOM
        failed = _Known(exc.batch_size, outcome, exc.needed_bytes, None, str(exc).splitlines()[0])
        return None, [exc.batch_size], {exc.batch_size: failed}
    known = {
        probe.batch_size: _Known(
            probe.batch_size,
            PointOutcome(probe.outcome),
            probe.peak_bytes,
            probe.allocated_bytes,
            probe.error,
        )
        for probe in fit.probes
    }
    smallest = min(b for b, k in known.items() if k.outcome is PointOutcome.FITS)
    planned = default_batch_sizes(fit.batch_size, smallest)
    # What does not fit is part of the picture: the sizes the search found too big (reported, never run
    # again), or -- when it stopped without a failure, within 1% of the budget -- the next power of two,
    # run once to show it is over (guarded against the hard limit like any size).
    too_big = [b for b, k in known.items() if k.outcome is not PointOutcome.FITS and b > fit.batch_size]
    if too_big:
        planned += too_big
    elif fit.limited_by in ("memory", "hard limit"):
        planned.append(1 << fit.batch_size.bit_length())  # the smallest power of two above the answer
    return fit, sorted(b for b in set(planned) if cap is None or b <= cap), known


def _measure_variant(
    variant, dev, name, precision, ckpt, planned, known, fit, budget, hard_limit, snapshot,
) -> list[ProfilePoint]:  # fmt: skip
    """Pass 1 for one variant: every planned size's verdict and peak, smallest first, no step timed.

    A size the search probed keeps the search's probe; any other runs the steps a probe runs
    (``VERIFY_STEPS``: the second is the first with optimizer state) once, on the measuring device.
    Larger sizes than one that failed are not run, nor one the memory line puts above the hard limit.
    """
    out: list[ProfilePoint] = []
    failed_at: int | None = None
    for b in planned:
        searched = known.get(b)
        if searched is not None:
            point = _searched_point(name, precision, ckpt, searched)
        elif failed_at is not None and b > failed_at:
            point = ProfilePoint(
                name, precision, ckpt, b, PointOutcome.SKIPPED, None, None, MemorySource.PROFILE_RUN,
                error=f"not run: batch {failed_at} did not fit",
            )  # fmt: skip
        elif _predicted_over(out, b, hard_limit):
            point = ProfilePoint(
                name, precision, ckpt, b, PointOutcome.SKIPPED, None, None, MemorySource.PROFILE_RUN,
                error="not run: the memory line through smaller sizes puts it above the device's hard limit",
            )  # fmt: skip
        else:
            try:
                run = dev.run(variant.step, b, VERIFY_STEPS)
            finally:
                snapshot.restore()
            point = _run_point(name, precision, ckpt, run, fit is not None and b <= fit.batch_size, budget)
        if fit is not None and b == fit.batch_size:
            point = replace(point, fit_answer=True)
        if not point.fits and failed_at is None and point.outcome is not PointOutcome.SKIPPED:
            failed_at = b
        out.append(point)
    return out


def _time_variant(
    points, variant, dev, samples_per_step, seconds_per_point, snapshot, emit, loaded=None, rounds=1,
) -> list[ProfilePoint]:  # fmt: skip
    """Pass 2 for one variant: time every size pass 1 found to fit, smallest first, on ``dev`` -- the
    device as training runs (:meth:`~batchlab.devices.Device.for_training`). Verdicts and peaks stay pass 1's.

    With ``loaded`` (the variant drawing its batches from the user's loader), each fitting point is
    timed a second time through it. With ``rounds`` > 1 this pass is the first round, and
    :func:`_more_rounds` times the fitting sizes in the rest; the points are emitted once pooled.
    """
    out: list[ProfilePoint] = []
    for point in points:
        if point.fits:
            try:
                timing = time_steps(
                    dev, variant.step, point.batch_size, seconds_per_point=seconds_per_point, rounds=rounds
                )
            finally:
                snapshot.restore()
            point = _timed(point, timing, samples_per_step)
            if loaded is not None and point.fits:
                point = _time_loader(point, loaded, dev, samples_per_step, seconds_per_point, snapshot)
        out.append(point)
        if rounds == 1:
            emit(point)
    if rounds > 1:
        out = _more_rounds(out, variant, dev, rounds, seconds_per_point, samples_per_step, snapshot)
        for point in out:
            emit(point)
    return out


def _more_rounds(
    points: list[ProfilePoint],
    variant: Workload | StepFunction,
    dev: Device,
    rounds: int,
    seconds_per_point: float,
    samples_per_step: int,
    snapshot: Any,
) -> list[ProfilePoint]:
    """Rounds 2..``rounds``: every size the first round timed (it fits and has timed steps), once per round,
    smallest first, as many steps as its first window; the steps pooled and the point's reading redone on them.

    Pooled rather than read per round (say, the fastest round's quantile): a reading of the pooled steps is still
    one order statistic of all of them, with :func:`~.analysis.quantile_interval`'s interval, and a low quantile of
    the pool is a quiet step once one round in ``1/q`` was quiet, where the fastest of several rounds' readings
    would pick the luckiest and carry no interval. What pooling does to that interval: it assumes independent
    steps from one distribution; a burst makes steps within a round alike, and rounds differ. Pooled over rounds,
    the steps are closer to independent draws of the run's whole mix of load (bursts fall on every size alike),
    and for independent steps that are not identically distributed the count below a point is Poisson-binomial,
    never more spread than the binomial the interval takes (Hoeffding 1956): the interval is then for the quantile
    of that mix, at least as sure as it says. Steps within one round stay correlated; fewer, longer bursts than
    rounds still leave the interval narrower than it should be.
    """
    timed = [i for i, p in enumerate(points) if p.fits and p.step_times]
    steps = {i: [points[i].step_times] for i in timed}
    stopped: dict[int, str] = {}
    for _ in range(rounds - 1):
        for i in timed:
            if i in stopped:
                continue
            b = points[i].batch_size
            try:
                timing = time_steps(
                    dev, variant.step, b, seconds_per_point=seconds_per_point,
                    steps=len(points[i].step_times),
                )  # fmt: skip
            finally:
                snapshot.restore()
            if timing.ok and timing.step_times:
                steps[i].append(timing.step_times)
            else:
                stopped[i] = f"round {len(steps[i]) + 1} of {rounds}: {timing.error or 'no timed step'}"
    out = list(points)
    for i in timed:
        pooled = tuple(t for window in steps[i] for t in window)
        median = statistics.median(pooled)
        b = points[i].batch_size
        note = "; ".join(n for n in (points[i].note, stopped.get(i)) if n) or None
        out[i] = replace(
            points[i], step_times=pooled, step_seconds=median, rounds=len(steps[i]), note=note,
            samples_per_second=b * samples_per_step / median if median else None,
        )  # fmt: skip
    return out


def _predicted_over(measured: Sequence[ProfilePoint], batch_size: int, hard_limit: int | None) -> bool:
    if hard_limit is None:
        return False
    fitting = [p for p in measured if p.fits and p.peak_bytes is not None]
    line = memory_per_sample([p.batch_size for p in fitting], [p.peak_bytes for p in fitting])
    return line is not None and line[0] + line[1] * batch_size > hard_limit


def _run_point(
    name: str, precision: str, ckpt: bool, run: Measurement, verified: bool, budget: int
) -> ProfilePoint:
    """The point of a size pass 1 ran. Its verdict: "fits" for any size up to the answer the search verified
    (memory grows with the batch), whatever the run read; otherwise the run's own."""
    if not run.ok:
        return ProfilePoint(
            name, precision, ckpt, run.batch_size, PointOutcome.OOM, run.peak_bytes, run.allocated_bytes,
            MemorySource.PROFILE_RUN, error=run.error,
        )  # fmt: skip
    over = run.peak_bytes is not None and run.peak_bytes > budget
    note = None
    if over and verified:
        note = f"peaked {format_bytes(run.peak_bytes - budget)} above the budget here; a larger size verified to fit"
    return ProfilePoint(
        name, precision, ckpt, run.batch_size,
        PointOutcome.OVER_BUDGET if over and not verified else PointOutcome.FITS,
        run.peak_bytes, run.allocated_bytes, MemorySource.PROFILE_RUN, note=note,
    )  # fmt: skip


def _timed(point: ProfilePoint, timing: Timing, samples_per_step: int) -> ProfilePoint:
    """A fitting point with its timed steps; an out-of-memory while timed makes it "oom", with why."""
    if not timing.ok:
        return replace(point, outcome=PointOutcome.OOM, error=f"while timed: {timing.error}")
    step_seconds = timing.median
    return replace(
        point, step_seconds=step_seconds, step_times=timing.step_times, warmup_steps=WARMUP_STEPS,
        samples_per_second=point.batch_size * samples_per_step / step_seconds if step_seconds else None,
    )  # fmt: skip


def _time_loader(
    point: ProfilePoint,
    loaded: tuple[Workload, LoaderBatches],
    dev: Device,
    samples_per_step: int,
    seconds_per_point: float,
    snapshot: Any,
) -> ProfilePoint:
    """Time a fitting point again with its batches drawn from the user's loader."""
    work, batches = loaded
    try:
        timing = time_steps(dev, work.step, point.batch_size, seconds_per_point=seconds_per_point)
    finally:
        batches.close()  # a DataLoader's worker processes end with its iterator
        snapshot.restore()
    if not timing.ok or not timing.median:
        return replace(point, note=f"with the loader: {timing.error or 'no timed step'}")
    return replace(
        point,
        loader_step_seconds=timing.median,
        loader_samples_per_second=point.batch_size * samples_per_step / timing.median,
    )
