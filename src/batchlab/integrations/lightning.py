"""Lightning: :class:`BatchlabFinder`, a drop-in for ``BatchSizeFinder`` that also works under DDP.

::

    import lightning as L
    from batchlab.integrations.lightning import BatchlabFinder

    trainer = L.Trainer(callbacks=[BatchlabFinder()], strategy="ddp", devices=2)
    trainer.fit(model, datamodule=dm)        # model or dm has a `batch_size` attribute, as for BatchSizeFinder

At ``on_fit_start`` -- after the strategy has put the model on its device, before the fit loop builds its
dataloaders -- it runs :func:`batchlab.find_batch_size` over the module's own training step:
``train_dataloader()`` rebuilt at each probed size (through ``batch_size`` on the module, its hparams or the
datamodule, Lightning's ``lightning_setattr``), the batch moved by the module's transfer hooks,
``training_step``, backward and a step of fresh optimizers from ``configure_optimizers()`` (their state is
created in the first step and counted), under the trainer's precision context. Then it sets ``batch_size``
to the answer, and the fit loop builds its dataloader with it.

Against Lightning's ``BatchSizeFinder`` (``lightning.pytorch.tuner.batch_size_scaling``):

- under DDP each rank searches on its own device and the ranks agree on the smallest answer (one all_gather
  through ``trainer.strategy.all_gather``); BatchSizeFinder refuses distributed strategies;
- under FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``) every rank probes together on a
  :class:`~batchlab.devices.lockstep.LockstepDevice`, each with its own budget (issue 14; runs on the CPU with
  gloo). Lightning's ``strategy="fsdp"`` (FSDP1) refuses the CPU ("requires a GPU accelerator");
- the answer is a size that ran and whose measured peak stays within the budget (0.90 of capacity by
  default, or ``batch=0.8``, ``memory_budget="6GiB"``), not "the last size before an OOM" minus 5%;
- it uses public hooks only: no fit-loop internals, and no search state kept on the user's module.

State is restored after every probe and in ``finally``: weights, buffers, gradients, train/eval modes, RNG,
the ``batch_size`` attribute (set to the answer only when the search succeeds) and ``pl_module.trainer``,
which is detached while ``training_step`` runs outside the fit loop so that ``self.log`` becomes a no-op
instead of an error. Manual optimization (``automatic_optimization = False``) needs the trainer's loop; pass
your own ``step=`` for it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchlab.devices import Device, resolve_device
from batchlab.devices.lockstep import LockstepDevice
from batchlab.devices.ranks import current_ranks
from batchlab.fit import FitResult, Probe, SearchOptions
from batchlab.integrations.distributed import agree_on_batch_size
from batchlab.integrations.distributed.fit import is_sharded
from batchlab.units import parse_bytes
from batchlab.workload import EvalStep, StepFunction
from batchlab.workload.workload import tensor_bytes_of

try:  # the callback must subclass Lightning's; batchlab's core never imports this module
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "batchlab.integrations.lightning needs the `lightning` package: pip install 'batchlab[lightning]'"
    ) from exc

log = logging.getLogger("batchlab")

__all__ = ["BatchlabFinder"]

_LOG_WITHOUT_TRAINER = r".*self\.trainer. reference is not registered.*"


def _optimizers(config: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in whatever ``configure_optimizers()`` returned (Lightning's documented forms)."""
    if config is None:
        return []
    if isinstance(config, torch.optim.Optimizer):
        return [config]
    if isinstance(config, Mapping):
        return _optimizers(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        if len(config) == 2 and isinstance(config[0], (list, tuple)):  # ([optimizers], [schedulers])
            return _optimizers(list(config[0]))
        found: list[torch.optim.Optimizer] = []
        for item in config:
            found.extend(
                _optimizers(item) if not isinstance(item, torch.optim.lr_scheduler.LRScheduler) else []
            )
        return found
    raise TypeError(
        f"configure_optimizers() returned {type(config).__name__}; batchlab cannot find the optimizers"
    )


@contextmanager
def _detached(pl_module: Any) -> Iterator[None]:
    """Run outside the fit loop: ``self.log`` without a trainer is a documented no-op (it warns; silenced)."""
    trainer = pl_module.trainer
    pl_module.trainer = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOG_WITHOUT_TRAINER)
            yield
    finally:
        pl_module.trainer = trainer


class _LightningStep:
    """One automatic-optimization training step of a LightningModule at batch ``b``."""

    def __init__(
        self, trainer: Any, pl_module: Any, batch_arg_name: str, eval_batch_arg_name: str | None = None
    ):
        from lightning.pytorch.utilities.parsing import lightning_setattr

        self.trainer, self.pl_module, self.batch_arg_name = trainer, pl_module, batch_arg_name
        self.eval_batch_arg_name = eval_batch_arg_name
        self._setattr = lightning_setattr
        self.optimizers = _optimizers(pl_module.configure_optimizers())
        self._iterators: dict[int, Iterator[Any]] = {}
        device = pl_module.device
        half = str(trainer.precision).startswith("16") and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if half else None

    def loader(self, batch_size: int, stage: str = "train") -> Any:
        """The ``train`` (or ``val``) dataloader built at ``batch_size``, through the batch attribute."""
        name = self.batch_arg_name if stage == "train" else self.eval_batch_arg_name
        self._setattr(self.pl_module, name, batch_size)
        return getattr(self._source(stage), f"{stage}_dataloader")()

    def _source(self, stage: str = "train") -> Any:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, f"{stage}_dataloader"):
            return datamodule
        return self.pl_module

    def _next_batch(self, batch_size: int, stage: str = "train") -> Any:
        key = (stage, batch_size)
        iterator = self._iterators.get(key)
        if iterator is None:
            iterator = self._iterators[key] = iter(self.loader(batch_size, stage))
        try:
            batch = next(iterator)
        except StopIteration:  # a short dataset: start it again
            self._iterators[key] = iter(self.loader(batch_size, stage))
            batch = next(self._iterators[key])
        module = self.pl_module
        batch = module.on_before_batch_transfer(batch, 0)
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        return module.on_after_batch_transfer(batch, 0)

    def validate(self, batch_size: int) -> None:
        """One ``validation_step`` at ``batch_size`` (run by an :class:`~batchlab.workload.EvalStep`: no_grad,
        eval mode), under the trainer's precision context."""
        batch = self._next_batch(batch_size, "val")
        with _detached(self.pl_module), self.trainer.precision_plugin.forward_context():
            self.pl_module.validation_step(batch, 0)

    def tensor_bytes(self) -> Any:
        return tensor_bytes_of([self.pl_module], self.optimizers)

    def __call__(self, batch_size: int) -> None:
        module = self.pl_module
        batch = self._next_batch(batch_size)
        module.train()
        with _detached(module), self.trainer.precision_plugin.forward_context():
            output = module.training_step(batch, 0)
        loss = output["loss"] if isinstance(output, Mapping) else output
        if loss is None:
            return  # training_step skipped this batch
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        del loss, output, batch
        for optimizer in self.optimizers:
            if self.scaler:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()

    def close(self) -> None:
        self._iterators.clear()  # shut down the probe loaders' workers


class BatchlabFinder(Callback):
    """Find the largest batch that fits with batchlab's search and set it as ``batch_size``; works under DDP.

    Args:
        batch: ``-1`` (largest at 0.90 of memory), a fraction ``0 < f < 1``, or a fixed size to check;
            parsed by :func:`batchlab.spec.parse_batch`.
        memory_budget: treat the device as having this much memory ("6GiB").
        max_batch_size: never answer more than this (Lightning's ``max_val``).
        multiple_of: answer a multiple of this.
        batch_arg_name: the attribute to set, looked up like Lightning's ``BatchSizeFinder`` does (the module,
            its ``hparams``, the datamodule and its ``hparams``).
        device: where to measure; default the module's device. A :class:`~batchlab.devices.Device` is accepted.
        step: your own ``step(batch_size)`` for modules the default step cannot run (manual optimization);
            then ``preserve`` names what it changes (modules and optimizers).
        on_probe: called with each :class:`~batchlab.Probe`.
        eval_batch_arg_name: also find the validation batch and set it here (looked up as ``batch_arg_name``;
            ``val_dataloader()`` must read it): the largest batch whose ``validation_step`` fits -- under
            ``no_grad``, the module in eval mode -- beside the gradients and optimizer state the training
            search measured. Found after the training batch and apart from it: it never changes it.

    After the search: ``optimal_batch_size`` (as ``BatchSizeFinder``), ``result`` (this rank's
    :class:`~batchlab.FitResult`) and ``per_rank`` (every rank's own answer; one entry without DDP); with
    ``eval_batch_arg_name``, ``eval_batch_size`` and ``eval_result`` too.
    """

    def __init__(
        self,
        *,
        batch: int | float | str = -1,
        memory_budget: int | str | None = None,
        max_batch_size: int | None = None,
        multiple_of: int = 1,
        batch_arg_name: str = "batch_size",
        device: str | torch.device | Device | None = None,
        step: Callable[[int], Any] | None = None,
        preserve: Sequence[Any] = (),
        on_probe: Callable[[Probe], None] | None = None,
        eval_batch_arg_name: str | None = None,
    ) -> None:
        # Validated here, before any training starts.
        self.options = SearchOptions(batch=batch, memory_budget=memory_budget, device=device,
                                     max_batch_size=max_batch_size, multiple_of=multiple_of, on_probe=on_probe)  # fmt: skip
        if step is not None and not callable(step):
            raise TypeError(f"step must be a callable step(batch_size), got {step!r}")
        if eval_batch_arg_name is not None and eval_batch_arg_name == batch_arg_name:
            raise ValueError(
                f"BatchlabFinder: eval_batch_arg_name={eval_batch_arg_name!r} is batch_arg_name too; the "
                "validation batch needs its own attribute (one read by val_dataloader())"
            )
        if eval_batch_arg_name is not None and step is not None:
            raise ValueError(
                "BatchlabFinder: eval_batch_arg_name needs the default step (validation_step runs beside it); "
                "with step= search your evaluation with batchlab.workload.EvalStep yourself"
            )
        self.batch_arg_name = batch_arg_name
        self.eval_batch_arg_name = eval_batch_arg_name
        self.eval_batch_size: int | None = None
        self.eval_result: FitResult | None = None
        self.step = step
        self.preserve = tuple(preserve)
        self.optimal_batch_size: int | None = None
        self.result: FitResult | None = None
        self.per_rank: list[int] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        from lightning.pytorch.utilities.parsing import lightning_hasattr

        for name, option in (
            (self.batch_arg_name, "batch_arg_name"),
            (self.eval_batch_arg_name, "eval_batch_arg_name"),
        ):
            if stage == "fit" and name is not None and not lightning_hasattr(pl_module, name):
                raise AttributeError(
                    f"BatchlabFinder: no `{name}` on the LightningModule, its hparams or the datamodule; "
                    f"add one (the dataloaders must read it) or pass {option}="
                )
        if stage == "fit" and self.step is None and not pl_module.automatic_optimization:
            raise ValueError(
                "BatchlabFinder: manual optimization needs the trainer's loop; pass step=your_step(batch_size) "
                "and preserve=(model, optimizer)"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.scale_batch_size(trainer, pl_module)

    def _dataset_cap(self, runner: _LightningStep | None, world: int, stage: str = "train") -> int | None:
        """Each rank's share of a map-style training (or validation) set (a larger batch only repeats samples)."""
        if runner is None:
            return None
        try:
            dataset = runner.loader(1, stage).dataset
            return -(-len(dataset) // world)
        except (TypeError, AttributeError):  # iterable datasets have no length
            return None

    def _lockstep_options(self, pl_module: Any) -> SearchOptions:
        """Under an FSDP2-sharded module (Lightning's ModelParallelStrategy: ``fully_shard`` in
        ``configure_model``), the options with a :class:`~batchlab.devices.lockstep.LockstepDevice`: the step
        communicates, so every rank probes together (:mod:`batchlab.integrations.distributed.fit`)."""
        ranks = current_ranks()
        if ranks is None or not is_sharded(pl_module):
            return self.options
        inner = resolve_device(self.options.device or str(pl_module.device))
        budget = self.options.memory_budget
        own = parse_bytes(budget) if budget is not None else inner.capacity_bytes()
        device = LockstepDevice(inner, ranks, own, models=[pl_module])
        return self.options.with_changes(device=device, memory_budget=device.common_bytes)

    def scale_batch_size(self, trainer: Any, pl_module: Any) -> int:
        """Run the search (every rank, when distributed) and set ``batch_arg_name`` to the agreed answer."""
        from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr

        original = lightning_getattr(pl_module, self.batch_arg_name)
        world = int(getattr(trainer, "world_size", 1) or 1)
        runner = (
            _LightningStep(trainer, pl_module, self.batch_arg_name, self.eval_batch_arg_name)
            if self.step is None
            else None
        )
        if runner is not None:
            # The step's own GradScaler too: a step it skips (fp16 overflow) must still create the optimizer
            # state; the tensors it holds are counted, so the evaluation can leave room for them.
            scalers = (runner.scaler,) if runner.scaler is not None else ()
            work: Any = StepFunction(
                runner, preserve=(pl_module, *runner.optimizers, *scalers), tensor_bytes=runner.tensor_bytes
            )
            preserve: tuple = ()
        else:
            work, preserve = self.step, self.preserve
        results: list[FitResult] = []
        options = self._lockstep_options(pl_module) if world > 1 else self.options
        if options is not self.options and self.eval_batch_arg_name is not None:
            raise ValueError(
                "BatchlabFinder: eval_batch_arg_name is not supported under an FSDP2-sharded module yet "
                "(the evaluation search does not probe in lockstep); leave it unset"
            )

        def search() -> int:
            results.append(
                options.run(
                    work,
                    default_device=str(pl_module.device),
                    dataset_size=self._dataset_cap(runner, world),
                    preserve=preserve,
                    training_follows=True,
                )
            )
            return results[0].batch_size

        def gather(value: int) -> list[int]:
            if world == 1:
                return [value]
            mine = torch.tensor([value], dtype=torch.int64, device=pl_module.device)
            return [int(v) for v in trainer.strategy.all_gather(mine).flatten().tolist()]

        agreed = None
        try:
            agreed, self.per_rank = agree_on_batch_size(search, gather, rank=int(trainer.global_rank))
            lightning_setattr(pl_module, self.batch_arg_name, agreed)
            self.result = results[0]
            if runner is not None and self.eval_batch_arg_name is not None:
                self._scale_eval_batch(trainer, pl_module, runner, gather, world)
        finally:
            if runner is not None:
                runner.close()
            lightning_setattr(pl_module, self.batch_arg_name, agreed if agreed is not None else original)
        self.optimal_batch_size = agreed
        if not self.result.fits:  # a fixed batch= that was checked and does not fit: say so, do not hide it
            log.warning("batchlab: %s", self.result.summary())
        log.info(
            "batchlab: %s; %s = %d (ranks found %s)",
            self.result.summary(),
            self.batch_arg_name,
            agreed,
            self.per_rank,
        )
        return agreed

    def _scale_eval_batch(
        self,
        trainer: Any,
        pl_module: Any,
        runner: _LightningStep,
        gather: Callable[[int], list[int]],
        world: int,
    ) -> None:
        """Search ``validation_step`` beside the training state and set ``eval_batch_arg_name`` (restored on failure)."""
        from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr

        original = lightning_getattr(pl_module, self.eval_batch_arg_name)
        step = EvalStep(runner.validate, [pl_module], name=f"{type(pl_module).__name__} (eval)",
                        tensor_bytes=runner.tensor_bytes)  # fmt: skip
        results: list[FitResult] = []

        def search() -> int:
            results.append(
                self.options.with_changes(mode="eval").run(
                    step,
                    default_device=str(pl_module.device),
                    dataset_size=self._dataset_cap(runner, world, "val"),
                    beside=self.result,
                    training_follows=True,
                )
            )
            return results[0].batch_size

        agreed = None
        try:
            agreed, _ = agree_on_batch_size(search, gather, rank=int(trainer.global_rank))
        finally:
            lightning_setattr(pl_module, self.eval_batch_arg_name, agreed if agreed is not None else original)
        self.eval_batch_size, self.eval_result = agreed, results[0]
        log.info("batchlab: %s; %s = %d", self.eval_result.summary(), self.eval_batch_arg_name, agreed)
