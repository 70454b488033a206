"""What a sweep trains -- a fresh model at one batch size, learning rate and seed -- and the step it takes.

A :class:`~batchlab.Workload` answers "what does one step at batch b cost?"; a sweep needs more: a held-out
validation split, a fresh model per run, a chosen learning rate and seed. That is a *trainable*, built by a
factory ``factory(batch_size, lr, seed) -> Trainable``:

- ``train_step() -> float``: one optimizer step on ``batch_size`` samples; returns the training loss (a
  Python float -- reading it is a device sync, which a sweep needs anyway to time each step honestly).
- ``evaluate() -> Mapping[str, float]``: metrics on the validation split; must include ``"loss"``.

Optional attributes a sweep reads when present: ``batch_size`` (samples per optimizer step),
``accumulation``, ``precision``, ``dataset_size`` (training samples), ``device`` (a torch.device, for the
memory reading), ``step_metrics()`` (values of the step just taken to record beside its loss, e.g. a batch
ramp's ``batch_size`` and ``lr``; ``batch_size`` is then read before every step), ``noise_scale() -> NoiseScaleEstimate | None``, ``last_step_measured_noise`` (that step
carried the noise measurement's extra work and is left out of the throughput), ``last_noise`` (that step's
unbiased estimates ``(|G|², tr Σ)`` of McCandlish eq. A.2, or None), ``workload()`` (a
:class:`~batchlab.Workload` of the same model, for ``batch_sizes="auto"``) and ``with_options(...)`` (the
run rebuilt with ``batchlab sweep``'s ``--device/--accumulation/--amp/--noise-every``).

:class:`StepRun` is the training step batchlab's own runs share (micro-batches, the noise-scale collectors,
the update); :class:`SupervisedRun` trains on in-memory tensors (the built-in tasks of
:mod:`batchlab.workloads.tasks`), :class:`~batchlab.sweeps.workload_run.WorkloadRun` through a Workload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from batchlab import checks
from batchlab.noise import (
    AccumulationCollector,
    GradientNoiseScale,
    NoiseScaleEstimate,
    SplitBatchCollector,
    estimate_components,
)
from batchlab.spec import parse_amp
from batchlab.workload.workload import Workload

__all__ = [
    "NOISE_EVERY",
    "OPTIONS",
    "StepRun",
    "SupervisedRun",
    "Trainable",
    "TrainableFactory",
    "accuracy",
    "close_run",
]

# Every 4th step runs its backward as two halves for the gradient noise scale (same gradient, one more
# forward/backward at half the batch): a quarter of the steps pay that, and those steps are left out of the
# throughput. With gradient accumulation the micro-batches measure it on the same steps, with no extra pass (the
# collector's hooks are in place on those steps only, AccumulationCollector(every=)); those steps are left out too.
NOISE_EVERY = 4
OPTIONS = (
    "device",
    "accumulation",
    "amp",
    "noise_every",
)  # what with_options() changes: batchlab sweep's flags
EVAL_BATCH = 4096  # validation is run in chunks of this many samples (memory, not statistics)


@runtime_checkable
class Trainable(Protocol):
    """What a sweep trains: see the module docstring for the optional attributes."""

    def train_step(self) -> float: ...

    def evaluate(self) -> Mapping[str, float]: ...


TrainableFactory = Callable[[int, float, int], Trainable]
"""``factory(batch_size, lr, seed) -> Trainable``: a fresh model trained at ``lr`` from seed ``seed``."""


def close_run(run: Any) -> None:
    """Call a run's optional ``close()`` (its noise hooks come off)."""
    close = getattr(run, "close", None)
    if callable(close):
        close()


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the integer target."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


class StepRun:
    """One optimizer step of ``batch_size`` samples in ``accumulation`` micro-batches, the noise scale measured.

    The gradient noise scale is measured on every ``noise_every``-th step: from the micro-batches when
    ``accumulation >= 2`` (:class:`~batchlab.noise.AccumulationCollector` with ``every=noise_every``: no extra
    pass, its hooks only on those steps), else by running the step as two halves
    (:class:`~batchlab.noise.SplitBatchCollector`; same gradient, one more forward/backward).
    A subclass supplies the data and the pieces of a step: ``_batch()`` (a whole batch), ``_micro_batches()``
    (``accumulation`` of ``batch_size // accumulation``), ``_loss(batch)``, ``_begin()`` (train mode, zero
    gradients), ``_backward(loss)`` and ``_update()`` (the optimizer step, through the GradScaler under fp16).
    """

    model: nn.Module
    device: torch.device

    def _start(self, batch_size: int, accumulation: int, noise_every: int | None, scaler: Any) -> None:
        """Check the sizes and hook the collector in; subclasses call it once ``model`` and ``device`` are set."""
        checks.integer("batch_size", batch_size)
        checks.integer("accumulation", accumulation)
        checks.integer("noise_every", noise_every, minimum=0, none=True)
        if batch_size % accumulation:
            raise ValueError(
                f"accumulation {accumulation} does not divide batch_size {batch_size}: every micro-batch "
                f"must have the same size (try accumulation {_largest_divisor_at_most(batch_size, accumulation)})"
            )
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.micro_batch = batch_size // accumulation
        self.noise_every_requested = noise_every  # what was asked; noise_every below is what runs
        self.steps_done = 0
        self.last_step_measured_noise = False
        self.last_noise: tuple[float, float] | None = None
        self._tracker = GradientNoiseScale()
        self._accum_collector: AccumulationCollector | None = None
        self._split_collector: SplitBatchCollector | None = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        if accumulation >= 2:
            self.noise_every = int(noise_every or 0)
            if self.noise_every:
                self._accum_collector = AccumulationCollector(
                    params, self.micro_batch, self._tracker, scaler=scaler, every=self.noise_every
                )
        else:
            self.noise_every = int(noise_every or 0) if batch_size >= 2 else 0  # one sample cannot be halved
            if self.noise_every:
                self._split_collector = SplitBatchCollector(params, self._tracker, scaler=scaler)

    def _batch(self) -> Any:
        raise NotImplementedError

    def _micro_batches(self) -> Iterable[Any]:
        raise NotImplementedError

    def _loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def _update(self) -> None:
        raise NotImplementedError

    def train_step(self) -> float:
        """One optimizer step; returns the batch's mean training loss (a device sync)."""
        self._begin()
        measure = bool(self.noise_every) and self.steps_done % self.noise_every == 0
        pair = None  # this step's NormPair when it measured the noise scale
        if self.accumulation >= 2:
            total = torch.zeros((), device=self.device)
            for batch in self._micro_batches():
                loss = self._loss(batch) / self.accumulation  # .grad: the mean gradient
                self._backward(loss)
                total += loss.detach()
                del loss  # free this micro-batch's activations before the next one is built
            if self._accum_collector is not None:
                pair = self._accum_collector.step()  # before the update: the scaler may change its scale
        elif measure and self._split_collector is not None:
            total = self._split_collector.backward(self._loss, self._batch())
            pair = self._split_collector.last
        else:
            total = self._loss(self._batch())
            self._backward(total)
            total = total.detach()
        self._update()
        self.steps_done += 1
        self.last_step_measured_noise = measure
        self.last_noise = (
            estimate_components(pair.sq_norm_small, pair.sq_norm_big, pair.b_small, pair.b_big)
            if pair is not None and pair.accepted
            else None
        )
        return float(total)

    def resize(self, batch_size: int, accumulation: int) -> None:
        """Run the next steps at ``batch_size`` in ``accumulation`` equal micro-batches (a batch ramp's change).

        Only for a run that measures no noise itself (``noise_every=0``): its collectors were built for the
        first split. The ramp that resizes it measures the noise scale on its own hooks.
        """
        if self._accum_collector is not None or self._split_collector is not None:
            raise ValueError(
                "resize() needs a run built with noise_every=0 (its collectors keep the first split)"
            )
        checks.integer("batch_size", batch_size)
        checks.integer("accumulation", accumulation)
        if batch_size % accumulation:
            raise ValueError(f"accumulation {accumulation} does not divide batch_size {batch_size}")
        self.batch_size, self.accumulation = batch_size, accumulation
        self.micro_batch = batch_size // accumulation

    def noise_scale(self) -> NoiseScaleEstimate | None:
        """The gradient noise scale measured so far (None when measurement is off)."""
        return self._tracker.result() if (self._accum_collector or self._split_collector) else None

    def close(self) -> None:
        """Remove the noise collectors' hooks."""
        for collector in (self._accum_collector, self._split_collector):
            if collector is not None:
                collector.close()

    def _release_for(self, changes: Mapping[str, Any]) -> None:
        """Check ``with_options(**changes)``'s keys and that no step has run, then take this run's hooks off."""
        unknown = set(changes) - set(OPTIONS)
        if unknown:
            raise TypeError(f"with_options() takes {', '.join(OPTIONS)}; got {', '.join(sorted(unknown))}")
        if self.steps_done:
            raise ValueError(f"with_options() rebuilds a fresh run; this one has run {self.steps_done} steps")
        self.close()


class SupervisedRun(StepRun):
    """Train ``model`` on in-memory ``(inputs, targets)`` tensors at a fixed batch size; evaluate on a held-out split.

    Sampling is what ``DataLoader(shuffle=True, drop_last=True)`` does: each epoch a fresh permutation (from
    a generator seeded with ``seed``, so runs repeat exactly on the CPU), cut into batches of ``batch_size``,
    the short tail dropped so every step sees the same batch size. ``accumulation`` splits each step's batch
    into that many micro-batches (the loss divided by it, so ``.grad`` is the batch mean either way).

    Args:
        model: the ``nn.Module``, already on its device; the data is moved there.
        optimizer: an ``Optimizer`` over the model's parameters.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        train, val: ``(inputs, targets)`` tensors; ``train`` must hold at least ``batch_size`` samples.
        batch_size: samples per optimizer step.
        seed: seeds the data order (the factory seeds the model's initialisation).
        accumulation: micro-batches per step; must divide ``batch_size``.
        amp: None, ``"bf16"`` or ``"fp16"`` autocast (fp16 with a GradScaler).
        metrics: extra validation metrics ``name -> f(outputs, targets)``; ``"loss"`` is always computed.
        noise_every: measure the gradient noise scale on every n-th step (from the micro-batches with
            ``accumulation >= 2``, else as a split batch); 0 or None: never.
        name: a label for reports.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        *,
        batch_size: int,
        seed: int = 0,
        accumulation: int = 1,
        amp: str | None = None,
        metrics: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
        noise_every: int | None = NOISE_EVERY,
        name: str = "supervised",
    ):
        if len(train[0]) != len(train[1]) or len(val[0]) != len(val[1]):
            raise ValueError("inputs and targets must have the same length in train and val")
        if checks.integer("batch_size", batch_size) > len(train[0]):
            raise ValueError(
                f"batch_size {batch_size} is larger than the {len(train[0])} training samples: with drop_last "
                "no step could run; use a batch size <= the training set"
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.seed = seed
        self.device = next(iter(model.parameters())).device
        self.train_x, self.train_y = (t.to(self.device) for t in train)
        self.val_x, self.val_y = (t.to(self.device) for t in val)
        self.amp = parse_amp(amp)
        self.precision = self.amp or "fp32"
        self.metrics = dict(metrics if metrics is not None else {"accuracy": accuracy})
        self.name = name
        self.dataset_size = len(self.train_x)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._start(batch_size, accumulation, noise_every, self.scaler)

    # ------------------------------------------------------------------------------------------ training

    def _next_indices(self) -> torch.Tensor:
        if self._cursor + self.batch_size > len(self._order):  # epoch over: the short tail is dropped
            self._order = torch.randperm(self.dataset_size, generator=self._generator)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return index.to(self.device)

    def _autocast(self):
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp is not None)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._next_indices()
        return self.train_x[index], self.train_y[index]

    def _micro_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._batch()
        return zip(x.split(self.micro_batch), y.split(self.micro_batch))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        with self._autocast():
            return self.loss_fn(self.model(inputs), targets)

    def _begin(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the whole validation split (in chunks of ``EVAL_BATCH``)."""
        self.model.eval()
        sums = {"loss": 0.0, **{name: 0.0 for name in self.metrics}}
        count = len(self.val_x)
        for start in range(0, count, EVAL_BATCH):
            x, y = self.val_x[start : start + EVAL_BATCH], self.val_y[start : start + EVAL_BATCH]
            with self._autocast():
                outputs = self.model(x)
                sums["loss"] += float(self.loss_fn(outputs.float(), y)) * len(x)
                for name, metric in self.metrics.items():
                    sums[name] += float(metric(outputs.float(), y)) * len(x)
        self.model.train()
        return {name: value / count for name, value in sums.items()}

    def workload(self) -> Workload:
        """This model as a :class:`~batchlab.Workload` with random training batches (for memory searches), its
        validation this run's own :meth:`evaluate` (the whole split, in chunks), so that
        :func:`~batchlab.sweeps.branched.branch_critical_batch` can branch from it too."""
        n = self.dataset_size

        def make_batch(b: int):
            index = torch.randint(0, n, (b,), device=self.device)
            return self.train_x[index], self.train_y[index]

        return Workload(
            self.model,
            make_batch,
            self.loss_fn,
            self.optimizer,
            amp=self.amp,
            dataset_size=n,
            name=self.name,
            validation=lambda _model: self.evaluate(),  # the same model: evaluate() reads self.model
        )

    def with_options(self, **changes: Any) -> SupervisedRun:
        """This run rebuilt with some settings changed: ``device``, ``accumulation``, ``amp``, ``noise_every``.

        How ``batchlab sweep --device/--accumulation/--amp/--noise-every`` reach a run a user's factory built:
        the same model, optimizer, data, seed, metrics and name; only the keys given change (``amp=None`` is
        fp32). ``device`` moves the model and the data there, swapping each parameter's contents in place
        (``torch.__future__.set_swap_module_params_on_conversion``, switched on only for that ``Module.to``:
        without it a move between incompatible tensor types makes new Parameter objects, which the optimizer
        would not hold); it is refused once the optimizer has state (its tensors would stay behind). Call it
        before the first step; this run's noise hooks are removed.
        """
        self._release_for(changes)
        if "device" in changes:
            target = torch.device(changes["device"])
            if target != self.device and self.optimizer.state:
                raise ValueError(
                    f"cannot move the run to {target}: its optimizer already holds state on {self.device}"
                )
            swap = torch.__future__.get_swap_module_params_on_conversion()
            torch.__future__.set_swap_module_params_on_conversion(True)
            try:
                self.model.to(target)
            finally:
                torch.__future__.set_swap_module_params_on_conversion(swap)
        settings = {
            "accumulation": self.accumulation,
            "amp": self.amp,
            "noise_every": self.noise_every_requested,
            **{k: v for k, v in changes.items() if k != "device"},
        }
        return SupervisedRun(
            self.model,
            self.optimizer,
            self.loss_fn,
            (self.train_x, self.train_y),
            (self.val_x, self.val_y),
            batch_size=self.batch_size,
            seed=self.seed,
            metrics=self.metrics,
            name=self.name,
            **settings,
        )
