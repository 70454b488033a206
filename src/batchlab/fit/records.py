"""The records a search keeps: each probe, the memory line through them, and the answer (:class:`FitResult`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from batchlab.labels import Label
from batchlab.memory import MemoryBreakdown
from batchlab.units import format_bytes


class Outcome(Label):
    """What one probe found."""

    FITS = "fits"
    OVER_BUDGET = "over budget"  # ran, but its measured peak was above the budget
    OOM = "oom"  # raised an out-of-memory error
    SKIPPED = "skipped"  # not run: its predicted peak was above the device's hard limit


class Limit(Label):
    """What stopped a search from going larger."""

    MEMORY = "memory"  # the bracket closed at the budget
    HARD_LIMIT = "hard limit"  # the next size could pass the device's hard limit (CPU RAM, a container)
    MAX_BATCH_SIZE = "max_batch_size"
    DATASET_SIZE = "dataset size"
    PROBE_LIMIT = "probe limit"  # the safety net on the number of probes
    FIXED = "fixed"  # a fixed batch was checked, not searched


@dataclass(frozen=True)
class Probe:
    """One try of a batch size: what it measured and whether it fits the budget.

    ``outcome`` is an :class:`Outcome`: fits, over budget (ran, but peaked above the budget), oom (raised an
    out-of-memory error) or skipped (not run: predicted above the device's hard limit). ``state_step`` is
    set for a scout (:func:`next_candidate`): the size of the one step run first, from the user's state, to
    create the optimizer state; ``steps`` and ``seconds`` are then the one step at ``batch_size`` alone. A
    probe without it is *verified*: ``VERIFY_STEPS`` full steps at ``batch_size``.
    """

    batch_size: int
    outcome: Outcome
    peak_bytes: int | None
    baseline_bytes: int | None
    predicted_peak_bytes: int | None
    seconds: float
    steps: int
    allocated_bytes: int | None = None
    tensor_bytes: MemoryBreakdown | None = None  # the model's and optimizer's tensors after the steps
    error: str | None = None
    skipped_optimizer_steps: int = 0  # steps a GradScaler skipped; run on zeroed gradients (skipped_steps.py)
    skipped_at_scales: tuple[float, ...] = ()
    optimizer_steps: int | None = (
        None  # optimizer steps seen (None: no optimizer known, a bare step callable)
    )
    state_step: int | None = None

    @property
    def fits(self) -> bool:
        return self.outcome == Outcome.FITS

    @property
    def verified(self) -> bool:
        """Ran ``VERIFY_STEPS`` full steps at its size from the user's state: only such a size is an answer."""
        return self.state_step is None

    @property
    def measured(self) -> bool:
        """Ran and was read (fits or over budget): a point the memory line can use."""
        return self.peak_bytes is not None and self.outcome in (Outcome.FITS, Outcome.OVER_BUDGET)

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

    ``batch_size`` is a size that ran ``VERIFY_STEPS`` (:mod:`batchlab.defaults`) full training steps within ``budget_bytes``
    (``fits``), or -- for a fixed batch that does not fit -- the size that was asked for, with ``fits=False``.
    ``limited_by`` (a :class:`Limit`) says what stopped the search from going larger; ``memory_breakdown``
    names the answer's peak by what holds it (None for a step callable, whose tensors batchlab cannot see). ``state_copy_bytes`` is the size of the
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
    limited_by: Limit
    memory_breakdown: MemoryBreakdown | None
    probes: list[Probe] = field(default_factory=list)
    search_seconds: float = 0.0
    workload: str = ""
    notes: list[str] = field(default_factory=list)
    state_copy_bytes: int = 0
    state_copy_storage: str = "memory"
    skipped_optimizer_steps: int = 0
    device_settings: dict[str, Any] = field(default_factory=dict)
    step_mode: str = "train"  # "eval": the batch of an evaluation step (find_batch_size(mode="eval"))

    @property
    def steps_run(self) -> int:
        return sum(
            probe.steps + (not probe.verified) for probe in self.probes if probe.outcome != Outcome.SKIPPED
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps_run"] = self.steps_run
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def _what(self) -> str:
        return "evaluation batch" if self.step_mode == "eval" else "batch"

    def summary(self) -> str:
        """One paragraph in plain words."""
        if self.mode == "fixed":
            verdict = "fits" if self.fits else "does NOT fit"
            need = format_bytes(self.peak_bytes if self.peak_bytes is not None else self.predicted_peak_bytes)
            return f"{self._what} {self.batch_size} {verdict}: needs {need} of a {format_bytes(self.budget_bytes)} budget on {self.device}"
        return (
            f"largest {self._what} that fits: {self.batch_size} (limited by {self.limited_by}); peak "
            f"{format_bytes(self.peak_bytes)} of a {format_bytes(self.budget_bytes)} budget "
            f"({self.fraction:.0%} of {format_bytes(self.capacity_bytes)}) on {self.device}, verified with real steps"
        )
