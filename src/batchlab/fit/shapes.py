"""The largest batch for each of several batch shapes (sequence lengths, image sizes), each verified by real steps.

``find_batch_size(workload, shapes=[128, 256, 512, 1024, 2048])`` runs :func:`search_shapes`: one search per
shape, through the single-shape search's probe-and-verify loop (:func:`batchlab.find_batch_size` hands it a
``fit_at(shape, guide)`` that runs it on ``workload.with_shape(shape)``), in an order chosen so that every shape
after the first starts from a prediction:

1. the longest shape first, from batch 2 up as the single search does (its batches are the smallest: the
   cheapest to search);
2. then the shortest, predicted from the longest alone, as a bound: memory per sample scaled linearly in
   ``L`` down to a shorter shape (and as ``L^2`` up to a longer one, when the longest gave no line), which
   over-states it whenever the truth lies between the two -- so the first try lands below the answer;
3. then the shapes between, from the longest down, each predicted by :class:`~batchlab.fit.peak_model.PeakModel`
   fitted over every shape searched so far -- an interpolation.

Within each shape the table decides by :func:`~batchlab.fit.shape_decision.next_shape_candidate`, to the
issue's tolerance (every entry >= 0.97 of its true maximum, issue 12 item 1) rather than the single search's
exact edge: the first size is the model's prediction half that tolerance below the budget, one size that ran
there gives the shape's own slope through the model's fixed part, and an entry is accepted once the
measurements bound the true maximum within 3%. When the model is right a shape costs one probe; when it is
wrong, the probes correct it. Every answer is a size that ran its full verification at its own shape, within
the budget. Measured in benchmarks/RESULTS.md ("The shape table at the issue's tolerance").

**Seeded from a plan** (``estimate=``: each shape's memory line from fake tensors,
:func:`batchlab.planning.estimate_memory_lines`): the plan knows how memory changes *between* lengths -- the
per-sample slope's ratio and the fixed part's difference (an ``L x L`` mask) -- but not the process or runtime
the real fixed part holds. So the first shape runs batch 2 to anchor, then goes straight to where the planned
slope puts the budget (:attr:`~batchlab.fit.shape_decision.ShapeGuide.estimated_slope`); every later shape's
prior is the plan's line moved onto the nearest shape measured (:func:`_planned_line`) -- at the second shape a
prediction rather than step 2's bound -- unless the shapes' own readings have shown the fixed part growing
with the length: then the measured model predicts, as without a plan (a simulated plan that missed the
mask's ``L^2`` cost the shapes between 3 probes more, tests/test_shapes.py). Acceptance rests on measured
slopes only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchlab.checks import shape_size
from batchlab.errors import DoesNotFitError
from batchlab.fit.decision import latest_probes, least_squares_line, line_points
from batchlab.fit.peak_model import PeakModel, fit_fixed_part, fit_peak_model, fixed_at
from batchlab.fit.records import FitResult, MemoryLine, Outcome
from batchlab.fit.shape_decision import ShapeGuide, reading_noise
from batchlab.units import format_bytes

log = logging.getLogger("batchlab")

Shape = int | tuple[int, ...]


@dataclass
class ShapeRow:
    """What every row of a shape table says, measured (:class:`ShapeEntry`) or planned
    (:class:`~batchlab.planning.shapes.PlanShapeEntry`): the shape, its size and the answer there.

    ``length`` is the shape's size (tokens; pixels ``h * w``); ``result`` the search's or the plan's result.
    """

    shape: Shape
    length: int
    result: Any

    @property
    def batch_size(self) -> int:
        return self.result.batch_size

    @property
    def fits(self) -> bool:
        return self.result.fits

    @property
    def label(self) -> str:
        """The shape as the CLI writes it: ``512``, or ``320x320`` for an image size."""
        return "x".join(map(str, self.shape)) if isinstance(self.shape, tuple) else str(self.shape)

    @property
    def tokens_per_batch(self) -> int:
        """Batch x length: the tokens (pixels) one batch of this shape holds."""
        return self.result.batch_size * self.length

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape) if isinstance(self.shape, tuple) else self.shape,
            "length": self.length,
            "batch_size": self.batch_size,
            "fits": self.fits,
            "tokens_per_batch": self.tokens_per_batch,
            "result": self.result.to_dict(),
        }


@dataclass
class ShapeEntry(ShapeRow):
    """One shape's answer: the :class:`~batchlab.fit.records.FitResult` of its search, and what was predicted.

    ``predicted_batch_size`` is the size the peak model put at the budget (less the noise allowance) before this
    shape's first probe
    (None for the shapes searched before a prediction).
    """

    result: FitResult
    predicted_batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "predicted_batch_size": self.predicted_batch_size,
            "probes": len(self.result.probes),
        }


@dataclass
class ShapeRows:
    """What every shape table holds, measured (:class:`ShapeTable`) or planned
    (:class:`~batchlab.planning.shapes.PlanShapeTable`): its rows, in the given order, and the
    :class:`~batchlab.fit.peak_model.PeakModel` fitted over them."""

    entries: list[Any]
    model: PeakModel | None

    @property
    def budget_bytes(self) -> int:
        return self.entries[0].result.budget_bytes

    def max_batch_by_shape(self) -> dict[Shape, int]:
        """``{shape: largest batch that fits}``, for the shapes where one fits (a token budget's input)."""
        return {entry.shape: entry.batch_size for entry in self.entries if entry.fits}

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": [entry.to_dict() for entry in self.entries],
            "model": self.model.to_dict() if self.model else None,
            "budget_bytes": self.budget_bytes,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


@dataclass
class ShapeTable(ShapeRows):
    """The answer of ``find_batch_size(..., shapes=...)``: one :class:`ShapeEntry` per shape, in the given order.

    ``model`` is fitted over every shape at the end; ``order`` is the order the shapes were searched in;
    ``probes`` the probes of all the searches together.
    """

    entries: list[ShapeEntry]
    order: list[Shape]
    search_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def probes(self) -> int:
        return sum(len(entry.result.probes) for entry in self.entries)

    @property
    def steps_run(self) -> int:
        return sum(entry.result.steps_run for entry in self.entries)

    @property
    def device(self) -> str:
        return self.entries[0].result.device

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "order": [list(s) if isinstance(s, tuple) else s for s in self.order],
            "probes": self.probes,
            "steps_run": self.steps_run,
            "device": self.device,
            "search_seconds": self.search_seconds,
            "notes": self.notes,
        }

    def summary(self) -> str:
        """One line per shape, in plain words."""
        lines = [
            f"largest batch per shape on {self.device} (budget {format_bytes(self.budget_bytes)}), each verified "
            f"with real steps; {self.probes} probes in all"
        ]
        for entry in self.entries:
            verdict = "fits" if entry.fits else "does NOT fit"
            lines.append(
                f"  shape {entry.shape}: batch {entry.batch_size} {verdict} ({entry.tokens_per_batch} per batch, "
                f"limited by {entry.result.limited_by})"
            )
        return "\n".join(lines)


def search_order(shapes: Sequence[Shape]) -> list[Shape]:
    """The longest shape, the shortest, then the ones between from the longest down (see the module)."""
    ordered = sorted(shapes, key=shape_size)
    if len(ordered) < 2:
        return list(ordered)
    return [ordered[-1], ordered[0], *reversed(ordered[1:-1])]


def search_shapes(
    shapes: Sequence[Shape],
    fit_at: Callable[[Shape, ShapeGuide], FitResult],
    *,
    seconds: Callable[[], float] | None = None,
    estimate: Mapping[Shape, MemoryLine] | None = None,
) -> ShapeTable:
    """Search every shape through ``fit_at(shape, guide)`` -- the probe-and-verify loop -- in :func:`search_order`.

    The :class:`~batchlab.fit.shape_decision.ShapeGuide` holds the predicted memory line at that shape (None
    for the first), the model's fixed part and the noise allowance: the most a prediction from two lengths or
    more has put a measured peak below its reading, or a reading sat off its own shape's line
    (:func:`~batchlab.fit.shape_decision.reading_noise`); it reaches the search's decision,
    :func:`~batchlab.fit.shape_decision.next_shape_candidate`. A shape where not even the smallest
    batch fits raises :class:`~batchlab.errors.DoesNotFitError` naming it. ``seconds``: the clock to report
    the search's time with (the caller's; None reports 0). ``estimate``: a planned memory line per shape (every
    shape), to seed the searches from (see the module).
    """
    planned = dict(estimate) if estimate else None
    started = seconds() if seconds else 0.0
    results: dict[Shape, FitResult] = {}
    predicted: dict[Shape, int | None] = {}
    under_stated = 0.0  # the most a prediction has put a measured peak below the truth, in bytes
    noise = 0.0  # the most a reading has sat off its own shape's line (reading_noise), in bytes
    for shape in search_order(shapes):
        model = _model(results, noise)
        length = shape_size(shape)
        drift = _drift(results)
        if planned is not None and model is not None and not model.fixed_per_length2:
            prior = _planned_line(model, shape, list(results), planned)
        else:
            prior = _prior_line(model, length)
        if prior is not None:
            prior = MemoryLine(prior.fixed_bytes + drift, prior.bytes_per_sample)
        slack = max(under_stated, noise)
        guide = ShapeGuide(
            prior,
            prior.fixed_bytes if prior is not None else None,
            slack,
            estimated_slope=planned[shape].bytes_per_sample if planned and prior is None else None,
        )
        try:
            result = fit_at(shape, guide)
        except DoesNotFitError as exc:  # name the shape: the longest is searched first, and fails first
            raise DoesNotFitError(f"at shape {shape!r}: {exc}", batch_size=exc.batch_size,
                                  needed_bytes=exc.needed_bytes, budget_bytes=exc.budget_bytes) from exc  # fmt: skip
        results[shape] = result
        predicted[shape] = _predicted_size(prior, result.budget_bytes - slack)
        if prior is not None and (planned or len(model.lengths) >= 2):  # one length's bound over-states
            under_stated = max(under_stated, _under_statement(result, prior))
        noise = max(noise, reading_noise(result.probes))
        log.info("shape %s: batch %d (%d probes)", shape, result.batch_size, len(result.probes))
    entries = [ShapeEntry(s, shape_size(s), results[s], predicted[s]) for s in shapes]
    return ShapeTable(
        entries=entries,
        model=_model(results, noise),
        order=search_order(shapes),
        search_seconds=(seconds() - started) if seconds else 0.0,
    )


def _model(results: dict[Shape, FitResult], noise: float) -> PeakModel | None:
    """The peak model over the shapes searched so far, ``noise`` the readings' (:func:`reading_noise`).

    Its fixed part comes from the shapes whose own line is measured over a wide span of sizes (the largest at
    least twice the smallest: the first shape's, from batch 2 up) -- growing as ``L^2`` where the shapes' own
    intercepts show it beyond the noise (:func:`~batchlab.fit.peak_model.fit_fixed_part`); each shape's slope is
    then the one through that fixed part and its answer's measured peak. A table's later shapes run one or two
    sizes close to their answer, and a line through two neighbouring sizes (6090 and 6091) is rounding, not a
    slope: their intercepts enter the fixed part's growth weighted by how far the noise can move them.
    """
    intercepts, wide_fixed = [], []  # (length, intercept, how far the noise moves it) per shape with a line
    for shape, result in results.items():
        if result.fixed_bytes is None:  # no line at this shape
            continue
        wide = _span(result) >= 2  # then its points always span two sizes or more
        points = _fixed_points(result) if wide else line_points(result.probes)
        if len(points) >= 2 and max(points) > min(points):
            intercept = least_squares_line(points).fixed_bytes
            spread = noise * (max(points) + min(points)) / (max(points) - min(points))
            intercepts.append((shape_size(shape), intercept, spread))
            if wide:
                wide_fixed.append(intercept)
    if not wide_fixed:
        lines = [(shape_size(s), MemoryLine(r.fixed_bytes, r.bytes_per_sample)) for s, r in results.items()
                 if r.bytes_per_sample is not None and r.fixed_bytes is not None]  # fmt: skip
        return fit_peak_model(lines)
    fixed = fit_fixed_part(intercepts) or (sum(wide_fixed) / len(wide_fixed), 0.0)
    lines = []
    for shape, r in results.items():
        if r.fits and r.peak_bytes is not None:
            at = fixed_at(fixed, shape_size(shape))
            lines.append((shape_size(shape), MemoryLine(at, (r.peak_bytes - at) / r.batch_size)))
    return fit_peak_model(lines, fixed)


def _fixed_points(result: FitResult) -> dict[int, float]:
    """The sizes a shape's fixed part is read from, over a wide span: its own line's (the larger sizes,
    :func:`~batchlab.fit.decision.line_points`) where those span 2x or more, else every size it measured. A
    search that ended with three sizes within 3% of each other (1024, 1039, 1056) has a line whose slope is the
    readings' noise: at 0.3% noise its fixed part came out 2.2 GiB low of 7.4, and the slopes measured through
    it at later shapes 10% steep (tests/test_shapes.py)."""
    points = line_points(result.probes)
    if max(points) < 2 * min(points):
        points = {p.batch_size: p.peak_bytes for p in latest_probes(result.probes).values() if p.measured}
    return points


def _drift(results: dict[Shape, FitResult]) -> float:
    """How far the process's memory before a step has risen since the model's fixed part was measured, and
    one probe's rise more (0 where it has not risen, or too few probes say): what the next probe will find
    on top of that fixed part.

    On the CPU the baseline creeps up per probe (oneDNN caches a primitive per new batch shape: +0.45 MiB a
    probe on cnn, benchmarks/RESULTS.md), about 3% of an answer's room at small budgets; a prior whose fixed
    part is the first shape's put the next shape's first size over the budget by that, then the next, and the
    slope measured through it ran steep. The table's first probe is left out: its step pages in the runtime
    (+20 MiB on cnn), once. Devices whose baseline holds still (CUDA's allocated bytes, a simulation) drift 0.
    """
    fixed_from = [r for r in results.values() if r.fixed_bytes is not None and _span(r) >= 2]
    probes = [p for r in results.values() for p in r.probes if p.baseline_bytes is not None][1:]
    reference = [p.baseline_bytes for r in fixed_from for p in r.probes if p.baseline_bytes is not None][1:]
    if len(probes) < 2 or not reference:
        return 0.0
    latest = probes[-1].baseline_bytes
    per_probe = (latest - probes[0].baseline_bytes) / (len(probes) - 1)
    return max(0.0, latest - sum(reference) / len(reference) + per_probe)


def _span(result: FitResult) -> float:
    """The largest measured size over the smallest, at one shape."""
    sizes = [p.batch_size for p in result.probes if p.measured]
    return max(sizes) / min(sizes) if sizes else 0.0


def _prior_line(model: PeakModel | None, length: int) -> MemoryLine | None:
    """The model's line at ``length``; from one length alone the bound of step 2 (see the module)."""
    if model is None:
        return None
    if len(model.lengths) == 1 and length > model.lengths[0]:
        known = model.lengths[0]
        return MemoryLine(model.fixed_at(length), model.per_sample(known) * (length / known) ** 2)
    return model.line(length)


def _planned_line(
    model: PeakModel | None, shape: Shape, searched: Sequence[Shape], planned: Mapping[Shape, MemoryLine]
) -> MemoryLine | None:
    """The plan's line at ``shape`` moved onto the measured model at the nearest shape searched (by the ratio
    of their sizes): the fixed part by the plan's difference between the two, the slope by the plan's ratio.

    A fake-tensor estimate misses what the process and runtime hold (the real fixed part) and, where a
    backend keeps buffers no tensor shows, a share of each sample (resnet's oneDNN buffers: 8.6%, issue 7);
    both cancel in a difference and a ratio between shapes of one workload. None before any shape is measured.
    """
    if model is None or not searched:
        return None
    size = shape_size(shape)
    near = min(searched, key=lambda known: abs(math.log(size / shape_size(known))))
    scale = planned[shape].bytes_per_sample / planned[near].bytes_per_sample
    fixed = model.fixed_at(shape_size(near)) + planned[shape].fixed_bytes - planned[near].fixed_bytes
    return MemoryLine(fixed, model.per_sample(shape_size(near)) * scale)


def _predicted_size(prior: MemoryLine | None, budget: float) -> int | None:
    if prior is None or prior.bytes_per_sample <= 0:
        return None
    size = prior.largest_under(budget)
    return int(size) if math.isfinite(size) and size >= 1 else None


def _under_statement(result: FitResult, predicted: MemoryLine) -> float:
    """How far the model put this shape's measured peaks below the readings (0 if it never did)."""
    errors = [
        probe.peak_bytes - predicted.peak(probe.batch_size)
        for probe in result.probes
        if probe.peak_bytes is not None and probe.outcome in (Outcome.FITS, Outcome.OVER_BUDGET)
    ]
    return max([0.0, *errors])
