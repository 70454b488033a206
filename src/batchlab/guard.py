"""OOMGuard: survive an out-of-memory error mid-training without changing what is trained.

A training step over one batch runs as micro-batches with gradient accumulation. When a micro-batch runs out
of memory (recognised by :func:`batchlab.is_out_of_memory`; anything else propagates unchanged), the guard
discards the partial gradients of that step, halves the micro-batch and raises the accumulation so that
``micro x accumulation`` -- the effective batch -- is unchanged (:func:`batchlab.scaling.plan_batch` keeps it
exact when the halving is not), and runs the *same* batch again. The optimizer steps once per batch whatever
happened, so the learning rate, the schedule and the number of steps are those of a run that used the smaller
micro-batch from the start; the guard logs one line per change and records it in ``events``. Composer does this
on GPU (``device_train_microbatch_size="auto"``); the guard is a plain object, used the same on CPU and GPU::

    guard = OOMGuard(optimizer, batch_size=256)                  # one optimizer step per 256 samples
    for inputs, targets in loader:                               # batches of 256
        loss = guard.step((inputs, targets), lambda b: F.cross_entropy(model(b[0]), b[1]))
        scheduler.step()

``loss_fn(micro_batch)`` returns the micro-batch's loss, *mean*-reduced by default: the guard weights it by the
micro-batch's share of the batch, so the accumulated gradient is the gradient of the whole batch's mean loss
(``reduction="sum"`` adds sum-reduced losses unweighted). Batches are tensors, tuples/lists or dicts of tensors
split along dimension 0; anything else in them is passed to every micro-batch unchanged.

Hooks for frameworks: ``backward`` replaces ``loss.backward()`` (Lightning's ``self.manual_backward``,
Accelerate's ``accelerator.backward``), ``scaler`` is a GradScaler, ``before_optimizer_step`` runs after the
last backward (gradient clipping: unscale first when a scaler is used), and ``no_sync`` -- e.g.
``ddp_model.no_sync`` -- skips DDP's all-reduce on all but the last micro-batch.

Limits: an out-of-memory error inside ``optimizer.step()`` is re-raised, not retried (a partly applied update
cannot be undone). Under DDP an OOM on one rank is not communicated to the others, whose all-reduce would wait:
use the guard per process without DDP's gradient hooks, or agree on the micro-batch up front
(:func:`batchlab.integrations.ddp.find_batch_size_distributed`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchlab.oom import is_out_of_memory
from batchlab.scaling import plan_batch

log = logging.getLogger("batchlab")

__all__ = ["GuardEvent", "OOMGuard"]

_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class GuardEvent:
    """One recovery: at optimizer step ``step`` (0-based), the micro-batch went from ``micro_before`` x
    ``accumulation_before`` to ``micro_after`` x ``accumulation_after``; the effective batch is unchanged."""

    step: int
    micro_before: int
    accumulation_before: int
    micro_after: int
    accumulation_after: int
    effective_batch: int
    error: str

    def message(self) -> str:
        return (
            f"out of memory at step {self.step} with micro-batch {self.micro_before} x {self.accumulation_before}: "
            f"retrying the same step as {self.micro_after} x {self.accumulation_after} "
            f"(effective batch {self.effective_batch} unchanged) [{self.error}]"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for value in values:
        length = _batch_len(value)
        if length is not None:
            return length
    return None


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: _slice(value, start, stop) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice(value, start, stop) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(value, start, stop) for value in batch)
    return batch


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name} {value!r}: expected a positive int")
    return value


class OOMGuard:
    """Run optimizer steps as accumulated micro-batches; on an out-of-memory error, halve and retry the step.

    Args:
        optimizer: anything with ``step()`` and ``zero_grad()`` (a torch optimizer, Lightning's optimizer).
        batch_size: the samples per optimizer step on this process (the effective batch to keep).
        micro_batch: the micro-batch to start with (default ``batch_size``: no accumulation), e.g. the answer
            of :func:`batchlab.find_batch_size`; split exactly with :func:`~batchlab.scaling.plan_batch`.
        min_micro_batch: below this the guard gives up and re-raises the out-of-memory error.
        reduction: ``"mean"`` (``loss_fn`` returns a mean over its micro-batch) or ``"sum"``.
        scaler, backward, before_optimizer_step, no_sync: see the module docstring.
        on_event: called with each :class:`GuardEvent` (after it is logged).
    """

    def __init__(
        self,
        optimizer: Any,
        batch_size: int,
        *,
        micro_batch: int | None = None,
        min_micro_batch: int = 1,
        reduction: str = "mean",
        scaler: Any = None,
        backward: Callable[[torch.Tensor], Any] | None = None,
        before_optimizer_step: Callable[[], Any] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        on_event: Callable[[GuardEvent], Any] | None = None,
    ):
        if not (
            callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))
        ):
            raise TypeError(f"OOMGuard needs an optimizer with step() and zero_grad(), got {optimizer!r}")
        self.batch_size = _check_int("batch_size", batch_size)
        micro = _check_int("micro_batch", micro_batch if micro_batch is not None else batch_size)
        self.min_micro_batch = _check_int("min_micro_batch", min_micro_batch)
        if micro < self.min_micro_batch:
            raise ValueError(f"micro_batch {micro} is below min_micro_batch {self.min_micro_batch}")
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"invalid reduction {reduction!r}: expected one of {', '.join(map(repr, _REDUCTIONS))}"
            )
        plan = plan_batch(self.batch_size, min(micro, self.batch_size))
        self.micro_batch, self.accumulation = plan.micro_batch, plan.accumulation_steps
        self.optimizer = optimizer
        self.reduction = reduction
        self.scaler = scaler
        self.backward = backward
        self.before_optimizer_step = before_optimizer_step
        self.no_sync = no_sync
        self.on_event = on_event
        self.steps = 0  # optimizer steps taken
        self.events: list[GuardEvent] = []

    @property
    def effective_batch(self) -> int:
        """``micro_batch x accumulation``: always ``batch_size``."""
        return self.micro_batch * self.accumulation

    def _backward(self, loss: torch.Tensor) -> None:
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        if self.backward is not None:
            self.backward(scaled)
        else:
            scaled.backward()

    def _accumulate(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """Forward and backward over every micro-batch of ``batch``; return the batch's loss (detached)."""
        length = _batch_len(batch)
        if length is None:
            raise TypeError(
                f"OOMGuard cannot find a batch dimension in {type(batch).__name__}: pass a tensor, or a "
                "tuple/list/dict of tensors"
            )
        starts = list(range(0, length, self.micro_batch))
        total = None
        for index, start in enumerate(starts):
            chunk = _slice(batch, start, min(start + self.micro_batch, length))
            last = index == len(starts) - 1
            sync = self.no_sync() if (self.no_sync is not None and not last) else contextlib.nullcontext()
            with sync:
                loss = loss_fn(chunk)
                if self.reduction == "mean":
                    loss = loss * (min(start + self.micro_batch, length) - start) / length
                self._backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
            del chunk, loss  # this micro-batch's activations go before the next one is built
        return total

    def _shrink(self, error: str) -> None:
        before = (self.micro_batch, self.accumulation)
        plan = plan_batch(self.batch_size, max(self.micro_batch // 2, self.min_micro_batch))
        self.micro_batch, self.accumulation = plan.micro_batch, plan.accumulation_steps
        event = GuardEvent(
            self.steps, *before, self.micro_batch, self.accumulation, self.effective_batch, error
        )
        self.events.append(event)
        log.warning("batchlab OOMGuard: %s", event.message())
        if self.on_event is not None:
            self.on_event(event)

    def step(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """One optimizer step over ``batch``, retried at smaller micro-batches until it fits; returns the loss.

        The returned loss is the batch's (mean-reduced: the mean over the batch), detached.
        """
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            error = None
            try:
                loss = self._accumulate(batch, loss_fn)
            except Exception as exc:
                if not is_out_of_memory(exc) or self.micro_batch <= self.min_micro_batch:
                    raise
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if error is None:
                break
            # Outside the except block: the exception's traceback held the failed micro-batch's tensors.
            # A half-accumulated gradient must not leak into the retry.
            self.optimizer.zero_grad(set_to_none=True)
            _release()
            self._shrink(error)
        if self.before_optimizer_step is not None:
            self.before_optimizer_step()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss
