"""The records of a sweep: its budget and target, each run's curves and results, its configuration, progress.

These are the types every other part of :mod:`batchlab.sweeps` passes around -- the orchestrator, the run
loop, the store, MLflow tracking, the Ray backend and the report all import them from here, and this module
imports none of those. Every record round-trips through JSON (``to_dict`` / ``from_dict``); outcomes and limits
are str-valued enums, so the JSON holds the same plain strings (``"finished"``, ``"steps"``) as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from batchlab import checks
from batchlab.advice.scaling import scale_lr
from batchlab.labels import Label
from batchlab.noise.critical import NoiseWindow, crossing, noise_window

__all__ = [
    "Budget",
    "Curve",
    "EventKind",
    "RunSpec",
    "RunStatus",
    "StopReason",
    "SweepConfig",
    "SweepEvent",
    "SweepRun",
    "Target",
    "TargetMode",
    "fingerprint",
    "run_key",
]


class RunStatus(Label):
    """How a run ended: finished (budget spent or target reached), diverged (a non-finite loss), oom."""

    FINISHED = "finished"
    DIVERGED = "diverged"
    OOM = "oom"


class StopReason(Label):
    """What ended a run: one of the budget's limits, the target (``stop_at_target``), divergence, an OOM."""

    STEPS = "steps"
    SAMPLES = "samples"
    SECONDS = "seconds"
    TARGET = "target"
    DIVERGED = "diverged"
    OOM = "oom"


class TargetMode(Label):
    """Whether a target is reached at or below its value (a loss) or at or above it (an accuracy)."""

    MIN = "min"
    MAX = "max"


class EventKind(Label):
    """What a :class:`SweepEvent` reports."""

    SKIP = "skip"
    START = "start"
    STEP = "step"
    DONE = "done"


# ------------------------------------------------------------------------------------------ budget, target


@dataclass(frozen=True)
class Budget:
    """When a run stops: after ``steps`` optimizer steps, ``samples`` training samples or ``seconds`` of
    training (evaluation excluded), whichever comes first. At least one must be set."""

    steps: int | None = None
    samples: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        checks.integer("budget steps", self.steps, none=True)
        checks.integer("budget samples", self.samples, none=True)
        checks.number("budget seconds", self.seconds, none=True)
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

    def spent(self, steps: int, samples: int, seconds: float) -> StopReason | None:
        """The first limit reached, or None."""
        if self.steps is not None and steps >= self.steps:
            return StopReason.STEPS
        if self.samples is not None and samples >= self.samples:
            return StopReason.SAMPLES
        if self.seconds is not None and seconds >= self.seconds:
            return StopReason.SECONDS
        return None

    def describe(self) -> str:
        """``"500 steps or 60 s"``: the limits in words."""
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
    mode: TargetMode | str = ""

    def __post_init__(self) -> None:
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, (int, float))
            or not math.isfinite(self.value)
        ):
            raise ValueError(f"invalid target value {self.value!r}: expected a finite number")
        mode = self.mode or ("min" if "loss" in self.metric else "max")
        object.__setattr__(
            self, "mode", TargetMode(checks.choice("target mode", mode, [m.value for m in TargetMode]))
        )

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
        """Is ``value`` (an evaluation's metric) at or past the target? NaN and None never are."""
        if value is None or not math.isfinite(value):
            return False
        return value <= self.value if self.mode is TargetMode.MIN else value >= self.value

    def describe(self) -> str:
        return f"val {self.metric} {'<=' if self.mode is TargetMode.MIN else '>='} {self.value:g}"

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

    ``status`` is a :class:`RunStatus`: ``"finished"`` (budget spent or target reached), ``"diverged"`` (a
    non-finite loss) or ``"oom"`` (out of memory; ``error`` says where). ``stopped_by`` (a :class:`StopReason`)
    names what ended the run. ``*_to_target``
    are None when the target was not reached (or none was set). ``throughput`` is samples per second over the
    steps after ``batchlab.defaults.WARMUP_STEPS``, leaving out the steps that carried the noise-scale measurement.
    ``peak_bytes`` is the device's peak during the run (CPU: the whole process's resident memory, freed heap
    included -- the run trains with glibc's speed, not the exact readings' allocator; CUDA: the caching
    allocator's reserved bytes), ``baseline_bytes`` what was in use when it started.
    ``noise_scale`` is the gradient noise scale B_simple of the EMA tracker at the end of the run and
    ``noise`` its full estimate; ``noise_updates`` holds every per-update estimate (|G|² as ``g2``, tr(Σ) as
    ``trace``); ``noise_at_target`` averages them over the second half of the steps to the target
    (:func:`batchlab.noise.critical.noise_window`) and ``noise_scale_at_target`` is its B_simple.
    """

    def with_target(self, target: Target | None) -> SweepRun:
        """This run measured against ``target`` instead of the sweep's: read off its recorded validation curve
        and noise updates as the runner reads them at the end of a run (:func:`target_fields`); nothing trains
        again."""
        return replace(self, **target_fields(self.val, self.noise_updates, target))

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
    status: RunStatus
    stopped_by: StopReason
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RunStatus(self.status))  # from JSON: the plain strings
        object.__setattr__(self, "stopped_by", StopReason(self.stopped_by))

    @property
    def target_reached(self) -> bool:
        return self.steps_to_target is not None

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.FINISHED

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


def target_fields(val: Curve, updates: Curve, target: Target | None) -> dict[str, Any]:
    """A run's fields about ``target``, from its validation curve ``val`` and noise ``updates``: steps, samples
    and seconds to where the curve first reaches it, interpolated between evaluations
    (:func:`~batchlab.noise.critical.crossing`), and the noise averaged over the second half of the steps
    before it (:func:`~batchlab.noise.critical.noise_window`). None where the target is not reached (or not
    set, or its metric was never evaluated)."""
    to_target = window = None
    if target is not None and target.metric in val.values:
        values = [
            math.nan if v is None else v for v in val[target.metric]
        ]  # an evaluation without the metric
        to_target = crossing([val.step, val.samples, val.seconds], values, target.value, target.mode)
    if to_target is not None and updates.step:
        window = noise_window(updates.step, updates["g2"], updates["trace"], to_target[0])
    return {
        "steps_to_target": to_target[0] if to_target else None,
        "samples_to_target": to_target[1] if to_target else None,
        "seconds_to_target": to_target[2] if to_target else None,
        "noise_at_target": window.to_dict() if window is not None else None,
        "noise_scale_at_target": window.b_simple if window is not None else None,
    }


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


def fingerprint(config: SweepConfig) -> str:
    """A hash of everything that defines ``config``'s runs: a resumed sweep must match it."""
    data = config.to_dict()
    for volatile in ("name", "fingerprint", "batch_sizes", "dataset_size"):  # batch_sizes: "auto" resolves
        data.pop(volatile)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep, for progress bars: ``kind`` (an :class:`EventKind`) is ``"skip"`` (already
    finished), ``"start"``, ``"step"`` (``step`` of ``max_steps``; ``max_steps`` None for a budget in seconds),
    or ``"done"`` (``run`` set). ``index`` counts runs from 0 over ``total``."""

    kind: EventKind
    key: str
    index: int
    total: int
    step: int = 0
    max_steps: int | None = None
    run: SweepRun | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", EventKind(self.kind))
