"""The comparison across a sweep's runs: a summary per batch size, the fitted critical batch, the noise scale.

:class:`SweepResult` holds every finished run of a sweep (a :class:`~batchlab.sweeps.records.SweepRun`) and
derives the rest from them, so a result read back from a sweep directory or from MLflow says exactly what the
live one said: per batch size the best LR multiplier's steps, samples and seconds to the target
(:class:`BatchSummary`), S = S_min(1 + B_crit/B) fitted to them (:func:`batchlab.noise.critical.fit_critical_batch`)
and the gradient noise scale the runs measured, pooled (:func:`batchlab.noise.critical.pooled_noise_scale`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from batchlab.noise.critical import CriticalBatchFit, fit_critical_batch, pooled_noise_scale
from batchlab.sweeps.records import StopReason, SweepConfig, SweepRun, Target
from batchlab.sweeps.store import SweepStore

__all__ = ["BatchSummary", "SweepResult"]


@dataclass(frozen=True)
class BatchSummary:
    """One batch size across its runs, at its best LR multiplier (the fewest mean steps to the target, or the
    lowest final validation loss without a target). Means are over seeds; None where no run got there."""

    batch_size: int
    lr: float
    lr_multiplier: float
    runs: int
    steps_to_target: float | None
    samples_to_target: float | None
    seconds_to_target: float | None
    reached: int
    throughput: float | None
    peak_bytes: int | None
    final_val_loss: float | None
    noise_scale: float | None
    steps: int
    samples: int

    @property
    def trained_to_target(self) -> bool:
        """Reached the target after at least one step. A target the first evaluation already meets (0 steps,
        a loose one read off the curves) says nothing about the batch size, so the comparisons leave it out."""
        return bool(self.steps_to_target)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(present) if present else None


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


def _max_peak(runs: Sequence[SweepRun]) -> int | None:
    return max((r.peak_bytes for r in runs if r.peak_bytes is not None), default=None)


def _noise_of(runs: Sequence[SweepRun]) -> float | None:
    windows = [w for w in (r.target_window() for r in runs) if w is not None]
    if windows:
        return pooled_noise_scale(windows)
    return _median(r.noise_scale for r in runs)


@dataclass
class SweepResult:
    """All runs of a sweep and the comparison across batch sizes.

    ``runs`` holds one :class:`SweepRun` per (batch size, LR multiplier, seed) in the sweep's order;
    ``directory`` is the sweep directory; the MLflow fields are None when tracking was off. ``report`` is the
    HTML report's path when one was written.
    """

    config: SweepConfig
    runs: list[SweepRun]
    directory: Path | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    report: Path | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({run.batch_size for run in self.runs})

    def runs_at(self, batch_size: int) -> list[SweepRun]:
        return [run for run in self.runs if run.batch_size == batch_size]

    def ramp_ends(self) -> str:
        """Where the batch-ramp runs ended, per starting batch: ``"from 16 to 64; from 32 to 128, 256"`` (a ramp
        records its batch per step; fixed runs record none, so a fixed sweep gives ``""``). The CLI summary and
        the report's verdict both say it."""
        ends: dict[int, set[int]] = {}
        for run in self.runs:
            if "batch_size" in run.train.values:
                ends.setdefault(run.batch_size, set()).add(int(run.train["batch_size"][-1]))
        return "; ".join(f"from {b} to {', '.join(map(str, sorted(e)))}" for b, e in sorted(ends.items()))

    def by_multiplier(self, batch_size: int) -> list[BatchSummary]:
        """One :class:`BatchSummary` per LR multiplier tried at ``batch_size``, over its seeds, in the sweep's
        order. :meth:`by_batch_size` keeps the best of them; a ramp's steps and samples are not proportional
        across multipliers, so its benchmark reads every one."""
        groups: dict[float, list[SweepRun]] = {}
        for run in self.runs_at(batch_size):
            groups.setdefault(run.lr_multiplier, []).append(run)
        return [self._summary(batch_size, m, group) for m, group in groups.items()]

    def by_batch_size(self) -> list[BatchSummary]:
        """One :class:`BatchSummary` per batch size, smallest first, at its best LR multiplier: the fewest mean
        steps to the target where every seed reached it, else the lowest mean final validation loss. Runs,
        throughput and peak memory count every run at the batch size, whatever its multiplier."""
        out = []
        for b in self.batch_sizes:
            best = min(self.by_multiplier(b), key=self._score)
            runs = self.runs_at(b)
            out.append(
                replace(
                    best,
                    runs=len(runs),
                    throughput=_median(r.throughput for r in runs),
                    peak_bytes=_max_peak(runs),
                )
            )
        return out

    def _score(self, summary: BatchSummary) -> tuple[float, float]:
        if self.config.target is not None and summary.steps_to_target is not None:
            return (0.0, summary.steps_to_target)
        loss = summary.final_val_loss
        return (1.0, loss if loss is not None else math.inf)

    @staticmethod
    def _summary(batch_size: int, multiplier: float, group: list[SweepRun]) -> BatchSummary:
        """Means over the seeds of one (batch size, multiplier); to-target means only where every seed got there."""
        all_reached = all(r.target_reached for r in group)
        return BatchSummary(
            batch_size=batch_size,
            lr=group[0].lr,
            lr_multiplier=multiplier,
            runs=len(group),
            steps_to_target=_mean(r.steps_to_target for r in group) if all_reached else None,
            samples_to_target=_mean(r.samples_to_target for r in group) if all_reached else None,
            seconds_to_target=_mean(r.seconds_to_target for r in group) if all_reached else None,
            reached=sum(r.target_reached for r in group),
            throughput=_median(r.throughput for r in group),
            peak_bytes=_max_peak(group),
            final_val_loss=_mean(r.final_val.get("loss") for r in group),
            noise_scale=_noise_of(group),
            steps=max(r.steps for r in group),
            samples=max(r.samples for r in group),
        )

    def with_target(self, target: Target | float | str | None) -> SweepResult:
        """The same runs compared at another ``target`` (``0.3``: val loss <= 0.3, ``"accuracy>=0.95"``, a
        :class:`~batchlab.sweeps.records.Target`; None: none), read off each run's recorded validation curve
        (:meth:`SweepRun.with_target`): a sweep run without a target, or at a target that proved too tight or
        too loose, gets its steps to target, critical batch and noise scale without training again. This is
        ``batchlab report SWEEP --target-loss X``.

        A run that stopped at the sweep's own target (``stop_at_target``) has no curve past it, so a target it
        does not imply (a tighter value, another metric) is refused: ``ValueError`` names the runs.
        """
        new = Target.parse(target)
        old = self.config.target
        stopped = [r.key for r in self.runs if r.stopped_by is StopReason.TARGET]
        implied = new is None or (
            old is not None and new.metric == old.metric and new.mode is old.mode and new.reached(old.value)
        )
        if stopped and not implied:
            raise ValueError(
                f"target {new.describe()}: {len(stopped)} run(s) ({', '.join(stopped[:3])}"
                f"{', ...' if len(stopped) > 3 else ''}) stopped at the sweep's own target {old.describe()} "
                "(stop_at_target), so their curves end there; give a target at or before it, or sweep again"
            )
        config = replace(self.config, target=new)
        return replace(self, config=config, runs=[r.with_target(new) for r in self.runs], report=None)

    def critical_batch(self) -> CriticalBatchFit | None:
        """S = S_min(1 + B_crit/B) fitted to the best steps-to-target per batch size (None: < 3 sizes reached)."""
        points = [(s.batch_size, s.steps_to_target) for s in self.by_batch_size() if s.steps_to_target]
        if len(points) < 3:
            return None
        return fit_critical_batch([b for b, _ in points], [s for _, s in points])

    def noise_scale(self) -> float | None:
        """The gradient noise scale the runs measured, pooled over every batch size's best-LR runs.

        With a target: tr(Σ) and |G|² averaged over the steps just before each run reached it, pooled across
        runs (:func:`batchlab.noise.critical.pooled_noise_scale`); runs that missed it do not count. Without one (or
        when no run reached it): the median of the runs' final B_simple.
        """
        best = [
            r
            for s in self.by_batch_size()
            for r in self.runs_at(s.batch_size)
            if r.lr_multiplier == s.lr_multiplier
        ]
        return _noise_of(best)

    def summary(self) -> str:
        """A few lines in plain words."""
        rows = self.by_batch_size()
        lines = [
            f"sweep {self.name}: {len(self.runs)} runs of {self.config.workload} at batch sizes {self.batch_sizes}"
        ]
        target = self.config.target
        if target is not None:
            reached = [s for s in rows if s.trained_to_target]
            if reached:
                fastest = min(reached, key=lambda s: s.seconds_to_target or math.inf)
                fewest = min(reached, key=lambda s: s.steps_to_target)
                lines.append(
                    f"{target.describe()}: fewest steps at batch {fewest.batch_size} ({fewest.steps_to_target:.0f}); "
                    f"soonest in training time at batch {fastest.batch_size} ({fastest.seconds_to_target:.2f} s)"
                )
            else:
                lines.append(
                    f"no batch size reached {target.describe()} within {self.config.budget.describe()}"
                )
        fit = self.critical_batch()
        noise = self.noise_scale()
        if fit is not None:
            lines.append(f"critical batch: {fit.note}")
        if noise is not None:
            lines.append(f"gradient noise scale measured during training: B_simple ≈ {noise:.3g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        fit = self.critical_batch()
        return {
            "config": self.config.to_dict(),
            "runs": [run.to_dict() for run in self.runs],
            "by_batch_size": [s.to_dict() for s in self.by_batch_size()],
            "critical_batch": fit.to_dict() if fit else None,
            "noise_scale": self.noise_scale(),
            "directory": str(self.directory) if self.directory else None,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "report": str(self.report) if self.report else None,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def load(cls, directory: str | Path) -> SweepResult:
        """Read a sweep directory (finished runs only) written by :func:`sweep`."""
        store = SweepStore(directory)
        config, meta = store.read_config()
        if config is None:
            raise FileNotFoundError(f"{directory} is not a sweep directory (no {SweepStore.CONFIG})")
        done = store.finished()
        runs = [done[spec.key] for spec in config.specs() if spec.key in done]
        report = store.path / "report" / "report.html"
        return cls(
            config,
            runs,
            store.path,
            meta.get("tracking_uri"),
            meta.get("experiment_id"),
            meta.get("parent_run_id"),
            report if report.exists() else None,
        )
