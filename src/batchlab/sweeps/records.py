"""Sweep: train at several batch sizes (LR scaled by rule), track every run, resume, and compare.

One call::

    from batchlab.workloads.tasks import load_task
    result = batchlab.sweep(load_task("mlp-digits"), [16, 64, 256], lr=1e-3, base_batch=16, budget=400,
                            target=0.2)
    print(result.summary())

What a sweep does, in order:

1. **Runs.** One run per (batch size, LR multiplier, seed): ``factory(batch_size, lr, seed)`` builds a fresh
   :class:`~batchlab.trainable.Trainable`; ``lr`` is ``scale_lr(lr, base_batch, batch_size, rule).lr`` times
   the multiplier (a small LR grid per batch size, since the Tuning Playbook warns that the LR must be
   re-tuned when the batch changes). Each run trains until its budget (optimizer steps, samples or seconds
   of training) is spent, the target is reached (with ``stop_at_target``), or the loss stops being finite.
2. **Records.** Each run keeps its training loss at every step and its validation metrics at a schedule of
   evaluations (dense early, then every ``eval_every`` steps), each point with its step, samples and training
   seconds (evaluation excluded); the throughput; the peak memory of the run; the gradient noise scale
   measured along the way; and the steps, samples and seconds to the target, interpolated between the two
   evaluations that bracket the crossing (:func:`batchlab.critical.crossing`).
3. **Store and resume.** A sweep directory ``<directory>/sweeps/<name>/`` holds ``sweep.json`` (the
   configuration) and one ``runs/<key>.json`` per *finished* run, each written atomically (temp file,
   fsync, rename). Running the same sweep again skips every finished run: a Ctrl-C or a killed process
   loses only the run that was in progress. The default ``name`` is the workload's name plus a hash of the
   configuration, so re-running the same command resumes it.
4. **Tracking.** MLflow (:mod:`batchlab.tracking`): one experiment per sweep, one child run per (batch size,
   LR multiplier, seed) under a parent run that carries the report; a run is logged when it finishes, before
   its JSON is written, and a restart reconciles the store with MLflow (no run is logged twice; a run
   finished in MLflow but not in the directory is recovered from its artifact, not redone).
5. **Backends.** ``"local"`` runs one after another in this process; ``"ray"`` runs the same
   :func:`execute_run` as Ray Tune trials (:mod:`batchlab.ray_backend`); the driver stores and logs each
   result as it arrives, so both backends produce identical records in the same places.
6. **Report.** :func:`batchlab.report.write_report` draws the comparison (PNGs and one HTML page), logged as
   artifacts of the parent run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from batchlab.devices import resolve_device
from batchlab.noise.critical import (
    CriticalBatchFit,
    NoiseWindow,
    crossing,
    fit_critical_batch,
    noise_window,
    pooled_noise_scale,
)
from batchlab.scaling import RULES, scale_lr

log = logging.getLogger("batchlab")

__all__ = [
    "Budget",
    "Target",
    "Curve",
    "RunSpec",
    "SweepRun",
    "SweepConfig",
    "BatchSummary",
    "SweepResult",
    "SweepEvent",
    "SweepStore",
    "sweep",
    "execute_run",
    "auto_batch_sizes",
    "DEFAULT_DIRECTORY",
]

DEFAULT_DIRECTORY = "batchlab-runs"  # under the working directory: mlflow.db, artifacts/, sweeps/<name>/
AUTO_MIN_BATCH = 8  # "auto" starts here: below 8 a step is all per-step overhead on any device, and the
# smallest sizes need the most steps -- the slowest runs of a sweep for the least information
AUTO_MAX_SIZES = (
    8  # "auto" keeps the largest 8 powers of two (8..1024 when 1024+ fits): ~1 h budgets stay ~1 h
)
WARMUP_STEPS = 2  # left out of the throughput: step 1 creates gradients and optimizer state, step 2 is the
# first with state present (the same warm-up batchlab.profile drops)
EVAL_POINTS = 50  # default evaluations per run when the budget gives a step count (one every budget/50 steps)
EVAL_EVERY_UNKNOWN = 10  # ... and every 10 steps when it does not (a budget in seconds only)
EARLY_EVAL_RATIO = 1.3  # before the first regular evaluation, also evaluate at steps ceil(1.3^k): 1, 2, 3,
# 4, 5, 7, 9, 11, 14, ... -- large batches often reach a target within the first regular interval


# ------------------------------------------------------------------------------------------ budget, target


@dataclass(frozen=True)
class Budget:
    """When a run stops: after ``steps`` optimizer steps, ``samples`` training samples or ``seconds`` of
    training (evaluation excluded), whichever comes first. At least one must be set."""

    steps: int | None = None
    samples: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"budget {name} must be an int >= 1, got {value!r}")
        if self.seconds is not None and (
            isinstance(self.seconds, bool) or not self.seconds > 0 or not math.isfinite(self.seconds)
        ):
            raise ValueError(f"budget seconds must be a number > 0, got {self.seconds!r}")
        if self.steps is None and self.samples is None and self.seconds is None:
            raise ValueError("a budget needs steps, samples or seconds (e.g. budget=500 for 500 steps)")

    @classmethod
    def parse(cls, value: Budget | int | str | Mapping[str, Any]) -> Budget:
        """``500`` (steps), ``"500 steps"``, ``"20000 samples"``, ``"90s"``/``"90 seconds"``, a dict, a Budget."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"steps", "samples", "seconds"}
            if unknown:
                raise ValueError(f"budget keys must be steps, samples, seconds; got {sorted(unknown)}")
            return cls(**value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(steps=value)
        if isinstance(value, str):
            match = re.fullmatch(r"\s*([0-9.eE+]+)\s*(steps?|samples?|s|sec|seconds?)?\s*", value)
            if match:
                number, unit = match.groups()
                unit = (unit or "steps").rstrip("s") or "s"
                try:
                    if unit == "step":
                        return cls(steps=int(number))
                    if unit == "sample":
                        return cls(samples=int(number))
                    return cls(seconds=float(number))
                except ValueError:
                    pass
        raise ValueError(
            f"invalid budget {value!r}: expected an int (steps), '500 steps', '20000 samples', '90s', "
            "a dict such as {'steps': 500, 'seconds': 60}, or a Budget"
        )

    def max_steps(self, samples_per_step: int) -> int | None:
        """The step count the step and sample limits allow (None when only seconds are limited)."""
        limits = [self.steps] if self.steps is not None else []
        if self.samples is not None:
            limits.append(max(1, -(-self.samples // samples_per_step)))
        return min(limits) if limits else None

    def spent(self, steps: int, samples: int, seconds: float) -> str | None:
        """The name of the first limit reached, or None."""
        if self.steps is not None and steps >= self.steps:
            return "steps"
        if self.samples is not None and samples >= self.samples:
            return "samples"
        if self.seconds is not None and seconds >= self.seconds:
            return "seconds"
        return None

    def describe(self) -> str:
        parts = [
            f"{self.steps} steps" if self.steps else "",
            f"{self.samples} samples" if self.samples else "",
        ]
        parts.append(f"{self.seconds:g} s" if self.seconds else "")
        return " or ".join(p for p in parts if p)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """A validation target: ``metric`` (a key of ``evaluate()``; ``"loss"`` by default) at most ``value``
    (``mode="min"``) or at least it (``"max"``; the default for metrics whose name has no "loss")."""

    value: float
    metric: str = "loss"
    mode: str = ""

    def __post_init__(self) -> None:
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, (int, float))
            or not math.isfinite(self.value)
        ):
            raise ValueError(f"target value must be a finite number, got {self.value!r}")
        if not self.mode:
            object.__setattr__(self, "mode", "min" if "loss" in self.metric else "max")
        if self.mode not in ("min", "max"):
            raise ValueError(f"target mode must be 'min' or 'max', got {self.mode!r}")

    @classmethod
    def parse(cls, value: Target | float | str | Mapping[str, Any] | None) -> Target | None:
        """``0.3`` (val loss <= 0.3), ``"loss<=0.3"``, ``"accuracy>=0.95"``, a dict, a Target, or None."""
        if value is None or isinstance(value, Target):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(float(value))
        if isinstance(value, str):
            match = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", value)
            try:
                if match:
                    return cls(
                        float(match.group(3)), match.group(1), "min" if match.group(2) == "<=" else "max"
                    )
                return cls(float(value))
            except ValueError:
                pass
        raise ValueError(
            f"invalid target {value!r}: expected a validation loss (0.3), 'loss<=0.3', 'accuracy>=0.95', "
            "a dict or a Target"
        )

    def reached(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value <= self.value if self.mode == "min" else value >= self.value

    def describe(self) -> str:
        return f"val {self.metric} {'<=' if self.mode == 'min' else '>='} {self.value:g}"

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Curve:
    """Aligned columns: ``step`` (optimizer steps), ``samples``, ``seconds`` (training time) and metric values."""

    step: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)

    def add(self, step: int, samples: int, seconds: float, **values: float | None) -> None:
        self.step.append(step)
        self.samples.append(samples)
        self.seconds.append(seconds)
        for name, value in values.items():
            column = self.values.setdefault(name, [None] * (len(self.step) - 1))
            column.append(value)
        for column in self.values.values():
            if len(column) < len(self.step):
                column.append(None)

    def __getitem__(self, name: str) -> list[float | None]:
        return self.values[name]

    def __len__(self) -> int:
        return len(self.step)

    def to_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples, "seconds": self.seconds, "values": self.values}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Curve:
        return cls(list(data["step"]), list(data["samples"]), list(data["seconds"]), dict(data["values"]))


@dataclass(frozen=True)
class RunSpec:
    """One run to do: its key, batch size, learning rate (already scaled) and seed."""

    key: str
    batch_size: int
    lr: float
    lr_multiplier: float
    seed: int


def run_key(batch_size: int, lr_multiplier: float, seed: int) -> str:
    """``b64-lr1x-s0``: the run's name in the sweep directory and its MLflow tag."""
    return f"b{batch_size}-lr{lr_multiplier:g}x-s{seed}"


@dataclass(frozen=True)
class SweepRun:
    """Everything one run measured. Times are seconds of training (evaluation excluded) unless named wall.

    ``status`` is ``"finished"`` (budget spent or target reached), ``"diverged"`` (a non-finite loss) or
    ``"oom"`` (out of memory; ``error`` says where). ``stopped_by`` names what ended the run. ``*_to_target``
    are None when the target was not reached (or none was set). ``throughput`` is samples per second over the
    steps after ``WARMUP_STEPS``, leaving out the steps that carried the noise-scale measurement.
    ``peak_bytes`` is the device's peak during the run (CPU: the whole process's resident memory; CUDA: the
    caching allocator's reserved bytes), ``baseline_bytes`` what was in use when it started.
    ``noise_scale`` is the gradient noise scale B_simple of the EMA tracker at the end of the run and
    ``noise`` its full estimate; ``noise_updates`` holds every per-update estimate (|G|² as ``g2``, tr(Σ) as
    ``trace``); ``noise_at_target`` averages them over the second half of the steps to the target
    (:func:`batchlab.critical.noise_window`) and ``noise_scale_at_target`` is its B_simple.
    """

    def target_window(self) -> NoiseWindow | None:
        """The noise window before the target (None without a target crossing or noise measurements)."""
        if self.noise_at_target is None:
            return None
        data = {k: v for k, v in self.noise_at_target.items() if k != "b_simple"}
        return NoiseWindow(**data)

    key: str
    workload: str
    batch_size: int
    seed: int
    lr: float
    base_lr: float
    base_batch: int
    rule: str
    lr_multiplier: float
    accumulation: int
    precision: str
    device: str
    status: str
    stopped_by: str
    steps: int
    samples: int
    train_seconds: float
    wall_seconds: float
    throughput: float | None
    peak_bytes: int | None
    baseline_bytes: int | None
    noise_scale: float | None
    noise_scale_at_target: float | None
    steps_to_target: float | None
    samples_to_target: float | None
    seconds_to_target: float | None
    final_val: dict[str, float]
    best_val_loss: float | None
    train: Curve
    val: Curve
    noise: dict[str, Any] | None = None
    noise_at_target: dict[str, Any] | None = None
    noise_updates: Curve = field(default_factory=Curve)
    error: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    mlflow_run_id: str | None = None

    @property
    def target_reached(self) -> bool:
        return self.steps_to_target is not None

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["train"], data["val"] = self.train.to_dict(), self.val.to_dict()
        data["noise_updates"] = self.noise_updates.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepRun:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["train"], values["val"] = Curve.from_dict(data["train"]), Curve.from_dict(data["val"])
        if data.get("noise_updates"):
            values["noise_updates"] = Curve.from_dict(data["noise_updates"])
        return cls(**values)


@dataclass(frozen=True)
class SweepConfig:
    """What defines a sweep; ``fingerprint`` hashes everything except ``name`` (a resume must match it)."""

    name: str
    workload: str
    workload_options: dict[str, Any]
    batch_sizes_spec: Any
    batch_sizes: list[int]
    lr: float
    base_batch: int | None
    rule: str
    lr_multipliers: list[float]
    seeds: list[int]
    budget: Budget
    target: Target | None
    eval_every: int | None
    stop_at_target: bool
    dataset_size: int | None = None
    fingerprint: str = ""

    @property
    def effective_base_batch(self) -> int:
        return self.base_batch if self.base_batch is not None else min(self.batch_sizes)

    def lr_for(self, batch_size: int, multiplier: float = 1.0) -> float:
        """The LR a run at ``batch_size`` uses: the rule's scaled LR times ``multiplier``."""
        return scale_lr(self.lr, self.effective_base_batch, batch_size, self.rule).lr * multiplier

    def specs(self) -> list[RunSpec]:
        """Every run of the sweep, smallest batch first (small batches take the most steps; do them first)."""
        return [
            RunSpec(run_key(b, m, s), b, self.lr_for(b, m), m, s)
            for b in self.batch_sizes
            for m in self.lr_multipliers
            for s in self.seeds
        ]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["budget"] = self.budget.to_dict()
        data["target"] = self.target.to_dict() if self.target else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["budget"] = Budget(**data["budget"])
        values["target"] = Target(**data["target"]) if data.get("target") else None
        return cls(**values)


def _fingerprint(config: SweepConfig) -> str:
    data = config.to_dict()
    for volatile in ("name", "fingerprint", "batch_sizes", "dataset_size"):  # batch_sizes: "auto" resolves
        data.pop(volatile)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


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

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(present) if present else None


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


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

    def by_batch_size(self) -> list[BatchSummary]:
        """One :class:`BatchSummary` per batch size, smallest first."""
        out = []
        for b in self.batch_sizes:
            runs = self.runs_at(b)
            groups: dict[float, list[SweepRun]] = {}
            for run in runs:
                groups.setdefault(run.lr_multiplier, []).append(run)

            def score(group: list[SweepRun]) -> tuple[float, float]:
                steps = [r.steps_to_target for r in group]
                if self.config.target is not None and all(s is not None for s in steps):
                    return (0.0, statistics.fmean(steps))
                loss = _mean(r.final_val.get("loss") for r in group)
                return (1.0, loss if loss is not None else math.inf)

            best_m = min(groups, key=lambda m: score(groups[m]))
            best = groups[best_m]
            all_reached = all(r.target_reached for r in best)
            out.append(
                BatchSummary(
                    batch_size=b,
                    lr=best[0].lr,
                    lr_multiplier=best_m,
                    runs=len(runs),
                    steps_to_target=_mean(r.steps_to_target for r in best) if all_reached else None,
                    samples_to_target=_mean(r.samples_to_target for r in best) if all_reached else None,
                    seconds_to_target=_mean(r.seconds_to_target for r in best) if all_reached else None,
                    reached=sum(r.target_reached for r in best),
                    throughput=_median(r.throughput for r in runs),
                    peak_bytes=max((r.peak_bytes for r in runs if r.peak_bytes is not None), default=None),
                    final_val_loss=_mean(r.final_val.get("loss") for r in best),
                    noise_scale=_noise_of(best),
                    steps=max(r.steps for r in best),
                    samples=max(r.samples for r in best),
                )
            )
        return out

    def critical_batch(self) -> CriticalBatchFit | None:
        """S = S_min(1 + B_crit/B) fitted to the best steps-to-target per batch size (None: < 3 sizes reached)."""
        points = [(s.batch_size, s.steps_to_target) for s in self.by_batch_size() if s.steps_to_target]
        if len(points) < 3:
            return None
        return fit_critical_batch([b for b, _ in points], [s for _, s in points])

    def noise_scale(self) -> float | None:
        """The gradient noise scale the runs measured, pooled over every batch size's best-LR runs.

        With a target: tr(Σ) and |G|² averaged over the steps just before each run reached it, pooled across
        runs (:func:`batchlab.critical.pooled_noise_scale`); runs that missed it do not count. Without one (or
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
            reached = [s for s in rows if s.steps_to_target is not None]
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


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep, for progress bars: ``kind`` is ``"skip"`` (already finished), ``"start"``,
    ``"step"`` (``step`` of ``max_steps``; ``max_steps`` None for a budget in seconds), or ``"done"``
    (``run`` set). ``index`` counts runs from 0 over ``total``."""

    kind: str
    key: str
    index: int
    total: int
    step: int = 0
    max_steps: int | None = None
    run: SweepRun | None = None


# -------------------------------------------------------------------------------------------------- store


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SweepStore:
    """A sweep directory: ``sweep.json`` and one ``runs/<key>.json`` per finished run (atomic writes)."""

    CONFIG = "sweep.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read_config(self) -> tuple[SweepConfig | None, dict[str, Any]]:
        """(config, tracking metadata), or (None, {}) for a new directory."""
        file = self.path / self.CONFIG
        if not file.exists():
            return None, {}
        data = json.loads(file.read_text(encoding="utf-8"))
        return SweepConfig.from_dict(data["config"]), data.get("tracking", {})

    def write_config(self, config: SweepConfig, tracking: Mapping[str, Any] | None = None) -> None:
        payload = {"config": config.to_dict(), "tracking": dict(tracking or {})}
        _atomic_write(self.path / self.CONFIG, json.dumps(payload, indent=2, sort_keys=True))

    def finished(self) -> dict[str, SweepRun]:
        """key -> run for every run whose JSON is complete."""
        runs = {}
        for file in sorted((self.path / "runs").glob("*.json")):
            run = SweepRun.from_dict(json.loads(file.read_text(encoding="utf-8")))
            runs[run.key] = run
        return runs

    def save(self, run: SweepRun) -> Path:
        path = self.path / "runs" / f"{run.key}.json"
        _atomic_write(path, json.dumps(run.to_dict()))
        return path


# ------------------------------------------------------------------------------------------- one run


def _early_evals(every: int) -> set[int]:
    steps, k = set(), 0
    while True:
        s = math.ceil(EARLY_EVAL_RATIO**k)
        if s >= every:
            return steps
        steps.add(s)
        k += 1


def _finite(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def execute_run(
    factory: Callable[[int, float, int], Any],
    spec: RunSpec,
    config: SweepConfig,
    on_step: Callable[[int, int | None], None] | None = None,
) -> SweepRun:
    """Train one run of ``config`` (the same function for every backend) and return its record.

    Each step is timed alone (``train_step`` returns a float, a device sync; CUDA is synchronised after it
    too), so training seconds exclude evaluation and throughput can leave out warm-up and noise-measurement
    steps. The whole loop runs inside ``Device.run``: its peak memory is the run's, and an out-of-memory error
    ends the run as ``status="oom"`` while any other exception propagates unchanged.
    """
    started = time.time()
    trainable = factory(spec.batch_size, spec.lr, spec.seed)
    batch = int(getattr(trainable, "batch_size", spec.batch_size))
    if batch != spec.batch_size:
        raise ValueError(f"the factory built a run with batch_size {batch}, asked for {spec.batch_size}")
    model_device = getattr(trainable, "device", None)
    device = resolve_device(
        "auto", model_device if isinstance(model_device, torch.device) else torch.device("cpu")
    )
    is_cuda = isinstance(model_device, torch.device) and model_device.type == "cuda"
    budget, target = config.budget, config.target
    max_steps = budget.max_steps(batch)
    every = config.eval_every or (max(1, max_steps // EVAL_POINTS) if max_steps else EVAL_EVERY_UNKNOWN)
    early = _early_evals(every)
    train, val, updates = Curve(), Curve(), Curve()
    state: dict[str, Any] = {"step": 0, "samples": 0, "seconds": 0.0, "stopped_by": None}
    timed = {"samples": 0, "seconds": 0.0}

    def noise_now() -> float | None:
        estimate = trainable.noise_scale() if hasattr(trainable, "noise_scale") else None
        return None if estimate is None else _finite(estimate.b_simple)

    def evaluate() -> None:
        metrics = {name: _finite(value) for name, value in dict(trainable.evaluate()).items()}
        if "loss" not in metrics:
            raise ValueError("evaluate() must return a mapping with a 'loss' key")
        val.add(state["step"], state["samples"], state["seconds"], noise_scale=noise_now(), **metrics)
        if target is not None and target.reached(metrics.get(target.metric)):
            state["reached"] = True
        if metrics["loss"] is None:
            state["stopped_by"] = "diverged"

    def loop(_: int) -> None:
        evaluate()
        if is_cuda:
            torch.cuda.synchronize(model_device)
        while state["stopped_by"] is None:
            t0 = time.perf_counter()
            loss = _finite(trainable.train_step())
            if is_cuda:
                torch.cuda.synchronize(model_device)  # the step's kernels belong to its time
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["samples"] += batch
            state["seconds"] += dt
            step = state["step"]
            if step > WARMUP_STEPS and not getattr(trainable, "last_step_measured_noise", False):
                timed["samples"] += batch
                timed["seconds"] += dt
            train.add(step, state["samples"], state["seconds"], loss=loss)
            pair = getattr(trainable, "last_noise", None)
            if pair is not None:
                updates.add(step, state["samples"], state["seconds"], g2=pair[0], trace=pair[1])
            if loss is None:
                state["stopped_by"] = "diverged"
            spent = budget.spent(step, state["samples"], state["seconds"])
            if spent or step % every == 0 or step in early:
                if state["stopped_by"] is None:
                    evaluate()
                if spent and state["stopped_by"] is None:
                    state["stopped_by"] = spent
                if config.stop_at_target and state.get("reached") and state["stopped_by"] is None:
                    state["stopped_by"] = "target"
            if on_step is not None:
                on_step(step, max_steps)

    try:
        measurement = device.run(loop, batch, steps=1)
    finally:
        close = getattr(trainable, "close", None)
        if callable(close):
            close()
    status, stopped_by, error = "finished", state["stopped_by"], None
    if not measurement.ok:
        status, stopped_by, error = (
            "oom",
            "oom",
            f"out of memory at step {state['step'] + 1}: {measurement.error}",
        )
    elif stopped_by == "diverged":
        status = "diverged"

    to_target = None
    if target is not None and target.metric in val.values:
        to_target = crossing(
            [val.step, val.samples, val.seconds], val[target.metric], target.value, target.mode
        )
    window = None
    if to_target is not None and updates.step:
        window = noise_window(updates.step, updates["g2"], updates["trace"], to_target[0])
    final = {name: column[-1] for name, column in val.values.items() if name != "noise_scale" and column}
    losses = [v for v in val.values.get("loss", []) if v is not None]
    estimate = trainable.noise_scale() if hasattr(trainable, "noise_scale") else None
    return SweepRun(
        key=spec.key,
        workload=config.workload,
        batch_size=batch,
        seed=spec.seed,
        lr=spec.lr,
        base_lr=config.lr,
        base_batch=config.effective_base_batch,
        rule=config.rule,
        lr_multiplier=spec.lr_multiplier,
        accumulation=int(getattr(trainable, "accumulation", 1)),
        precision=str(getattr(trainable, "precision", "fp32")),
        device=str(model_device) if model_device is not None else "cpu",
        status=status,
        stopped_by=stopped_by or "steps",
        steps=state["step"],
        samples=state["samples"],
        train_seconds=state["seconds"],
        wall_seconds=time.time() - started,
        throughput=(timed["samples"] / timed["seconds"])
        if timed["seconds"] > 0
        else (state["samples"] / state["seconds"] if state["seconds"] > 0 else None),
        peak_bytes=measurement.peak_bytes,
        baseline_bytes=measurement.baseline_bytes,
        noise_scale=None if estimate is None else _finite(estimate.b_simple),
        noise_scale_at_target=window.b_simple if window is not None else None,
        steps_to_target=to_target[0] if to_target else None,
        samples_to_target=to_target[1] if to_target else None,
        seconds_to_target=to_target[2] if to_target else None,
        final_val=final,
        best_val_loss=min(losses) if losses else None,
        train=train,
        val=val,
        noise=estimate.to_dict() if estimate is not None else None,
        noise_at_target=window.to_dict() if window is not None else None,
        noise_updates=updates,
        error=error,
        started_at=started,
        finished_at=time.time(),
    )


# -------------------------------------------------------------------------------------------- the sweep


def auto_batch_sizes(
    factory: Callable[[int, float, int], Any], lr: float, *, device: Any = "auto"
) -> list[int]:
    """Powers of two from ``AUTO_MIN_BATCH`` up to the largest batch that fits (``find_batch_size``).

    Builds one run at batch ``AUTO_MIN_BATCH`` and searches its ``workload()`` (the training set caps the
    answer); keeps the largest ``AUTO_MAX_SIZES`` powers. Needs a factory whose runs have ``workload()``.
    """
    from batchlab.search import find_batch_size

    probe = factory(AUTO_MIN_BATCH, lr, 0)
    if not hasattr(probe, "workload"):
        raise ValueError(
            'batch_sizes="auto" needs runs with a workload() method (batchlab.trainable.SupervisedRun has one); '
            "pass explicit batch sizes instead"
        )
    try:
        fit = find_batch_size(probe.workload(), device=device)
    finally:
        if callable(getattr(probe, "close", None)):
            probe.close()
    top = fit.batch_size
    sizes = [2**k for k in range(AUTO_MIN_BATCH.bit_length() - 1, top.bit_length()) if 2**k <= top]
    return sizes[-AUTO_MAX_SIZES:] if sizes else [top]


def _workload_identity(factory: Any) -> tuple[str, dict[str, Any]]:
    """(name, options) of a factory for the sweep's fingerprint: its ``sweep_options`` (a user's factory with
    the CLI's flags, :class:`~batchlab.workloads.tasks.ConfiguredFactory`), or a dataclass's fields."""
    name = getattr(factory, "name", None) or getattr(factory, "__name__", None) or type(factory).__name__
    if isinstance(getattr(factory, "sweep_options", None), Mapping):
        options = dict(factory.sweep_options)
    elif is_dataclass(factory):
        options = {k: v for k, v in asdict(factory).items() if k != "name"}
    else:
        options = {}
    return str(name), options


def _check_batch_sizes(batch_sizes: Any) -> Any:
    if isinstance(batch_sizes, str) and batch_sizes.strip().lower() == "auto":
        return "auto"
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Iterable):
        raise ValueError(f'batch_sizes must be a list of ints >= 1 or "auto", got {batch_sizes!r}')
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f'batch_sizes must be a non-empty list of ints >= 1 or "auto", got {batch_sizes!r}')
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"batch_sizes has duplicates: {sizes}")
    return sorted(sizes)


def _check_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (how many) or a list of seeds, got {seeds!r}")
        return list(range(seeds))
    values = list(seeds)
    if (
        not values
        or any(isinstance(s, bool) or not isinstance(s, int) for s in values)
        or len(set(values)) != len(values)
    ):
        raise ValueError(f"seeds must be a count >= 1 or a list of distinct ints, got {seeds!r}")
    return values


def sweep(
    workload_factory: Callable[[int, float, int], Any],
    batch_sizes: Sequence[int] | str,
    *,
    lr: float,
    base_batch: int | None = None,
    rule: str = "sqrt",
    budget: Budget | int | str | Mapping[str, Any],
    target: Target | float | str | Mapping[str, Any] | None = None,
    seeds: int | Sequence[int] = 1,
    lr_multipliers: Sequence[float] = (1.0,),
    eval_every: int | None = None,
    stop_at_target: bool = False,
    name: str | None = None,
    directory: str | Path = DEFAULT_DIRECTORY,
    tracking_uri: str | None | bool = None,
    backend: str = "local",
    ray_address: str | None = None,
    ray_cpus_per_trial: float = 1.0,
    report: bool = True,
    on_event: Callable[[SweepEvent], None] | None = None,
) -> SweepResult:
    """Train ``workload_factory`` at each batch size and compare; see the module docstring for the steps.

    Args:
        workload_factory: ``factory(batch_size, lr, seed)`` -> a trainable (``train_step()``,
            ``evaluate()``), e.g. ``batchlab.workloads.tasks.load_task("mlp-digits")``.
        batch_sizes: samples per optimizer step, e.g. ``[16, 64, 256]``, or ``"auto"``: powers of two from 8
            up to the largest batch that fits (:func:`auto_batch_sizes`).
        lr: the learning rate tuned at ``base_batch`` (default: the smallest batch size).
        rule: how the LR follows the batch (:func:`batchlab.scaling.scale_lr`): "sqrt" (Adam-type), "linear"
            (SGD) or "none". ("adascale" needs a noise scale before the sweep has one and is refused.)
        budget: per run -- an int (optimizer steps), "500 steps", "20000 samples", "90s", or a :class:`Budget`.
        target: validation loss to reach (``0.3``), or "accuracy>=0.95"; records steps/samples/seconds to it.
        seeds: how many seeds (0..n-1) or a list; lr_multipliers: an LR grid per batch size, e.g. (0.5, 1, 2).
        eval_every: evaluate every n steps (default: budget/50, plus dense early evaluations).
        stop_at_target: end each run when it reaches the target (saves time in steps-to-target sweeps).
        name, directory: the sweep lives in ``directory/sweeps/name``; the default name resumes the same sweep.
        tracking_uri: None -- MLflow in ``directory/mlflow.db`` (skipped with one log line if MLflow is not
            installed); a URI -- that tracking server or store; False -- no tracking.
        backend: "local" or "ray" (Ray Tune trials; ``ray_address`` for an existing cluster).
        report: write the HTML/PNG report into the sweep directory (needs matplotlib) and log it to MLflow.
        on_event: called with a :class:`SweepEvent` for progress displays.

    Raises ``ValueError`` for bad arguments (before any training) or for a sweep directory that holds a
    different sweep under the same name; errors from the user's model propagate unchanged.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if rule not in RULES or rule == "adascale":
        allowed = ", ".join(repr(r) for r in RULES if r != "adascale")
        raise ValueError(f"rule must be one of {allowed}; got {rule!r}")
    if base_batch is not None and (
        isinstance(base_batch, bool) or not isinstance(base_batch, int) or base_batch < 1
    ):
        raise ValueError(f"base_batch must be an int >= 1 or None, got {base_batch!r}")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if backend == "ray" and ray_address is None and ray_cpus_per_trial > (os.cpu_count() or 1):
        raise ValueError(
            f"ray_cpus_per_trial={ray_cpus_per_trial:g} is more than this machine's {os.cpu_count()} CPUs, "
            "all that a local Ray has: no trial could ever start"
        )
    multipliers = [float(m) for m in lr_multipliers]
    if (
        not multipliers
        or any(not m > 0 or not math.isfinite(m) for m in multipliers)
        or len(set(multipliers)) != len(multipliers)
    ):
        raise ValueError(f"lr_multipliers must be distinct numbers > 0, got {lr_multipliers!r}")
    if eval_every is not None and (
        isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1
    ):
        raise ValueError(f"eval_every must be an int >= 1 or None, got {eval_every!r}")
    if not callable(workload_factory):
        raise TypeError(
            f"workload_factory must be callable as factory(batch_size, lr, seed), got {workload_factory!r}"
        )
    spec = _check_batch_sizes(batch_sizes)
    budget_ = Budget.parse(budget)
    target_ = Target.parse(target)
    seed_list = _check_seeds(seeds)
    workload, options = _workload_identity(workload_factory)

    config = SweepConfig(
        name="",
        workload=workload,
        workload_options=options,
        batch_sizes_spec=spec,
        batch_sizes=[] if spec == "auto" else list(spec),
        lr=float(lr),
        base_batch=base_batch,
        rule=rule,
        lr_multipliers=multipliers,
        seeds=seed_list,
        budget=budget_,
        target=target_,
        eval_every=eval_every,
        stop_at_target=bool(stop_at_target),
        dataset_size=getattr(workload_factory, "dataset_size", None),
    )
    fingerprint = _fingerprint(config)
    name = name or f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', workload)}-{fingerprint[:8]}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"sweep name {name!r} may hold only letters, digits, '.', '_' and '-'")
    root = Path(directory).resolve()
    store = SweepStore(root / "sweeps" / name)
    stored, meta = store.read_config()
    if stored is not None:
        if stored.fingerprint != fingerprint:
            raise ValueError(
                f"{store.path} holds a different sweep named {name!r} (its configuration differs); "
                "pass another name=, or delete that directory to start over"
            )
        config = stored
        log.info("resuming sweep %s from %s", name, store.path)
    else:
        sizes = auto_batch_sizes(workload_factory, lr) if spec == "auto" else list(spec)
        config = replace(config, name=name, batch_sizes=sizes, fingerprint=fingerprint)
        store.write_config(config)

    tracker = None
    if tracking_uri is not False:
        from batchlab.sweeps.tracking import SweepTracker, default_tracking_uri, mlflow_available

        if tracking_uri is None and not mlflow_available():
            log.warning("MLflow is not installed: this sweep is not tracked (pip install 'batchlab[track]')")
        else:
            uri = tracking_uri or default_tracking_uri(root)
            tracker = SweepTracker.open(uri, config, parent_run_id=meta.get("parent_run_id"))
            meta = {
                "tracking_uri": uri,
                "experiment_id": tracker.experiment_id,
                "parent_run_id": tracker.parent_run_id,
            }
            store.write_config(config, meta)

    specs = config.specs()
    finished = store.finished()
    if tracker is not None:
        for run in tracker.reconcile(finished).values():  # finished in MLflow, lost from the directory
            store.save(run)
            finished[run.key] = run
        for key, run in list(finished.items()):
            if not tracker.has_run(run.mlflow_run_id):  # finished while tracking was off, or elsewhere
                finished[key] = replace(run, mlflow_run_id=tracker.log_run(run))
                store.save(finished[key])

    total = len(specs)
    emit = on_event or (lambda event: None)
    pending = []
    for index, s in enumerate(specs):
        if s.key in finished:
            emit(SweepEvent("skip", s.key, index, total, run=finished[s.key]))
        else:
            pending.append((index, s))

    def persist(run: SweepRun) -> SweepRun:
        if tracker is not None:
            run = replace(run, mlflow_run_id=tracker.log_run(run))
        store.save(run)
        finished[run.key] = run
        return run

    if backend == "local":
        for index, s in pending:
            emit(SweepEvent("start", s.key, index, total))
            run = execute_run(
                workload_factory,
                s,
                config,
                on_step=lambda step, most, key=s.key, i=index: emit(
                    SweepEvent("step", key, i, total, step, most)
                ),
            )
            emit(SweepEvent("done", s.key, index, total, run.steps, run.steps, persist(run)))
    elif pending:
        from batchlab.sweeps.ray_backend import run_trials

        run_trials(
            workload_factory,
            pending,
            config,
            total=total,
            persist=persist,
            emit=emit,
            storage=store.path / "ray",
            address=ray_address,
            cpus_per_trial=ray_cpus_per_trial,
        )

    result = SweepResult(
        config,
        [finished[s.key] for s in specs if s.key in finished],
        store.path,
        meta.get("tracking_uri"),
        meta.get("experiment_id"),
        meta.get("parent_run_id"),
    )
    files: list[Path] = []
    if report:
        try:
            from batchlab.sweeps.report import write_report

            written = write_report(result, store.path / "report")
            result.report = written.html
            files = [written.html, *written.images]
        except ImportError as exc:
            log.warning("no report: %s", exc)
    if tracker is not None:
        tracker.finish_sweep(result, files + [store.path / SweepStore.CONFIG])
    return result
