"""Sweep runs from a function that returns a Workload: the one spec that fit, profile, noise, plan and sweep take.

``fit``, ``profile``, ``noise`` and ``plan`` need one training step; a sweep needs a whole training per batch
size, so it needs two things more, and takes both from the same ``make_workload()``:

- **a fresh model per run**: :class:`WorkloadFactory` calls the function once per run, its RNG seeded with
  the run's seed (inside ``torch.random.fork_rng``: the caller's RNG streams are left as they were), so every
  batch size starts from the same initial weights for a given seed. A function that hands back the same
  model twice (a model built once at import) is refused: the second run would continue the first's training.
- **held-out data**: ``workload.validation``, either a batch in the form ``make_batch`` returns (its loss,
  through the workload's own loss and autocast, is the validation loss) or a function ``model -> {"loss":
  ..., "accuracy": ...}`` for other metrics. A Workload without it is refused with the one line to add.

Each run (:class:`WorkloadRun`) trains through the Workload's public step pieces -- ``begin_step``,
``next_batch``, ``loss``, ``backward``, ``finish_step`` -- so it runs the very step ``fit`` measured. The
sweep's learning rate replaces the optimizer's (every param group scaled so the first one's LR is the run's:
ratios between groups are kept). ``batch_size`` is samples per optimizer step, taken as ``accumulation``
micro-batches of ``batch_size // accumulation`` (``accumulation`` defaults to the Workload's ``grad_accum``).
``make_batch`` draws from torch's global RNG, so each run keeps its own stream of it (seeded with the seed,
swapped in around each step): a run's batches repeat per seed, whatever ran before it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_map

from batchlab.devices import resolve_device
from batchlab.errors import WorkloadError
from batchlab.fit.search import check_host_room
from batchlab.sweeps.trainable import NOISE_EVERY, StepRun
from batchlab.workload.workload import StepFunction, Workload

__all__ = ["WorkloadFactory", "WorkloadRun", "missing_validation"]


def missing_validation(source: str) -> str:
    """The one line that says what a Workload needs before a sweep can compare runs on it."""
    return (
        f"{source} returned a Workload without validation data, which a sweep compares its runs on: set "
        "workload.validation = (inputs, targets) of held-out samples (or a function model -> {'loss': ...}) "
        "before returning it"
    )


def _all_cuda() -> list[int]:
    return list(range(torch.cuda.device_count()))  # 0 on a CPU build: no CUDA is initialised


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Scale every param group's LR so that the first group's is ``lr`` (the ratios between groups kept; a
    capturable optimizer's tensor LR stays a tensor)."""
    first = float(optimizer.param_groups[0]["lr"])
    if not first > 0:
        raise ValueError(f"the workload's optimizer has lr {first!r}; a sweep scales it and needs an lr > 0")
    for index, group in enumerate(optimizer.param_groups):
        scaled = lr if index == 0 else float(group["lr"]) * (lr / first)  # the first exactly: no rounding
        group["lr"] = (
            torch.full_like(group["lr"], scaled) if isinstance(group["lr"], torch.Tensor) else scaled
        )


class WorkloadRun(StepRun):
    """A sweep run that trains a :class:`~batchlab.Workload` at ``batch_size`` and evaluates its validation.

    Args:
        workload: the Workload, with a fresh model (the run trains it in place).
        batch_size: samples per optimizer step.
        seed: seeds this run's stream of torch's global RNG, from which ``make_batch`` draws.
        lr: the run's learning rate (None: the optimizer's own).
        accumulation: micro-batches per step (None: the Workload's ``grad_accum``); must divide ``batch_size``.
        noise_every: measure the gradient noise scale every n-th step (as :class:`SupervisedRun`).
        validation: held-out data (None: ``workload.validation``) -- see the module docstring.
    """

    def __init__(
        self,
        workload: Workload,
        *,
        batch_size: int,
        seed: int = 0,
        lr: float | None = None,
        accumulation: int | None = None,
        noise_every: int | None = NOISE_EVERY,
        validation: Any = None,
    ):
        if isinstance(workload, StepFunction) or not isinstance(workload, Workload):
            raise TypeError(f"WorkloadRun trains a batchlab.Workload, got {type(workload).__name__}")
        validation = getattr(workload, "validation", None) if validation is None else validation
        if validation is None:
            raise WorkloadError(missing_validation(f"the Workload {workload.name!r}"))
        self._workload = workload
        self.model = workload.model
        self.device = workload.device
        self.seed = seed
        self.amp = workload.amp
        self.precision = workload.amp or "fp32"
        self.name = workload.name
        self.dataset_size = workload.dataset_size
        self.validation = (
            validation
            if callable(validation)
            else tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, validation)
        )
        if lr is not None:
            _set_lr(workload.optimizer, lr)
        self._rng: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._start(batch_size, workload.grad_accum if accumulation is None else accumulation, noise_every,
                    workload.scaler)  # fmt: skip

    @contextmanager
    def _streams(self) -> Iterator[None]:
        """This run's RNG streams in, the caller's back out (``fork_rng`` restores them, also on an error)."""
        devices = _all_cuda()
        with torch.random.fork_rng(devices=devices):
            if self._rng is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self._rng[0])
                for device, state in zip(devices, self._rng[1]):
                    torch.cuda.set_rng_state(state, device)
            yield
            self._rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])

    def train_step(self) -> float:
        """One optimizer step of the Workload's own step pieces; returns the mean training loss."""
        with self._streams():
            return super().train_step()

    def check_host_room(self) -> None:
        """Refuse, before this run trains, a micro-batch the host cannot hold: on the CPU a step past the RAM
        is killed, not raised (:func:`batchlab.fit.search.check_host_room`; the state is left bitwise as it
        was). :func:`batchlab.sweep` asks its largest batch's run before it writes the sweep directory."""
        split = (
            f" (batch {self.batch_size} as {self.accumulation} x {self.micro_batch})"
            if self.accumulation > 1
            else ""
        )
        check_host_room(self._workload, self.micro_batch, what=f"the sweep's run{split}")

    def _batch(self) -> Any:
        return self._workload.next_batch(self.batch_size)

    def _micro_batches(self) -> Iterator[Any]:
        return (self._workload.next_batch(self.micro_batch) for _ in range(self.accumulation))

    def _loss(self, batch: Any) -> torch.Tensor:
        return self._workload.loss(batch)

    def _begin(self) -> None:
        self._workload.begin_step()

    def _backward(self, loss: torch.Tensor) -> None:
        self._workload.backward(loss)

    def _update(self) -> None:
        self._workload.finish_step()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The validation metrics: the loss of the validation batch, or what the validation function returns."""
        self.model.eval()
        try:
            if callable(self.validation):
                return dict(self.validation(self.model))
            return {"loss": float(self._workload.loss(self.validation))}
        finally:
            self.model.train()

    def workload(self) -> Workload:
        """The Workload this run trains (for ``batch_sizes="auto"``'s memory search)."""
        return self._workload

    def with_options(self, **changes: Any) -> WorkloadRun:
        """This run rebuilt with ``batchlab sweep``'s flags: ``accumulation``, ``amp``, ``noise_every``, ``device``.

        ``amp`` runs the Workload under another precision (:meth:`Workload.with_amp`, the same model and
        optimizer; None is fp32). A Workload's model is never moved: ``device`` must be where it already is
        (``"auto"`` always is), else the same ``ValueError`` as ``fit --device`` gives.
        """
        self._release_for(changes)
        if "device" in changes:
            resolve_device(changes["device"], self.device)  # raises, naming both devices, on a mismatch
        workload = self._workload.with_amp(changes["amp"]) if "amp" in changes else self._workload
        return WorkloadRun(
            workload,
            batch_size=self.batch_size,
            seed=self.seed,
            accumulation=changes.get("accumulation", self.accumulation),
            noise_every=changes.get("noise_every", self.noise_every_requested),
            validation=self.validation,
        )


class WorkloadFactory:
    """``factory(batch_size, lr, seed) -> WorkloadRun`` from ``make_workload()``, called once per run.

    ``source`` names the function in errors (the CLI passes its ``--workload`` spec). ``probe``: a Workload
    the function already returned (the CLI calls it once to see what it returns), checked instead of a first
    call; a second call follows, to see that each call builds a new model. Raises :class:`~batchlab.errors.WorkloadError` when the function returns anything
    but a Workload, a Workload without ``validation``, or the same model twice. Picklable when the function
    is (Ray ships it to its workers).
    """

    def __init__(
        self,
        make_workload: Callable[[], Workload],
        *,
        source: str | None = None,
        probe: Workload | None = None,
    ):
        if not callable(make_workload):
            raise TypeError(f"WorkloadFactory takes a function returning a Workload, got {make_workload!r}")
        self.make_workload = make_workload
        self.source = source or getattr(make_workload, "__qualname__", repr(make_workload))
        self._last_model: Any = None
        probe = self._build(0) if probe is None else self._checked(probe)
        if getattr(probe, "validation", None) is None:
            raise WorkloadError(missing_validation(self.source))
        self.name = probe.name
        self.dataset_size = probe.dataset_size
        self._build(0)  # a second call, the probe still alive: a model built once (at import) is refused now

    def _checked(self, workload: Any) -> Workload:
        if isinstance(workload, StepFunction) or not isinstance(workload, Workload):
            raise WorkloadError(
                f"{self.source} returned {type(workload).__name__}; expected a batchlab.Workload"
            )
        if self._last_model is not None and self._last_model() is workload.model:
            raise WorkloadError(
                f"{self.source} returned the same model twice: a sweep trains a fresh model per run; build the "
                "model inside the function"
            )
        self._last_model = weakref.ref(workload.model)
        return workload

    def _build(self, seed: int) -> Workload:
        """Call the function with torch's RNG seeded (initial weights repeat per seed), the caller's RNG kept."""
        with torch.random.fork_rng(devices=_all_cuda()):
            torch.manual_seed(seed)
            return self._checked(self.make_workload())

    def __call__(self, batch_size: int, lr: float, seed: int) -> WorkloadRun:
        return WorkloadRun(self._build(seed), batch_size=batch_size, lr=lr, seed=seed)

    def __getstate__(self) -> dict[str, Any]:
        """The factory without its weak reference to the last model, which does not pickle."""
        return {**self.__dict__, "_last_model": None}
