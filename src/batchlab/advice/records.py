"""The records of a recommendation: each candidate batch size evaluated, and the recommendation itself."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from batchlab.advice.scaling import BatchPlan, LRScaling, Schedule

__all__ = ["Candidate", "Recommendation"]


@dataclass(frozen=True)
class Candidate:
    """One global batch size evaluated by :func:`~batchlab.advice.recommend`.

    ``samples_per_second`` is the throughput of all ``world_size`` ranks together at micro batch
    ``micro_batch`` (``source``: ``"measured"`` at a measured size, ``"interpolated"`` between two, or
    ``"accumulation"`` -- the largest single step's throughput, repeated). ``goodput`` = throughput x
    ``efficiency``; ``relative_goodput`` is it divided by the current batch's goodput. ``steps_factor`` is
    S/S_min = 1 + B_noise/B.
    """

    batch_size: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    samples_per_second: float
    efficiency: float
    goodput: float
    relative_goodput: float
    steps_factor: float | None
    source: str

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (an infinite steps factor -- noise dominates -- is None)."""
        d = asdict(self)
        if self.steps_factor is not None and math.isinf(self.steps_factor):
            d["steps_factor"] = None
        return d


@dataclass(frozen=True)
class Recommendation:
    """What :func:`~batchlab.advice.recommend` recommends, and why.

    The global batch ``batch_size`` runs as ``micro_batch`` x ``accumulation_steps`` x ``world_size``
    (``plan``), with the learning rate ``lr.lr`` (``lr`` is the full :class:`~batchlab.advice.scaling.LRScaling`:
    rule, factor, Adam betas/eps, warmup). ``switched`` says whether it differs from ``current_batch``: only
    when ``best_batch`` beats it by more than ``gain_threshold`` in goodput (``gain``), and -- when the
    throughput's spread or B_noise's standard error is known -- by more than that at the low end of
    ``gain_range`` too (the gain's extremes across the spread of the timed steps and B_noise ± 1 s.e.). ``schedule`` /
    ``current_schedule`` are the epoch arithmetic at the recommended and the current batch (when the dataset
    size is known); ``warmup_steps`` converts the rule's warmup epochs into optimizer steps. ``noise_scale`` is the
    B_noise of the efficiency, ``noise_from`` where it came from when not the gradient noise scale (e.g. a
    critical batch measured by branched runs). ``candidates`` is the goodput table, ``explanation`` the reasoning
    in plain words, one finding per line.
    """

    batch_size: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    plan: BatchPlan
    lr: LRScaling
    warmup_steps: int | None
    switched: bool
    gain: float
    gain_range: tuple[float, float] | None
    gain_threshold: float
    current_batch: int
    best_batch: int
    best_batch_range: tuple[int, int] | None
    base_batch: int
    noise_scale: float
    noise_scale_stderr: float | None
    noise_from: str | None
    efficiency: float
    samples_per_second: float
    goodput: float
    current_goodput: float
    knee_batch: int
    max_throughput_batch: int
    max_micro_batch: int
    schedule: Schedule | None
    current_schedule: Schedule | None
    candidates: tuple[Candidate, ...]
    explanation: tuple[str, ...]
    notes: tuple[str, ...]

    def candidate(self, batch_size: int) -> Candidate:
        """The goodput-table row of ``batch_size`` (KeyError if it was not a candidate)."""
        for c in self.candidates:
            if c.batch_size == batch_size:
                return c
        raise KeyError(f"batch {batch_size} is not in the goodput table")

    def summary(self) -> str:
        """The explanation, one line per finding."""
        return "\n".join(self.explanation)

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (no inf or NaN: an infinite B_noise is None, and ``notes`` say so)."""
        d = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("plan", "lr", "schedule", "current_schedule", "candidates")
        }
        d["plan"] = self.plan.to_dict()
        d["lr"] = self.lr.to_dict()
        d["schedule"] = self.schedule.to_dict() if self.schedule else None
        d["current_schedule"] = self.current_schedule.to_dict() if self.current_schedule else None
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d["best_batch_range"] = list(self.best_batch_range) if self.best_batch_range else None
        d["gain_range"] = list(self.gain_range) if self.gain_range else None
        d["explanation"] = list(self.explanation)
        d["notes"] = list(self.notes)
        if math.isinf(self.noise_scale):
            d["noise_scale"] = None
        return d
