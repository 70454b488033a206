"""Plan the shape table without the device: the largest batch per sequence length or image size, from fake tensors.

``plan_shapes(workload, target, [128, 256, 512])`` answers what ``find_batch_size(..., shapes=...)`` measures
(:mod:`batchlab.fit.shapes`), for a card you do not have: one :func:`~batchlab.planning.plan.plan` per shape on
``workload.with_shape(shape)`` (``batchlab plan --shapes``). A fake probe costs the same at any size, so every shape gets its own plan --
no prediction between shapes is needed to save probes -- and the peak model
(:class:`~batchlab.fit.peak_model.PeakModel`) is fitted over the plans' lines afterwards, to show how memory
grows with length. Each entry carries the plan's accuracy and its notes: an estimate, never a measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchlab import checks
from batchlab.checks import shape_size
from batchlab.fit.peak_model import fit_peak_model
from batchlab.fit.records import MemoryLine
from batchlab.fit.shapes import Shape, ShapeRow, ShapeRows
from batchlab.planning.cards import PlanTarget
from batchlab.planning.plan import PlanResult, check_workload, estimate_memory_line, plan
from batchlab.units import format_bytes
from batchlab.workload.workload import Workload


@dataclass
class PlanShapeEntry(ShapeRow):
    """One shape's plan (:class:`~batchlab.planning.plan.PlanResult`); ``length`` as in the measured table."""

    result: PlanResult


@dataclass
class PlanShapeTable(ShapeRows):
    """The answer of ``plan(..., shapes=...)``: one estimated entry per shape, and the peak model over them."""

    entries: list[PlanShapeEntry]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "estimated": True}  # from fake tensors, never measured

    def summary(self) -> str:
        first = self.entries[0].result
        lines = [
            f"largest batch per shape on {first.target.name} (budget {format_bytes(self.budget_bytes)}), estimated "
            "from fake tensors, not measured -- verify with `batchlab fit --shapes`"
        ]
        for entry in self.entries:
            verdict = "fits" if entry.fits else "does NOT fit"
            lines.append(
                f"  shape {entry.shape}: batch {entry.batch_size} {verdict} ({entry.tokens_per_batch} per batch)"
            )
        return "\n".join(lines)


def plan_shapes(
    workload: Workload, target: str | int | PlanTarget, shapes: Sequence[Shape], **options: Any
) -> PlanShapeTable:
    """The largest batch per shape on ``target``, each from :func:`~batchlab.planning.plan.plan` on fake tensors.

    ``shapes`` as for ``find_batch_size(..., shapes=...)`` (sorted, each once; the workload's ``make_batch``
    takes ``shape=``); ``options`` are :func:`~batchlab.planning.plan.plan`'s (``device_type``, ``batch``,
    ``amp``, ``max_batch_size``, ``dataset_size``, ``multiple_of``). Every shape is checked -- built once --
    before the first plan runs.
    """
    work = check_workload(workload)
    shaped = {shape: work.with_shape(shape) for shape in checks.shapes("shapes", shapes)}
    entries = [PlanShapeEntry(s, shape_size(s), plan(w, target, **options)) for s, w in shaped.items()]
    lines = [
        (entry.length, MemoryLine(entry.result.fixed_bytes, entry.result.bytes_per_sample))
        for entry in entries
        if entry.result.bytes_per_sample is not None and entry.result.fixed_bytes is not None
    ]
    return PlanShapeTable(entries, fit_peak_model(lines))


def estimate_memory_lines(
    workload: Workload, shapes: Sequence[Shape], *, device_type: str = "cpu", amp: str | None = None
) -> dict[Shape, MemoryLine]:
    """``{shape: estimated memory line}``, one :func:`~batchlab.planning.plan.estimate_memory_line` per shape:
    the seed of a measured shape table, ``find_batch_size(workload, shapes=shapes, estimate=lines)``.

    What the table takes from it is how memory changes between shapes (:mod:`batchlab.fit.shapes`), so
    ``device_type`` should be the device searched. A few seconds per shape on a CPU (two fake steps each: 12-14 s
    for five shapes of benchmarks/shapes.py's byte LM). On the CPU, where the budget counts the whole process,
    what the fake-tensor machinery pages in stays resident (22 MiB there), so the answers after it are that much
    smaller. Raises :class:`~batchlab.errors.FakeTensorError` when the step cannot run on fake tensors.
    """
    work = check_workload(workload)
    checked = checks.shapes("shapes", shapes)
    return {s: estimate_memory_line(work.with_shape(s), device_type=device_type, amp=amp) for s in checked}
