"""Plan without the device: the largest batch whose training step fits a card you do not have.

:func:`plan` searches a :class:`~batchlab.planning.fake.FakeDevice` with the same search as
:func:`~batchlab.find_batch_size` -- the fake device is just another Device -- so the answer follows the
same rules (fraction of capacity, caps, multiple-of, 1% tolerance); only the peaks are estimated from fake
tensors instead of measured. Nothing of the planned batch's size is allocated: a plan for an 80 GB card runs
on a laptop in seconds.

:func:`estimate_memory_line` gives the same estimate as a line, ``peak(b) = fixed + per_sample * b``, to
start a real search from (``find_batch_size(..., estimate=line)``): after its first probe the real search
jumps toward the predicted size instead of climbing 8x at a time, and still verifies every answer with real
steps.

An estimate is not a measurement: what it leaves out (the CPU process itself, CUDA fragmentation over a long
run, kernels that pick larger workspaces at larger sizes) is why the default fraction is kept, and why a
plan says "estimated". Verify on the card with ``batchlab fit`` when you have it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from batchlab import checks
from batchlab.fit import MemoryLine, Probe, find_batch_size
from batchlab.memory import MemoryBreakdown
from batchlab.planning.cards import PlanTarget, resolve_target
from batchlab.planning.fake import FakeDevice
from batchlab.planning.sharded import ShardedFakeDevice
from batchlab.spec import parse_amp, parse_batch
from batchlab.units import format_bytes
from batchlab.workload.workload import StepFunction, Workload

# Two sizes for the estimated line: large enough that every layer's per-sample memory dominates its fixed
# part, and cheap whatever the size (fake tensors cost the same at any batch size).
LINE_SIZES = (16, 128)


@dataclass
class PlanResult:
    """The answer of :func:`plan`: an *estimated* batch size for ``target``, with its memory by category.

    ``batch_size`` is the largest size whose estimated peak fits ``budget_bytes`` (``fraction`` of the
    target's capacity), or a fixed size that was asked for (``fits`` says whether it does). ``breakdown`` is
    the estimated peak at that size by category and sums to ``peak_bytes``; ``bytes_per_sample`` and
    ``fixed_bytes`` are the line through the smallest and largest sizes estimated. ``probes`` are the search's fake probes.
    """

    batch_size: int
    fits: bool
    mode: str
    fraction: float | None
    target: PlanTarget
    workload: str
    amp: str | None
    capacity_bytes: int
    budget_bytes: int
    peak_bytes: int | None
    breakdown: MemoryBreakdown | None
    bytes_per_sample: float | None
    fixed_bytes: float | None
    limited_by: str
    emulated_on: str
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    fsdp: bool = False

    @property
    def global_batch(self) -> int:
        """``batch_size x world_size``: every rank runs the per-rank batch (before any accumulation)."""
        return self.batch_size * self.world_size

    @property
    def memory_line(self) -> MemoryLine | None:
        """The estimate as ``peak(b) = fixed + per_sample * b``, for ``find_batch_size(..., estimate=...)``."""
        if self.bytes_per_sample is None or self.fixed_bytes is None:
            return None
        return MemoryLine(self.fixed_bytes, self.bytes_per_sample)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.to_dict()
        data["breakdown"] = self.breakdown.to_dict() if self.breakdown else None
        data["estimated"] = True  # from fake tensors, never measured
        data["global_batch"] = self.global_batch
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """One paragraph in plain words."""
        where = f"{self.target.name} ({self.target.device_type}, {format_bytes(self.capacity_bytes)} usable)"
        if self.world_size > 1 or self.fsdp:
            how = "FSDP2-sharded" if self.fsdp else "replicated"
            where += f" per rank, {self.world_size} ranks {how}"
        if self.mode == "fixed":
            verdict = "fits" if self.fits else "does NOT fit"
            return (
                f"batch {self.batch_size} {verdict} on {where}: estimated peak {format_bytes(self.peak_bytes)} "
                f"of {format_bytes(self.budget_bytes)} (fake tensors, not measured)"
            )
        return (
            f"largest batch that fits {where}: {self.batch_size} (limited by {self.limited_by}); estimated "
            f"peak {format_bytes(self.peak_bytes)} of a {format_bytes(self.budget_bytes)} budget "
            f"({self.fraction:.0%}){self._global()}; fake tensors, not measured -- verify on the card with `batchlab fit`"
        )

    def _global(self) -> str:
        return (
            f"; global batch {self.global_batch} ({self.batch_size} x {self.world_size} ranks)"
            if self.world_size > 1
            else ""
        )


def _with_amp(workload: Workload, amp: str | None) -> Workload:
    """The workload under ``amp`` (None: as it is); a conflict with the workload's own amp is an error."""
    if amp is None or workload.amp == amp:
        return workload
    if workload.amp is not None:
        raise ValueError(f"amp={amp!r} conflicts with the workload's amp={workload.amp!r}")
    return Workload(
        workload.model,
        workload.make_batch,
        workload.loss_fn,
        workload.optimizer,
        amp=amp,
        grad_accum=workload.grad_accum,
        dataset_size=workload.dataset_size,
        name=workload.name,
    )


def check_workload(workload: Any) -> Workload:
    if not isinstance(workload, Workload):
        raise TypeError(
            "planning needs a batchlab.Workload (model, make_batch, loss_fn, optimizer) to copy to fake "
            f"tensors; got {type(workload).__name__}. A plain step callable can only be measured: use find_batch_size"
        )
    return workload


def _line(device: FakeDevice, batch_sizes: tuple[int, int]) -> MemoryLine:
    small, large = batch_sizes
    if not (isinstance(small, int) and isinstance(large, int) and 0 < small < large):
        raise ValueError(f"invalid batch_sizes {batch_sizes!r}: expected two ints 0 < a < b")
    low, high = device.run(None, small), device.run(None, large)
    slope = (high.peak_bytes - low.peak_bytes) / (large - small)
    return MemoryLine(low.peak_bytes - slope * small, slope)


def estimate_memory_line(
    workload: Workload,
    *,
    device_type: str = "cpu",
    amp: str | None = None,
    batch_sizes: tuple[int, int] = LINE_SIZES,
) -> MemoryLine:
    """Estimate ``peak(b) = fixed + per_sample * b`` of the workload's training step from two fake runs.

    Pass it to ``find_batch_size(workload, estimate=line)`` to start a real search from it. Only the slope is
    used there (the real fixed part -- the process, the runtime -- is anchored on the first real probe), so
    ``device_type`` should be the device searched: ``"cpu"`` or ``"cuda"``.

    Raises :class:`~batchlab.errors.FakeTensorError` when the step cannot run on fake tensors.
    """
    work = _with_amp(check_workload(workload), parse_amp(amp))
    return _line(FakeDevice(work, device_type=device_type), batch_sizes)


def plan(
    workload: Workload,
    target: str | int | PlanTarget,
    *,
    device_type: str | None = None,
    batch: int | float | str = -1,
    amp: str | None = None,
    max_batch_size: int | None = None,
    dataset_size: int | None = None,
    multiple_of: int = 1,
    world_size: int = 1,
    fsdp: bool = False,
    fsdp_options: dict[str, Any] | None = None,
    shard: Any = None,
) -> PlanResult:
    """Plan the batch size for a device you may not have, from fake tensors: nothing of that size is allocated.

    Args:
        workload: a :class:`~batchlab.Workload`; its model and optimizer are copied to fake tensors and never
            modified. A model built on the meta device works too (it never needs real weights).
        target: a card from :data:`batchlab.planning.cards.CARDS` (``"a100-80gb"``, ``"h100-80gb"``, ``"rtx4090"``,
            ``"l4"``, ``"t4"``) or a memory size the step may use (``"24GiB"``).
        device_type: ``"cuda"`` (default) or ``"cpu"`` for a memory-size target.
        batch: ``-1``/``"auto"`` (largest at 0.90 of the target), a fraction ``0 < f < 1``, or a fixed int to
            check; parsed by :func:`batchlab.spec.parse_batch`.
        amp: ``"bf16"`` / ``"fp16"`` to plan under autocast; only for a Workload built without ``amp``.
        max_batch_size, dataset_size, multiple_of: as in :func:`~batchlab.find_batch_size` (the workload's own
            ``dataset_size`` is used when this is None).
        world_size: the ranks (cards) the run uses; the answer is per rank, ``global_batch`` = it x ranks.
        fsdp: shard the model with FSDP2 over ``world_size`` ranks (a fake process group:
            :mod:`batchlab.planning.sharded`); without it each rank holds the whole model (DDP), whose
            gradient buckets are not modelled.
        fsdp_options, shard: the ``fully_shard`` options and the module classes sharded one by one
            (:class:`~batchlab.planning.sharded.ShardedFakeDevice`); an option it does not model is refused.

    Raises:
        DoesNotFitError: the smallest size's estimate exceeds the budget.
        FakeTensorError: the step cannot run on fake tensors (a value-dependent op, a custom kernel).
        ValueError / TypeError: bad arguments, before anything runs.
    """
    started = time.perf_counter()
    spec = parse_batch(batch)
    resolved = resolve_target(target, device_type=device_type)
    work = _with_amp(check_workload(workload), parse_amp(amp))
    world_size = checks.integer("world_size", world_size)
    if not fsdp and (fsdp_options or shard is not None):
        raise ValueError("fsdp_options and shard describe FSDP sharding: pass fsdp=True with them")
    if fsdp:
        device: FakeDevice = ShardedFakeDevice(
            work, world_size=world_size, target=resolved, shard=shard, fsdp_options=fsdp_options
        )
    else:
        device = FakeDevice(work, target=resolved)
    line = _line(device, LINE_SIZES)
    result = find_batch_size(
        StepFunction(lambda batch_size: None, name=work.name),  # the fake device runs its own fake copy
        device=device,
        batch=batch,
        max_batch_size=max_batch_size,
        dataset_size=dataset_size or work.dataset_size,
        multiple_of=multiple_of,
        estimate=None if spec.is_fixed else line,
    )
    chosen = device.estimates.get(result.batch_size)
    # The slope over the widest span of estimates: allocator rounding (up to one segment) barely moves it there.
    smallest, largest = min(device.estimates), max(device.estimates)
    low, high = device.estimates[smallest].peak_bytes, device.estimates[largest].peak_bytes
    per_sample = (high - low) / (largest - smallest)
    notes = list(chosen.notes) if chosen else []
    if resolved.device_type == "cpu":
        notes.append("CPU: tensors only; the process itself (Python, torch: a few hundred MiB) comes on top")
    else:
        notes.append(
            "CUDA: allocator rounding and the cuBLAS workspace are included; fragmentation over a long run is "
            "not, which the fraction's margin is for"
        )
    return PlanResult(
        batch_size=result.batch_size,
        fits=result.fits,
        mode=result.mode,
        fraction=result.fraction,
        target=resolved,
        workload=work.name,
        amp=work.amp,
        capacity_bytes=result.capacity_bytes,
        budget_bytes=result.budget_bytes,
        peak_bytes=chosen.peak_bytes if chosen else result.peak_bytes,
        breakdown=chosen.breakdown if chosen else None,
        bytes_per_sample=per_sample,
        fixed_bytes=low - per_sample * smallest,
        limited_by=result.limited_by,
        emulated_on=device.emulated_on.type,
        probes=result.probes,
        seconds=time.perf_counter() - started,
        notes=notes,
        world_size=world_size,
        fsdp=fsdp,
    )


__all__ = ["LINE_SIZES", "PlanResult", "estimate_memory_line", "plan"]
