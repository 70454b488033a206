"""A sweep run whose batch ramps: :class:`RampedRun` trains a :class:`SupervisedRun` under a BatchRamp.

``RampFactory(task, max_batch=512, max_micro_batch=64)`` is a run factory like any other, so a ramp runs
through the same sweep machinery -- store, resume, MLflow, report -- as the fixed batches it is compared with::

    fixed = batchlab.sweep(Task("mnist1d"), [16, 32, 64, 128], lr=2e-3, budget="40000 samples", target=1.2)
    ramp = batchlab.sweep(RampFactory(Task("mnist1d"), max_batch=128, max_micro_batch=64), [16], lr=2e-3, ...)

The run starts at the sweep's batch size (the factory's ``batch_size``) and LR; each step runs the ramp's
split (:class:`batchlab.training.BatchRamp`), and the ramp's changes carry the LR. ``step_metrics()`` gives
the batch and LR of the step just taken, which the sweep records beside the loss and logs to MLflow as
stepped metrics (``batch_size``, ``lr``). The ramp measures the noise scale itself, from the accumulation
micro-batches, so the wrapped run is rebuilt with ``noise_every=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from batchlab import checks
from batchlab.advice.ramp import (
    DEFAULT_GROWTH,
    DEFAULT_MIN_UPDATES,
    DEFAULT_PATIENCE,
    DEFAULT_Z,
    MIN_ACCUMULATION,
)
from batchlab.noise import NoiseScaleEstimate, estimate_components
from batchlab.sweeps.trainable import SupervisedRun, close_run
from batchlab.training.ramp import RAMP_BETA, BatchRamp, check_ramp_settings, start_sizes

__all__ = ["RampedRun", "RampFactory"]


class RampedRun:
    """``run`` (a fresh :class:`SupervisedRun`) trained with a :class:`~batchlab.training.BatchRamp` from its
    batch size; ``ramp_options`` are the ramp's keyword arguments (``max_batch``, ``max_micro_batch``, ...)."""

    def __init__(self, run: SupervisedRun, **ramp_options: Any) -> None:
        if not isinstance(run, SupervisedRun):
            close_run(run)
            raise TypeError(f"RampedRun ramps a batchlab.sweeps.SupervisedRun, got {type(run).__name__}")
        self.run = run.with_options(noise_every=0)  # the ramp measures the noise scale on its own hooks
        try:
            self.ramp = BatchRamp(
                self.run.optimizer, batch_size=run.batch_size, scaler=self.run.scaler, **ramp_options
            )
        except BaseException:
            self.run.close()
            raise
        self.run.resize(self.ramp.batch_size, self.ramp.accumulation)
        self.name = run.name
        self.device = run.device
        self.precision = run.precision
        self.dataset_size = run.dataset_size
        self.last_noise: tuple[float, float] | None = None
        self._last: dict[str, float] = {}

    @property
    def batch_size(self) -> int:
        """The global batch of the next step."""
        return self.ramp.batch_size

    @property
    def accumulation(self) -> int:
        return self.ramp.accumulation

    def train_step(self) -> float:
        """One step at the ramp's current split, then the ramp's reading (which may grow the batch)."""
        self._last = {"batch_size": float(self.ramp.batch_size), "lr": self.ramp.lr}
        loss = self.run.train_step()
        self.ramp.step()
        self.run.resize(self.ramp.batch_size, self.ramp.accumulation)
        pair = self.ramp.last_pair
        self.last_noise = (
            estimate_components(pair.sq_norm_small, pair.sq_norm_big, pair.b_small, pair.b_big)
            if pair is not None and pair.accepted
            else None
        )
        return loss

    def step_metrics(self) -> dict[str, float]:
        """The batch and LR of the step just taken."""
        return dict(self._last)

    def evaluate(self) -> dict[str, float]:
        return self.run.evaluate()

    def noise_scale(self) -> NoiseScaleEstimate:
        return self.ramp.estimate()

    def close(self) -> None:
        self.ramp.close()
        self.run.close()


@dataclass(frozen=True)
class RampFactory:
    """A run factory ``(batch_size, lr, seed) -> RampedRun`` over ``factory`` (e.g. a built-in Task): the
    ramp starts at the sweep's batch size and grows up to ``max_batch`` in micro-batches of at most
    ``max_micro_batch``. The other fields are :class:`~batchlab.training.BatchRamp`'s. Picklable when
    ``factory`` is (Ray ships it to the workers); its fields are the sweep's identity (fingerprint)."""

    factory: Callable[..., Any]
    max_batch: int
    max_micro_batch: int
    target: float = 1.0
    growth: float = DEFAULT_GROWTH
    patience: int = DEFAULT_PATIENCE
    z: float = DEFAULT_Z
    min_updates: int = DEFAULT_MIN_UPDATES
    min_accumulation: int = MIN_ACCUMULATION
    beta: float = RAMP_BETA
    rule: str | None = None
    keep: tuple[str, ...] = ()
    measure_every: int = 1

    def __post_init__(self) -> None:
        """The ramp's settings are checked here, so a sweep with a bad one fails before any run trains."""
        if not callable(self.factory):
            raise TypeError(
                f"RampFactory needs a run factory (batch_size, lr, seed) -> run, got {self.factory!r}"
            )
        options = self._ramp_options()
        checks.integer("max_micro_batch", options.pop("max_micro_batch"))
        check_ramp_settings(**options)

    def _ramp_options(self) -> dict[str, Any]:
        """Every field but ``factory``: BatchRamp's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "factory"}

    def check_batch_sizes(self, batch_sizes: Iterable[int]) -> None:
        """A one-line error for a starting batch this ramp cannot run (above ``max_batch``, or under
        ``min_accumulation`` samples); :func:`~batchlab.sweeps.sweep` calls it before any run trains."""
        for batch_size in batch_sizes:
            start_sizes(batch_size, self.max_batch, self.max_micro_batch, growth=self.growth,
                        min_accumulation=self.min_accumulation)  # fmt: skip

    @property
    def name(self) -> str:
        base = getattr(self.factory, "name", None) or getattr(self.factory, "__name__", "run")
        return f"{base}-ramp"

    @property
    def dataset_size(self) -> int | None:
        return getattr(self.factory, "dataset_size", None)

    def __call__(self, batch_size: int, lr: float, seed: int) -> RampedRun:
        return RampedRun(self.factory(batch_size, lr, seed), **self._ramp_options())
