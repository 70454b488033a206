"""The profile's findings and warnings in plain words, from its points and variant summaries.

Pure, like :mod:`batchlab.profiling.analysis` (no torch, no device): every sentence is a function of the
numbers, so each is tested exactly. E.g. "checkpointing (fp32) lets batch 512 fit (largest without: 256) at
1.30x the step time (batch 256)".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from batchlab.defaults import KNEE_THRESHOLD
from batchlab.profiling.analysis import small_batch_scaling
from batchlab.profiling.records import ProfilePoint, VariantSummary, variant_name
from batchlab.units import format_bytes

# The Tuning Playbook: throughput that does not roughly double with the batch points to an input or
# synchronisation bottleneck. Warn when, over the small sizes, throughput grows by < half the batch growth.
SCALING_WARN_RATIO = 0.5
LOADER_GAP_WARN = 0.10  # a loader that costs > 10% of the samples/s is called the bottleneck


def format_rate(samples_per_second: float) -> str:
    """Three significant figures or more: 12,345 / 123 / 12.3 / 1.23 / 0.0123."""
    if samples_per_second >= 100:
        return f"{samples_per_second:,.0f}"
    return f"{samples_per_second:.3g}"


def findings(
    variants: Sequence[VariantSummary],
    points: Sequence[ProfilePoint],
    *,
    budget_bytes: int,
    knee_threshold: float = KNEE_THRESHOLD,
    device_type: str = "cpu",
) -> tuple[list[str], list[str]]:
    """Plain-words findings and warnings from the numbers (pure: no torch, no device)."""
    by_variant = {v.variant: [p for p in points if p.variant == v.variant] for v in variants}
    lines = [_best_finding(variants, points, budget_bytes, knee_threshold)]
    lines += [_variant_finding(v, by_variant[v.variant]) for v in variants]
    lines += _checkpointing_findings(variants, by_variant)
    lines += _precision_findings(variants, by_variant)
    lines += _loader_findings(variants, by_variant)
    return lines, list(_scaling_warnings(variants, by_variant, device_type))


def _best_finding(
    variants: Sequence[VariantSummary],
    points: Sequence[ProfilePoint],
    budget_bytes: int,
    knee_threshold: float,
) -> str:
    timed = [p for p in points if p.fits and p.samples_per_second]
    if not timed:
        return f"no variant fits the {format_bytes(budget_bytes)} budget at any profiled batch size"
    best = max(timed, key=lambda p: p.samples_per_second)
    summary = next(v for v in variants if v.variant == best.variant)
    knee = (
        f"; {knee_threshold:.0%} of that already at batch {summary.knee_batch}"
        if summary.knee_batch is not None and summary.knee_batch < best.batch_size
        else ""
    )
    return (
        f"most samples/s within the {format_bytes(budget_bytes)} budget: {best.variant} at batch "
        f"{best.batch_size}, {format_rate(best.samples_per_second)} samples/s ({best.step_seconds * 1e3:.1f} ms per "
        f"step, peak {format_bytes(best.peak_bytes)}){knee}"
    )


def _variant_finding(v: VariantSummary, points: Sequence[ProfilePoint]) -> str:
    if v.largest_fitting_batch is None:
        first = min(points, key=lambda p: p.batch_size, default=None)
        return f"{v.variant}: batch {first.batch_size if first else '?'} does not fit"
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
    return f"{v.variant}: largest fitting batch {v.largest_fitting_batch}{speed}{knee}{memory}"


def _memory_bound(points: Sequence[ProfilePoint]) -> bool:
    """True when some size did not fit: the largest fitting size is then set by memory, not by the list."""
    return any(not p.fits for p in points)


def _against(
    variants: Sequence[VariantSummary], base_name: Callable[[VariantSummary], str]
) -> Iterator[tuple[VariantSummary, VariantSummary]]:
    """Each variant with the one it is compared against (named by ``base_name``), where both were profiled."""
    summaries = {v.variant: v for v in variants}
    for v in variants:
        base = summaries.get(base_name(v))
        if base is not None and base is not v:
            yield v, base


def _common_timed(
    a: Sequence[ProfilePoint], b: Sequence[ProfilePoint]
) -> tuple[ProfilePoint, ProfilePoint] | None:
    """The two points of the largest batch size that fits and was timed in both variants."""
    timed_a = {p.batch_size: p for p in a if p.fits and p.step_seconds}
    timed_b = {p.batch_size: p for p in b if p.fits and p.step_seconds}
    common = timed_a.keys() & timed_b.keys()
    return (timed_a[max(common)], timed_b[max(common)]) if common else None


def _checkpointing_findings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]]
) -> Iterator[str]:
    """E.g. "checkpointing (fp32) lets batch 512 fit (largest without: 256) at 1.30x the step time (batch 256)"."""
    for v, off in _against(variants, lambda v: variant_name(v.precision, False)):
        if v.largest_fitting_batch is None or off.largest_fitting_batch is None:
            continue
        pair = _common_timed(by_variant[v.variant], by_variant[off.variant])
        cost = ""
        if pair is not None:
            on_point, off_point = pair
            ratio = on_point.step_seconds / off_point.step_seconds
            cost = f" at {ratio:.2f}x the step time (batch {on_point.batch_size})"
        memory = ""
        if v.bytes_per_sample is not None and off.bytes_per_sample is not None:
            memory = f"; memory per sample {format_bytes(v.bytes_per_sample)} vs {format_bytes(off.bytes_per_sample)}"
        if not _memory_bound(by_variant[off.variant]):  # every listed size fitted: no claim about what fits
            yield f"checkpointing ({v.precision}) runs{cost}{memory}"
        elif v.largest_fitting_batch > off.largest_fitting_batch:
            yield (
                f"checkpointing ({v.precision}) lets batch {v.largest_fitting_batch} fit (largest without: "
                f"{off.largest_fitting_batch}){cost}{memory}"
            )
        else:
            yield (
                f"checkpointing ({v.precision}) lets no larger batch fit (largest {v.largest_fitting_batch} vs "
                f"{off.largest_fitting_batch} without){cost}{memory}"
            )


def _precision_findings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]]
) -> Iterator[str]:
    """E.g. "bf16 vs fp32: 1.80x the samples/s at batch 64, 0.55x the memory per sample"."""
    for v, base in _against(variants, lambda v: variant_name("fp32", v.checkpointing)):
        pair = _common_timed(by_variant[v.variant], by_variant[base.variant])
        if pair is None:
            continue
        point, base_point = pair
        memory = ""
        if v.bytes_per_sample and base.bytes_per_sample:
            memory = f", {v.bytes_per_sample / base.bytes_per_sample:.2f}x the memory per sample"
        largest = ""
        if _memory_bound(by_variant[base.variant]) or _memory_bound(by_variant[v.variant]):
            largest = f"; largest fitting batch {v.largest_fitting_batch} vs {base.largest_fitting_batch}"
        speed = point.samples_per_second / base_point.samples_per_second
        yield (
            f"{v.variant} vs {base.variant}: {speed:.2f}x the samples/s at batch {point.batch_size}"
            f"{memory}{largest}"
        )


def _loader_findings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]]
) -> Iterator[str]:
    """Per variant, the input pipeline's cost at its fastest point: a bottleneck above LOADER_GAP_WARN."""
    for v in variants:
        with_loader = [p for p in by_variant[v.variant] if p.fits and p.loader_samples_per_second]
        if not with_loader:
            continue
        point = max(with_loader, key=lambda p: p.samples_per_second or 0.0)
        gap = 1 - point.loader_samples_per_second / point.samples_per_second
        verdict = (
            "the input pipeline is the bottleneck" if gap > LOADER_GAP_WARN else "the input pipeline keeps up"
        )
        yield (
            f"{v.variant} with the input pipeline at batch {point.batch_size}: "
            f"{format_rate(point.loader_samples_per_second)} samples/s vs {format_rate(point.samples_per_second)} without "
            f"({gap:.0%} lower): {verdict}"
        )


def _scaling_warnings(
    variants: Sequence[VariantSummary], by_variant: dict[str, list[ProfilePoint]], device_type: str
) -> Iterator[str]:
    """One warning per variant whose throughput barely grows over the small sizes, with the likely cause."""
    for v in variants:
        timed = [p for p in by_variant[v.variant] if p.fits and p.samples_per_second]
        scaling = small_batch_scaling([p.batch_size for p in timed], [p.samples_per_second for p in timed])
        if scaling is None or scaling[2] >= SCALING_WARN_RATIO:
            continue
        b0, b1, efficiency = scaling
        gain = efficiency * b1 / b0
        cause = (
            "the CPU's cores are busy already at small batches (expected on a CPU)"
            if device_type == "cpu"
            else "the step is bound by input loading, host-device synchronisation or kernel launches"
        )
        yield (
            f"{v.variant}: throughput grows only {gain:.1f}x from batch {b0} to {b1} ({b1 // b0}x the batch): "
            f"{cause}; larger batches buy little speed here"
        )
