"""The profile's result records: one point per (variant, batch size), a summary per variant, the Profile.

Records only -- no measuring and no math: :mod:`batchlab.profiling.api` fills them, :mod:`.analysis` and
:mod:`.findings` read them. Outcomes and memory sources are str-valued enums, so ``to_dict()`` and the JSON
hold the same strings as before ("fits", "fit search") and a point still compares equal to them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from batchlab.labels import Label

if TYPE_CHECKING:
    from batchlab.fit import FitResult

PRECISIONS = ("fp32", "bf16", "fp16")


class PointOutcome(Label):
    """What became of one (variant, batch size)."""

    FITS = "fits"
    OVER_BUDGET = "over budget"  # ran, peaked above the budget
    OOM = "oom"
    SKIPPED = "skipped"  # not run: predicted above the hard limit, or larger than a size that failed


class MemorySource(Label):
    """Where a point's peak memory and verdict come from."""

    FIT_SEARCH = "fit search"  # the fit search's own probe of this size, reused
    PROFILE_RUN = "profile run"  # this profile's own run of the size (a probe's steps), measuring device


def variant_name(precision: str, checkpointing: bool) -> str:
    """``"bf16"``, ``"bf16+ckpt"``: how points, summaries and findings name a variant."""
    return precision + ("+ckpt" if checkpointing else "")


@dataclass(frozen=True)
class ProfilePoint:
    """One (variant, batch size): whether it fits, its peak memory and, when it ran, its speed.

    ``outcome`` is a :class:`PointOutcome` ("fits", "over budget", "oom", "skipped"); ``memory_source`` a
    :class:`MemorySource` ("fit search" or "profile run"); plain strings are accepted and converted.
    ``step_seconds`` is the median of ``step_times``, the timed steps after ``warmup_steps`` dropped ones;
    ``samples_per_second`` counts ``batch_size * grad_accum`` samples per step. ``loader_*`` are the same
    with the user's input pipeline in the step. ``rounds``: how many interleaved windows the timed steps come
    from (:func:`batchlab.profile`'s ``rounds``); ``step_times`` holds them round by round, equally many each.
    """

    variant: str
    precision: str
    checkpointing: bool
    batch_size: int
    outcome: PointOutcome
    peak_bytes: int | None
    allocated_bytes: int | None
    memory_source: MemorySource
    step_seconds: float | None = None
    samples_per_second: float | None = None
    step_times: tuple[float, ...] = ()
    warmup_steps: int = 0
    loader_step_seconds: float | None = None
    loader_samples_per_second: float | None = None
    fit_answer: bool = False
    error: str | None = None  # why it failed or was not run
    note: str | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", PointOutcome(self.outcome))
        object.__setattr__(self, "memory_source", MemorySource(self.memory_source))

    @property
    def fits(self) -> bool:
        return self.outcome is PointOutcome.FITS

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["memory_source"] = self.memory_source.value
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
    """The result of :func:`batchlab.profile`: every point, a summary per variant, findings in plain words."""

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
