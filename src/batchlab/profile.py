"""Profile: throughput and memory over batch sizes, precisions and activation checkpointing -- and the knee.

The Tuning Playbook's first step in choosing a batch size is to find the feasible sizes and their throughput:
only sizes up to the one that maximises throughput are worth considering, and throughput that does not
roughly double with the batch points to an input or synchronisation bottleneck. :func:`profile` draws that
curve for every *variant* (a precision -- fp32, bf16 or fp16 autocast -- with or without activation
checkpointing) and says in plain words what each one buys.

How, per variant:

1. **Which sizes.** Run :func:`~batchlab.find_batch_size` once and reuse what it measured: the profiled sizes
   are the smallest size it found to fit, the powers of two above it up to its answer, and the answer itself.
   Every size it probed keeps the search's peak memory and verdict (``memory_source="fit search"``); every
   size it found too big is reported as not fitting without running again -- and when it stopped within 1% of
   the budget without a failure, the next power of two is run once to show what lies over the edge. A size
   up to the verified answer fits by that verification (memory grows with the batch), whatever a noisy
   timed run reads. Explicit ``batch_sizes`` skip the search; each then stands on its own timed run.
2. **Timing.** Each fitting size runs ``WARMUP_STEPS`` steps from the workload's own starting state (one
   device run), then -- in a second run -- enough steps for about ``seconds_per_point``
   (``MIN_TIMED_STEPS``..``MAX_TIMED_STEPS``, estimated from the last warm-up step); each step is timed
   between device synchronisations and the median of the timed steps is the step time. The peak is the
   higher of the two runs'. State is restored afterwards, as after every probe.
3. **Summary.** The knee (the smallest size reaching ``knee_threshold`` of the best throughput), the largest
   fitting size and its throughput, memory per sample (a line through the peaks), and findings such as
   "checkpointing lets batch 512 fit at 1.3x the step time".

The decision and summary math (:func:`knee_batch_size`, :func:`memory_per_sample`, :func:`timed_steps_for`,
:func:`small_batch_scaling`, :func:`summarize_variant`, :func:`findings`) are plain functions over numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from batchlab.checkpointing import activation_checkpointing, plan_checkpointing
from batchlab.defaults import KNEE_THRESHOLD
from batchlab.devices import Device, resolve_device
from batchlab.errors import DoesNotFitError, WorkloadError
from batchlab.profiling.analysis import (
    SECONDS_PER_POINT,
    default_batch_sizes,
    knee_batch_size,
    memory_per_sample,
    small_batch_scaling,
    timed_steps_for,
)
from batchlab.search import FitResult, Probe, find_batch_size
from batchlab.spec import DEFAULT_FRACTION, parse_amp, parse_fraction
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload import StepFunction, Workload, as_workload

log = logging.getLogger("batchlab")

PRECISIONS = ("fp32", "bf16", "fp16")
WARMUP_STEPS = 2  # dropped: step 1 creates gradients and optimizer state (and on CUDA autotunes cuDNN and
# warms the allocator); step 2 is the first update with optimizer state present. Neither is a steady step.
SCALING_WARN_RATIO = 0.5  # warn when, over the small sizes, throughput grows by < half the batch growth
LOADER_GAP_WARN = 0.10  # a loader that costs > 10% of the samples/s is called the bottleneck


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ProfilePoint:
    """One (variant, batch size): whether it fits, its peak memory and, when it ran, its speed.

    ``outcome`` is ``"fits"``, ``"over budget"`` (ran, peaked above the budget), ``"oom"`` or ``"skipped"``
    (not run: predicted above the device's hard limit, or larger than a size that failed).
    ``memory_source`` says where ``peak_bytes`` and the verdict come from: ``"fit search"`` (the search's own
    probe of this size, reused) or ``"timed run"``. ``step_seconds`` is the median of ``step_times``, the timed
    steps after ``warmup_steps`` dropped ones; ``samples_per_second`` counts ``batch_size * grad_accum``
    samples per step. ``loader_*`` are the same with the user's input pipeline in the step.
    """

    variant: str
    precision: str
    checkpointing: bool
    batch_size: int
    outcome: str
    peak_bytes: int | None
    allocated_bytes: int | None
    memory_source: str
    step_seconds: float | None = None
    samples_per_second: float | None = None
    step_times: tuple[float, ...] = ()
    warmup_steps: int = 0
    loader_step_seconds: float | None = None
    loader_samples_per_second: float | None = None
    fit_answer: bool = False
    error: str | None = None  # why it failed or was not run
    note: str | None = None

    @property
    def fits(self) -> bool:
        return self.outcome == "fits"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["step_times"] = list(self.step_times)
        return data


@dataclass(frozen=True)
class VariantSummary:
    """The numbers that describe one variant's curve (None where nothing fitted or ran)."""

    variant: str
    precision: str
    checkpointing: bool
    fit_batch_size: int | None
    largest_fitting_batch: int | None
    largest_fitting_samples_per_second: float | None
    best_batch: int | None
    best_samples_per_second: float | None
    knee_batch: int | None
    knee_samples_per_second: float | None
    bytes_per_sample: float | None
    fixed_bytes: float | None
    checkpointed: str | None = None  # what checkpointing wrapped, e.g. "repeated blocks: 4 x _Block"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Profile:
    """The result of :func:`profile`: every point, a summary per variant and findings in plain words."""

    workload: str
    device: str
    capacity_bytes: int
    budget_bytes: int
    fraction: float
    knee_threshold: float
    points: list[ProfilePoint]
    variants: list[VariantSummary]
    best: ProfilePoint | None
    findings: list[str]
    warnings: list[str]
    fits: dict[str, FitResult | None] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def points_of(self, variant: str) -> list[ProfilePoint]:
        """The points of one variant (e.g. ``"bf16+ckpt"``), by batch size."""
        return sorted((p for p in self.points if p.variant == variant), key=lambda p: p.batch_size)

    def variant(self, name: str) -> VariantSummary:
        for summary in self.variants:
            if summary.variant == name:
                return summary
        raise KeyError(f"no variant {name!r}; profiled: {', '.join(v.variant for v in self.variants)}")

    def summary(self) -> str:
        """The findings and warnings, one per line."""
        return "\n".join(self.findings + [f"warning: {w}" for w in self.warnings])

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "device": self.device,
            "capacity_bytes": self.capacity_bytes,
            "budget_bytes": self.budget_bytes,
            "fraction": self.fraction,
            "knee_threshold": self.knee_threshold,
            "best": self.best.to_dict() if self.best else None,
            "variants": [v.to_dict() for v in self.variants],
            "points": [p.to_dict() for p in self.points],
            "findings": list(self.findings),
            "warnings": list(self.warnings),
            "fits": {name: fit.to_dict() if fit else None for name, fit in self.fits.items()},
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Pure math over numbers


def format_rate(samples_per_second: float) -> str:
    """Three significant figures or more: 12,345 / 123 / 12.3 / 1.23 / 0.0123."""
    if samples_per_second >= 100:
        return f"{samples_per_second:,.0f}"
    return f"{samples_per_second:.3g}"


def variant_name(precision: str, checkpointing: bool) -> str:
    return precision + ("+ckpt" if checkpointing else "")


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


def _common_timed_batch(a: Sequence[ProfilePoint], b: Sequence[ProfilePoint]) -> int | None:
    """The largest batch size that fits and was timed in both variants."""
    timed_a = {p.batch_size for p in a if p.fits and p.step_seconds}
    timed_b = {p.batch_size for p in b if p.fits and p.step_seconds}
    common = timed_a & timed_b
    return max(common) if common else None


def _step(points: Sequence[ProfilePoint], batch_size: int) -> ProfilePoint:
    return next(p for p in points if p.batch_size == batch_size)


def findings(
    variants: Sequence[VariantSummary],
    points: Sequence[ProfilePoint],
    *,
    budget_bytes: int,
    knee_threshold: float = KNEE_THRESHOLD,
    device_type: str = "cpu",
) -> tuple[list[str], list[str]]:
    """Plain-words findings and warnings from the numbers (pure: no torch, no device)."""
    lines: list[str] = []
    warnings: list[str] = []
    by_variant = {v.variant: [p for p in points if p.variant == v.variant] for v in variants}
    timed = [p for p in points if p.fits and p.samples_per_second]
    if timed:
        best = max(timed, key=lambda p: p.samples_per_second)
        summary = next(v for v in variants if v.variant == best.variant)
        knee = (
            f"; {knee_threshold:.0%} of that already at batch {summary.knee_batch}"
            if summary.knee_batch is not None and summary.knee_batch < best.batch_size
            else ""
        )
        lines.append(
            f"most samples/s within the {format_bytes(budget_bytes)} budget: {best.variant} at batch "
            f"{best.batch_size}, {format_rate(best.samples_per_second)} samples/s ({best.step_seconds * 1e3:.1f} ms per "
            f"step, peak {format_bytes(best.peak_bytes)}){knee}"
        )
    else:
        lines.append(f"no variant fits the {format_bytes(budget_bytes)} budget at any profiled batch size")
    for v in variants:
        if v.largest_fitting_batch is None:
            first = min(by_variant[v.variant], key=lambda p: p.batch_size, default=None)
            lines.append(f"{v.variant}: batch {first.batch_size if first else '?'} does not fit")
            continue
        speed = (
            f" ({format_rate(v.largest_fitting_samples_per_second)} samples/s)"
            if v.largest_fitting_samples_per_second
            else ""
        )
        memory = (
            f", {format_bytes(v.bytes_per_sample)} per sample + {format_bytes(v.fixed_bytes)} fixed"
            if v.bytes_per_sample is not None
            else ""
        )
        knee = f", knee at batch {v.knee_batch}" if v.knee_batch is not None else ""
        lines.append(f"{v.variant}: largest fitting batch {v.largest_fitting_batch}{speed}{knee}{memory}")
    lines.extend(_checkpointing_findings(variants, by_variant))
    lines.extend(_precision_findings(variants, by_variant))
    lines.extend(_loader_findings(variants, by_variant))
    for v in variants:
        timed_v = [p for p in by_variant[v.variant] if p.fits and p.samples_per_second]
        scaling = small_batch_scaling(
            [p.batch_size for p in timed_v], [p.samples_per_second for p in timed_v]
        )
        if scaling is None or scaling[2] >= SCALING_WARN_RATIO:
            continue
        b0, b1, efficiency = scaling
        gain = efficiency * b1 / b0
        cause = (
            "the CPU's cores are busy already at small batches (expected on a CPU)"
            if device_type == "cpu"
            else "the step is bound by input loading, host-device synchronisation or kernel launches"
        )
        warnings.append(
            f"{v.variant}: throughput grows only {gain:.1f}x from batch {b0} to {b1} ({b1 // b0}x the batch): "
            f"{cause}; larger batches buy little speed here"
        )
    return lines, warnings


def _memory_bound(points: Sequence[ProfilePoint]) -> bool:
    """True when some size did not fit: the largest fitting size is then set by memory, not by the list."""
    return any(not p.fits for p in points)


def _checkpointing_findings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]]
) -> list[str]:
    """E.g. "checkpointing (fp32) lets batch 512 fit (largest without: 256) at 1.30x the step time (batch 256)"."""
    lines = []
    summaries = {v.variant: v for v in variants}
    for v in variants:
        if not v.checkpointing or variant_name(v.precision, False) not in summaries:
            continue
        off = summaries[variant_name(v.precision, False)]
        if v.largest_fitting_batch is None or off.largest_fitting_batch is None:
            continue
        on_points, off_points = by_variant[v.variant], by_variant[off.variant]
        common = _common_timed_batch(on_points, off_points)
        cost = ""
        if common is not None:
            ratio = _step(on_points, common).step_seconds / _step(off_points, common).step_seconds
            cost = f" at {ratio:.2f}x the step time (batch {common})"
        memory = ""
        if v.bytes_per_sample is not None and off.bytes_per_sample is not None:
            memory = f"; memory per sample {format_bytes(v.bytes_per_sample)} vs {format_bytes(off.bytes_per_sample)}"
        if not _memory_bound(off_points):  # every listed size fitted: no claim about what fits
            lines.append(f"checkpointing ({v.precision}) runs{cost}{memory}")
        elif v.largest_fitting_batch > off.largest_fitting_batch:
            lines.append(
                f"checkpointing ({v.precision}) lets batch {v.largest_fitting_batch} fit (largest without: "
                f"{off.largest_fitting_batch}){cost}{memory}"
            )
        else:
            lines.append(
                f"checkpointing ({v.precision}) lets no larger batch fit (largest {v.largest_fitting_batch} vs "
                f"{off.largest_fitting_batch} without){cost}{memory}"
            )
    return lines


def _precision_findings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]]
) -> list[str]:
    lines = []
    summaries = {v.variant: v for v in variants}
    for v in variants:
        base_name = variant_name("fp32", v.checkpointing)
        if v.precision == "fp32" or base_name not in summaries:
            continue
        base = summaries[base_name]
        common = _common_timed_batch(by_variant[v.variant], by_variant[base_name])
        if common is None:
            continue
        speed = (
            _step(by_variant[v.variant], common).samples_per_second
            / _step(by_variant[base_name], common).samples_per_second
        )
        memory = ""
        if v.bytes_per_sample and base.bytes_per_sample:
            memory = f", {v.bytes_per_sample / base.bytes_per_sample:.2f}x the memory per sample"
        largest = ""
        if _memory_bound(by_variant[base_name]) or _memory_bound(by_variant[v.variant]):
            largest = f"; largest fitting batch {v.largest_fitting_batch} vs {base.largest_fitting_batch}"
        lines.append(
            f"{v.variant} vs {base_name}: {speed:.2f}x the samples/s at batch {common}{memory}{largest}"
        )
    return lines


def _loader_findings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]]
) -> list[str]:
    lines = []
    for v in variants:
        with_loader = [p for p in by_variant[v.variant] if p.fits and p.loader_samples_per_second]
        if not with_loader:
            continue
        point = max(with_loader, key=lambda p: p.samples_per_second or 0.0)
        gap = 1 - point.loader_samples_per_second / point.samples_per_second
        verdict = (
            "the input pipeline is the bottleneck" if gap > LOADER_GAP_WARN else "the input pipeline keeps up"
        )
        lines.append(
            f"{v.variant} with the input pipeline at batch {point.batch_size}: "
            f"{format_rate(point.loader_samples_per_second)} samples/s vs {format_rate(point.samples_per_second)} without "
            f"({gap:.0%} lower): {verdict}"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class _Timing:
    ok: bool
    peak_bytes: int | None
    allocated_bytes: int | None
    step_times: tuple[float, ...]
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None


def _max_or_none(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def time_steps(
    device: Device,
    step: Callable[[int], Any],
    batch_size: int,
    *,
    seconds_per_point: float,
    stop_above: int | None = None,
) -> _Timing:
    """Run ``WARMUP_STEPS`` dropped steps, then enough timed steps for ~``seconds_per_point``; peak over both.

    Each step is timed on its own, between ``device.synchronize()`` calls (CUDA: the step's kernels must
    finish before the clock is read, else it measures launch time). When the warm-up already peaks above
    ``stop_above`` bytes, no step is timed (the size does not fit; its speed is not worth the time). The caller
    restores the state afterwards.
    """
    times: list[float] = []

    def timed_step(b: int) -> None:
        start = time.perf_counter()
        step(b)
        device.synchronize()  # sync point: the clock must include queued device work
        times.append(time.perf_counter() - start)

    warm = device.run(timed_step, batch_size, WARMUP_STEPS)
    if not warm.ok:
        return _Timing(False, warm.peak_bytes, warm.allocated_bytes, (), warm.error)
    if stop_above is not None and warm.peak_bytes is not None and warm.peak_bytes > stop_above:
        return _Timing(True, warm.peak_bytes, warm.allocated_bytes, ())
    steps = timed_steps_for(times[-1], seconds_per_point)  # the last warm-up step estimates a steady step
    times.clear()  # the warm-up steps are dropped here
    timed = device.run(timed_step, batch_size, steps)
    peak = _max_or_none(warm.peak_bytes, timed.peak_bytes)
    allocated = _max_or_none(warm.allocated_bytes, timed.allocated_bytes)
    if not timed.ok:
        return _Timing(False, peak, allocated, (), timed.error)
    return _Timing(True, peak, allocated, tuple(times))


class _LoaderBatches:
    """``make_batch(b)`` drawn from ``make_loader(b)``: one live iterator, restarted when it runs out."""

    def __init__(self, make_loader: Callable[[int], Iterable[Any]]):
        self.make_loader = make_loader
        self._batch_size: int | None = None
        self._iterator: Iterator[Any] | None = None

    def __call__(self, batch_size: int) -> Any:
        if self._iterator is None or self._batch_size != batch_size:
            self._restart(batch_size)
        try:
            return next(self._iterator)
        except StopIteration:
            self._restart(batch_size)
            try:
                return next(self._iterator)
            except StopIteration:
                raise WorkloadError(f"the loader for batch {batch_size} yields no batch") from None

    def _restart(self, batch_size: int) -> None:
        self.close()
        self._batch_size = batch_size
        self._iterator = iter(self.make_loader(batch_size))

    def close(self) -> None:
        """Drop the iterator (a DataLoader's worker processes shut down with it)."""
        self._iterator = None
        self._batch_size = None


def loader_factory(loader: Any) -> Callable[[int], Iterable[Any]]:
    """``make_loader(b)`` from a DataLoader (rebuilt at batch size b, workers and collate kept) or a callable."""
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(loader, DataLoader):
        if loader.batch_size is None:
            raise ValueError(
                "a DataLoader with a batch_sampler or batch_size=None cannot be rebuilt at another batch "
                "size; pass make_loader=lambda b: DataLoader(..., batch_size=b) instead"
            )

        def make_loader(batch_size: int) -> DataLoader:
            return DataLoader(
                loader.dataset,
                batch_size=batch_size,
                shuffle=isinstance(loader.sampler, RandomSampler),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                drop_last=True,  # every timed step sees a full batch
                worker_init_fn=loader.worker_init_fn,
                prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
                multiprocessing_context=loader.multiprocessing_context,
            )

        return make_loader
    if callable(loader):
        return loader
    raise TypeError(
        f"loader must be a torch DataLoader or a make_loader(batch_size) callable, got {type(loader).__name__}"
    )


def _parse_precisions(precisions: Sequence[str] | str | None, work: Workload | StepFunction) -> list[str]:
    if precisions is None:
        return [work.amp or "fp32"]
    items = [p for p in precisions.split(",")] if isinstance(precisions, str) else list(precisions)
    parsed = []
    for item in items:
        amp = parse_amp(item)
        name = amp or "fp32"
        if name not in parsed:
            parsed.append(name)
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
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"invalid batch_sizes {batch_sizes!r}: expected positive ints")
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
            repeated blocks (see :mod:`batchlab.checkpointing`), or of ``checkpoint_modules`` when given.
        memory_budget: treat the device as having this much memory ("4GiB"); default: its capacity now. All
            variants are held to the same ``fraction`` of it.
        max_batch_size: never profile above this.
        knee_threshold: the knee is the smallest batch reaching this share of the best throughput.
        seconds_per_point: timed seconds aimed for per point (between MIN_ and MAX_TIMED_STEPS steps).
        loader: a DataLoader (rebuilt at each batch size) or ``make_loader(batch_size)``: each fitting point is
            timed again with batches drawn from it, to show what the input pipeline costs.
        on_point: called with each :class:`ProfilePoint` as it is measured (progress displays).
        on_probe: called with the variant's name and each :class:`~batchlab.search.Probe` of its fit search
            as the probe completes (progress displays: on a large model the search is most of the time).

    The workload's model, optimizer, gradients and RNG states are restored bitwise afterwards, and every
    checkpointing patch is removed, also when a step raises.
    """
    started = time.perf_counter()
    work = as_workload(workload)
    variants = [
        (precision, ckpt)
        for ckpt in _parse_checkpointing(checkpointing)
        for precision in _parse_precisions(precisions, work)
    ]
    sizes = _parse_batch_sizes(batch_sizes)
    fraction = parse_fraction(fraction)
    if not 0 < knee_threshold <= 1:
        raise ValueError(f"invalid knee_threshold {knee_threshold!r}: expected 0 < threshold <= 1")
    if not (isinstance(seconds_per_point, (int, float)) and seconds_per_point >= 0):
        raise ValueError(f"invalid seconds_per_point {seconds_per_point!r}: expected a number >= 0")
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
    ):
        raise ValueError(f"invalid max_batch_size {max_batch_size!r}: expected a positive int or None")
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
                with_loader = _with_batches(variant, _LoaderBatches(make_loader)) if make_loader else None
                variant_points = _profile_variant(
                    variant, dev, name, precision, ckpt, planned, known, fit, budget, hard_limit,
                    samples_per_step, seconds_per_point, snapshot, emit, with_loader,
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
    outcome: str
    peak_bytes: int | None
    allocated_bytes: int | None
    error: str | None = None


def _point(name: str, precision: str, ckpt: bool, known: _Known, fit_answer: bool = False) -> ProfilePoint:
    return ProfilePoint(
        name, precision, ckpt, known.batch_size, known.outcome, known.peak_bytes, known.allocated_bytes,
        "fit search", fit_answer=fit_answer, error=known.error,
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
        outcome = "over budget" if exc.needed_bytes is not None else "oom"
        failed = _Known(exc.batch_size, outcome, exc.needed_bytes, None, str(exc).splitlines()[0])
        return None, [exc.batch_size], {exc.batch_size: failed}
    known = {
        probe.batch_size: _Known(
            probe.batch_size, probe.outcome, probe.peak_bytes, probe.allocated_bytes, probe.error
        )
        for probe in fit.probes
    }
    smallest = min(b for b, k in known.items() if k.outcome == "fits")
    planned = default_batch_sizes(fit.batch_size, smallest)
    # What does not fit is part of the picture: the sizes the search found too big (reported, never run
    # again), or -- when it stopped without a failure, within 1% of the budget -- the next power of two,
    # run once to show it is over (guarded against the hard limit like any size).
    too_big = [b for b, k in known.items() if k.outcome != "fits" and b > fit.batch_size]
    if too_big:
        planned += too_big
    elif fit.limited_by in ("memory", "hard limit"):
        planned.append(1 << fit.batch_size.bit_length())  # the smallest power of two above the answer
    return fit, sorted(b for b in set(planned) if cap is None or b <= cap), known


def _profile_variant(
    variant, dev, name, precision, ckpt, planned, known, fit, budget, hard_limit,
    samples_per_step, seconds_per_point, snapshot, emit, with_loader=None,
) -> list[ProfilePoint]:  # fmt: skip
    """Time every planned size of one variant, smallest first; reuse what the search knows.

    With ``with_loader`` (the variant drawing its batches from the user's loader), each fitting point is
    timed a second time through it.
    """
    out: list[ProfilePoint] = []
    failed_at: int | None = None
    for b in planned:
        is_answer = fit is not None and b == fit.batch_size
        searched = known.get(b)
        if searched is not None and not searched.outcome == "fits":
            point = _point(name, precision, ckpt, searched)
        elif failed_at is not None and b > failed_at:
            point = ProfilePoint(
                name, precision, ckpt, b, "skipped", None, None, "timed run",
                error=f"not run: batch {failed_at} did not fit",
            )  # fmt: skip
        elif searched is None and _predicted_over(out, b, hard_limit):
            point = ProfilePoint(
                name, precision, ckpt, b, "skipped", None, None, "timed run",
                error="not run: the memory line through smaller sizes puts it above the device's hard limit",
            )  # fmt: skip
        else:
            verified = fit is not None and b <= fit.batch_size
            try:
                timing = time_steps(
                    dev, variant.step, b, seconds_per_point=seconds_per_point,
                    stop_above=None if verified else budget,
                )  # fmt: skip
            finally:
                snapshot.restore()
            point = _timed_point(
                name, precision, ckpt, b, timing, searched, verified, budget, samples_per_step
            )  # fmt: skip
            if with_loader is not None and point.fits:
                point = _time_loader(point, with_loader, dev, samples_per_step, seconds_per_point, snapshot)
        if is_answer:
            point = replace(point, fit_answer=True)
        if not point.fits and failed_at is None and point.outcome != "skipped":
            failed_at = b
        out.append(point)
        emit(point)
    return out


def _predicted_over(measured: Sequence[ProfilePoint], batch_size: int, hard_limit: int | None) -> bool:
    if hard_limit is None:
        return False
    fitting = [p for p in measured if p.fits and p.peak_bytes is not None]
    line = memory_per_sample([p.batch_size for p in fitting], [p.peak_bytes for p in fitting])
    return line is not None and line[0] + line[1] * batch_size > hard_limit


def _timed_point(
    name: str,
    precision: str,
    ckpt: bool,
    b: int,
    timing: _Timing,
    searched: _Known | None,
    verified: bool,
    budget: int,
    samples_per_step: int,
) -> ProfilePoint:
    """The point of a timed size. Its verdict: the search's for a size it probed; "fits" for any size up to
    the answer the search verified (memory grows with the batch); otherwise the timed run's own."""
    if not timing.ok:
        return ProfilePoint(
            name, precision, ckpt, b, "oom", timing.peak_bytes, timing.allocated_bytes, "timed run",
            error=timing.error,
        )  # fmt: skip
    step_seconds = timing.median
    speed = b * samples_per_step / step_seconds if step_seconds else None
    note = None
    if searched is not None:  # the search's verdict and peak stand: the same measurement, not repeated
        outcome, peak, allocated, source = "fits", searched.peak_bytes, searched.allocated_bytes, "fit search"
    else:
        peak, allocated, source = timing.peak_bytes, timing.allocated_bytes, "timed run"
        over = peak is not None and peak > budget
        outcome = "over budget" if over and not verified else "fits"
        if over and verified:
            note = (
                f"peaked {format_bytes(peak - budget)} above the budget here; a larger size verified to fit"
            )
    return ProfilePoint(
        name, precision, ckpt, b, outcome, peak, allocated, source, step_seconds, speed,
        timing.step_times, WARMUP_STEPS, note=note,
    )  # fmt: skip


def _with_batches(variant: Workload, batches: _LoaderBatches) -> tuple[Workload, _LoaderBatches]:
    """The same step (model, optimizer, precision) with batches drawn from ``batches``."""
    loaded = Workload(
        variant.model,
        batches,
        variant.loss_fn,
        variant.optimizer,
        amp=variant.amp,
        grad_accum=variant.grad_accum,
        dataset_size=variant.dataset_size,
        name=variant.name,
    )
    return loaded, batches


def _time_loader(
    point: ProfilePoint,
    with_loader: tuple[Workload, _LoaderBatches],
    dev: Device,
    samples_per_step: int,
    seconds_per_point: float,
    snapshot: Any,
) -> ProfilePoint:
    """Time a fitting point again with its batches drawn from the user's loader."""
    loaded, batches = with_loader
    try:
        timing = time_steps(dev, loaded.step, point.batch_size, seconds_per_point=seconds_per_point)
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
