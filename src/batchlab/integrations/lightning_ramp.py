"""Lightning: :class:`BatchRampCallback`, a batch that grows with the noise scale through gradient accumulation.

::

    import lightning as L
    from batchlab.integrations.lightning_ramp import BatchRampCallback

    ramp = BatchRampCallback(max_batch=1024)
    trainer = L.Trainer(accumulate_grad_batches=2, callbacks=[ramp])   # the dataloader's batch: the micro-batch
    trainer.fit(model, datamodule=dm)
    print(ramp.ramp.events)

The dataloader's batch is the micro-batch and stays as it is; the global batch ``micro x accumulation`` grows
through ``trainer.accumulate_grad_batches``, the attribute Lightning's own ``GradientAccumulationScheduler``
sets (Lightning 2.x reads it at every batch: ``ready % accumulate_grad_batches`` decides the optimizer step,
``batch_idx % accumulate_grad_batches`` the zeroing of gradients). Because both are counted from the start of
the epoch, a change is applied only where the new accumulation lines up with them -- right after an optimizer
step whose batch count in the epoch is a multiple of the new accumulation, or at the start of an epoch -- so
no window ever mixes two accumulations. Until then the change waits; its noise readings keep coming.

The noise scale comes from the accumulation micro-batches (:class:`batchlab.training.BatchRamp`), read in
``on_before_optimizer_step`` (every backward of the step is done; under 16-bit mixed precision the plugin's
GradScaler scale is divided out). Each change carries the LR, betas, eps and weight decay of the optimizer and
the ``base_lrs`` of its LR schedulers (:func:`batchlab.training.carry_over`).

Checked before the first step, each a one-line error: automatic optimization; ``accumulate_grad_batches >= 2``
(two micro-batches per step measure the noise scale); no ``GradientAccumulationScheduler`` (it would set the
accumulation back every epoch); one optimizer; one process (the accumulation collector is not for DDP);
``max_batch`` not below the starting ``micro x accumulation``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchlab.advice.ramp import DEFAULT_GROWTH, DEFAULT_MIN_UPDATES, DEFAULT_PATIENCE, DEFAULT_Z
from batchlab.training.ramp import RAMP_BETA, BatchRamp, RampEvent, check_ramp_settings

try:  # the callback must subclass Lightning's; batchlab's core never imports this module
    from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "batchlab.integrations.lightning_ramp needs the `lightning` package: pip install 'batchlab[lightning]'"
    ) from exc

__all__ = ["BatchRampCallback"]


class BatchRampCallback(Callback):
    """Grow the global batch toward the measured noise scale by raising ``trainer.accumulate_grad_batches``.

    Args:
        max_batch: the largest global batch (micro-batch x accumulation) to grow to.
        rule, target, growth, patience, z, min_updates, beta: as for :class:`batchlab.training.BatchRamp`.
        measure_every: measure the noise scale on one optimizer step in this many, as for
            :class:`~batchlab.training.BatchRamp` (the steps between carry no hooks; patience counts measured
            steps only).
        on_change: called with each :class:`~batchlab.training.RampEvent` (an error there undoes the change).

    After ``trainer.fit``: ``ramp`` (the :class:`~batchlab.training.BatchRamp`, its ``events``).
    """

    def __init__(
        self,
        *,
        max_batch: int,
        rule: str | None = None,
        target: float = 1.0,
        growth: float = DEFAULT_GROWTH,
        patience: int = DEFAULT_PATIENCE,
        z: float = DEFAULT_Z,
        min_updates: int = DEFAULT_MIN_UPDATES,
        beta: float = RAMP_BETA,
        measure_every: int = 1,
        on_change: Callable[[RampEvent], Any] | None = None,
    ) -> None:
        # Validated here, before any training starts (the sizes themselves need the micro-batch, at train start).
        check_ramp_settings(max_batch=max_batch, rule=rule, target=target, growth=growth, patience=patience, z=z,
                            min_updates=min_updates, beta=beta, measure_every=measure_every)  # fmt: skip
        self.max_batch = max_batch
        self.options = dict(rule=rule, target=target, growth=growth, patience=patience, z=z,
                            min_updates=min_updates, beta=beta, measure_every=measure_every)  # fmt: skip
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable as on_change(event), got {on_change!r}")
        self.user_on_change = on_change
        self.ramp: BatchRamp | None = None
        self._trainer: Any = None
        self._pending: int | None = None
        self._stepped = False

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("BatchRampCallback needs automatic optimization (Lightning accumulates for it)")
        if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
            raise ValueError(
                "BatchRampCallback sets trainer.accumulate_grad_batches itself: remove the GradientAccumulationScheduler"
            )
        accumulation = trainer.accumulate_grad_batches
        if not isinstance(accumulation, int) or accumulation < 2:
            raise ValueError(
                f"BatchRampCallback measures the noise scale from accumulation micro-batches: set "
                f"Trainer(accumulate_grad_batches>=2), got {accumulation!r} (the dataloader's batch is the micro-batch)"
            )
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            raise ValueError(
                "BatchRampCallback runs on one process (the accumulation collector is not for DDP)"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"BatchRampCallback carries one optimizer's hyper-parameters, got {len(trainer.optimizers)}"
            )
        micro = getattr(trainer.train_dataloader, "batch_size", None)
        if not isinstance(micro, int) or micro < 1:
            raise ValueError(
                "BatchRampCallback needs a training DataLoader with an int batch_size (the micro-batch)"
            )
        self._trainer = trainer
        self.ramp = BatchRamp(
            trainer.optimizers[0],
            [p for p in pl_module.parameters() if p.requires_grad],
            batch_size=micro * trainer.accumulate_grad_batches,
            max_batch=self.max_batch,
            max_micro_batch=micro,
            schedulers=[config.scheduler for config in trainer.lr_scheduler_configs],
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            on_change=self._changed,
            **self.options,
        )

    def _changed(self, event: RampEvent) -> None:
        """Inside the ramp's all-or-nothing change: set the accumulation, undone if the user's callback fails."""
        before = self._trainer.accumulate_grad_batches
        self._trainer.accumulate_grad_batches = event.accumulation
        try:
            if self.user_on_change is not None:
                self.user_on_change(event)
        except BaseException:
            self._trainer.accumulate_grad_batches = before
            raise

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grow_to = self.ramp.observe()
        if grow_to is not None:
            self._pending = max(grow_to, self._pending or 0)
        self._stepped = True

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, None
        self.ramp.apply(pending)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, self._stepped = self._stepped, False
        if (
            stepped
            and self._pending is not None
            and (batch_idx + 1) % (self._pending // self.ramp.micro_batch) == 0
        ):
            self._apply_pending()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:
            self._apply_pending()  # batch 0: every accumulation lines up

    def teardown(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        if self.ramp is not None:
            self.ramp.close()
