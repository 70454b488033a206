"""OOMGuard: survive an out-of-memory error mid-training without changing what is trained.

A training step over one batch runs as micro-batches with gradient accumulation. When a micro-batch runs out
of memory (recognised by :func:`batchlab.devices.oom.is_out_of_memory`; anything else propagates unchanged), the guard
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
    logits = guard.evaluate(val_inputs, model)                   # split on OOM; training micro-batch kept

``loss_fn(micro_batch)`` returns the micro-batch's loss, *mean*-reduced by default: the guard weights it by the
micro-batch's share of the batch, so the accumulated gradient is the gradient of the whole batch's mean loss
(``reduction="sum"`` adds sum-reduced losses unweighted). Batches are tensors, tuples/lists or dicts of tensors
split along dimension 0; anything else in them is passed to every micro-batch unchanged.

Every recovery frees memory the same way, after leaving the ``except`` block:
:func:`batchlab.devices.release.release_after_oom` on the optimizer's devices (a failed backward's graph --
pytorch#82218 --, reference cycles, the CUDA cache), the path the search and the Accelerate drop-in use too.

**The optimizer step.** An out-of-memory error inside ``optimizer.step()`` -- Adam creates its two moments (2x
the parameters) in its first step, foreach implementations allocate parameter-sized temporaries in every step
-- is retried once, after the release, only when the guard can prove the step applied nothing:

- *Why not always:* a partly applied update cannot be undone without a copy of the parameters and the optimizer
  state -- the memory that just ran out -- and torch.optim does apply partially: foreach Adam/AdamW bump the
  step counters, decay the parameters (AdamW) and update both moments in place before allocating the square
  root that may run out; the single-tensor loop updates one parameter after another; a fused kernel updates a
  whole group.
- *The proof,* for exactly the torch.optim classes SGD, Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, Adadelta,
  RMSprop, Rprop and ASGD (or one held as ``.optimizer`` by Lightning's or Accelerate's wrapper): their steps
  write parameters and state only in place, which bumps each tensor's version counter; their fused kernels
  write without bumping it (measured, torch 2.14) but run only after the group's ``step`` counters were bumped
  (Adam, AdamW, Adagrad; a fused SGD leaves no trace and is not retried). The error must come after the
  optimizer's own step began (a step pre-hook tells): before it, a GradScaler's ``unscale_`` changes the
  gradients without bumping their versions either. If it began, no version moved, no state tensor was replaced
  and the state entries it created are untouched, nothing was applied: the created state is dropped -- the
  optimizer is exactly as before -- and the step runs again (a GradScaler remembers its completed unscale and
  does not repeat it).
- *In practice* that is an error while the first step creates the state. An error after the update began is
  re-raised, with a note on the exception that says why.
- *Once:* the retry needs what the failed try needed, so it succeeds only on what the release freed (a failed
  backward's graph, garbage cycles, cache that cuBLAS or NCCL could not get, another process finishing); a
  second release would free nothing more. A retry that fails is re-raised, the optimizer again as before the
  step. Shrinking the micro-batch would not help: the activations are gone by the time the optimizer steps.

**Evaluation.** :meth:`OOMGuard.evaluate` runs a function over an evaluation batch under ``torch.no_grad()``
and, on an out-of-memory error, halves the evaluation chunk -- never the training micro-batch: an evaluation
runs out of memory for reasons of its own (a larger evaluation batch, longer inputs), and shrinking training
for it changes the run for nothing (transformers #32215, where it does exactly that).

Hooks for frameworks: ``backward`` replaces ``loss.backward()`` (Lightning's ``self.manual_backward``,
Accelerate's ``accelerator.backward``), ``scaler`` is a GradScaler, ``before_optimizer_step`` runs after the
last backward (gradient clipping: unscale first when a scaler is used), and ``no_sync`` -- e.g.
``ddp_model.no_sync`` -- skips DDP's all-reduce on all but the last micro-batch.

Limits: an out-of-memory error in ``before_optimizer_step`` propagates.

**Under torchrun (DDP, FSDP2).** With a process group of more than one rank initialised, an out-of-memory
error on one rank is every rank's news: the ranks exchange a status after each try of the step's micro-batches
and after the optimizer step (:mod:`batchlab.devices.agreement`), and with ``model=`` also at sync points before
the forward and backward of the model and of each FSDP-sharded module in it, so a rank still inside the step
leaves it at its next sync point instead of waiting in a collective the failed rank never reaches. Then every
rank discards the step's gradients, halves the micro-batch and retries the same batch together, in the same
collective order; an error that is not an out-of-memory on any rank (or an out-of-memory at
``min_micro_batch``) makes every rank raise -- its own error on that rank, :class:`~batchlab.BatchlabError`
naming it on the others. Every rank keeps the same micro-batch and accumulation (gradient averaging assumes
it). Each try runs under ``collective_timeout`` (seconds; :data:`batchlab.defaults.COLLECTIVE_TIMEOUT_S`):
a failure where no sync point reaches the other ranks -- inside a collective they already wait in -- makes
every rank raise :class:`~batchlab.errors.ProcessGroupFailedError` within it, naming what each raised (the
group is unusable after a timeout). Without a process group nothing of this runs: no collective, the
single-process path as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchlab import checks
from batchlab.advice.scaling import plan_batch
from batchlab.defaults import COLLECTIVE_TIMEOUT_S
from batchlab.devices.agreement import (
    DONE,
    ERROR,
    OUT_OF_MEMORY,
    PEER,
    StepAgreement,
    Verdict,
    account,
    reset_after_failure,
    sync_points,
)
from batchlab.devices.oom import is_out_of_memory
from batchlab.devices.ranks import Ranks, collective_timeout, current_ranks
from batchlab.devices.release import devices_of, release_after_oom
from batchlab.errors import BatchlabError, PeerFailureError
from batchlab.training.batches import batch_len, concat, evaluate_chunks, slice_batch
from batchlab.training.optimizer_step import StepRecord

log = logging.getLogger("batchlab")

__all__ = ["GuardEvent", "OOMGuard"]

_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class GuardEvent:
    """One recovery at optimizer step ``step`` (0-based), in ``phase``:

    - ``"train"``: the micro-batch went from ``micro_before`` x ``accumulation_before`` to ``micro_after`` x
      ``accumulation_after``; the effective batch ``effective_batch`` is unchanged.
    - ``"optimizer"``: ``optimizer.step()`` ran out of memory before applying anything and was retried once;
      the micro-batch is unchanged.
    - ``"evaluate"``: an evaluation of ``effective_batch`` samples in chunks of ``micro_before``
      (``accumulation_before`` chunks) is retried in chunks of ``micro_after``; the training micro-batch is
      unchanged.
    """

    step: int
    micro_before: int
    accumulation_before: int
    micro_after: int
    accumulation_after: int
    effective_batch: int
    error: str
    phase: str = "train"

    def message(self) -> str:
        if self.phase == "optimizer":
            return (
                f"out of memory in optimizer.step() at step {self.step}, before anything was applied: "
                f"memory released, retrying the step once [{self.error}]"
            )
        if self.phase == "evaluate":
            return (
                f"out of memory evaluating {self.effective_batch} samples in chunks of {self.micro_before}: "
                f"retrying in chunks of {self.micro_after} (training micro-batch unchanged) [{self.error}]"
            )
        return (
            f"out of memory at step {self.step} with micro-batch {self.micro_before} x {self.accumulation_before}: "
            f"retrying the same step as {self.micro_after} x {self.accumulation_after} "
            f"(effective batch {self.effective_batch} unchanged) [{self.error}]"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _note(exc: BaseException, text: str) -> None:
    """Say why an out-of-memory error was not retried: a note on the exception (Python >= 3.11) and a log line."""
    log.warning("batchlab OOMGuard: %s", text)
    if hasattr(exc, "add_note"):
        exc.add_note(f"batchlab OOMGuard: {text}")


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
        model: under torchrun, the model (DDP- or FSDP-wrapped) whose forward and backward get sync points
            (module docstring); without it the ranks agree only at the end of each try.
        group: the process group the ranks agree in (default: the world, when one is initialised).
        collective_timeout: under torchrun, the seconds any collective of a try may wait (None: the group's
            own timeout, 30 min for gloo by default).

    ``micro_batch`` x ``accumulation`` is the current training split; ``eval_micro_batch`` the evaluation
    chunk (None until an evaluation ran out of memory: whole batches); ``events`` every recovery.
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
        model: torch.nn.Module | None = None,
        group: Any = None,
        collective_timeout: float | None = COLLECTIVE_TIMEOUT_S,
    ):
        if not (
            callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))
        ):
            raise TypeError(f"OOMGuard needs an optimizer with step() and zero_grad(), got {optimizer!r}")
        self.batch_size = checks.integer("batch_size", batch_size)
        micro = checks.integer("micro_batch", micro_batch if micro_batch is not None else batch_size)
        self.min_micro_batch = checks.integer("min_micro_batch", min_micro_batch)
        if micro < self.min_micro_batch:
            raise ValueError(f"micro_batch {micro} is below min_micro_batch {self.min_micro_batch}")
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"invalid reduction {reduction!r}: expected one of {', '.join(map(repr, _REDUCTIONS))}"
            )
        plan = plan_batch(self.batch_size, min(micro, self.batch_size))
        self.micro_batch, self.accumulation = plan.micro_batch, plan.accumulation_steps
        self.eval_micro_batch: int | None = None
        self.optimizer = optimizer
        self.reduction = reduction
        self.scaler = scaler
        self.backward = backward
        self.before_optimizer_step = before_optimizer_step
        self.no_sync = no_sync
        self.on_event = on_event
        self.model = model
        self.collective_timeout = collective_timeout
        ranks = current_ranks(group)
        self.ranks: Ranks | None = ranks if ranks is not None and ranks.world_size > 1 else None
        self.steps = 0  # optimizer steps taken
        self.events: list[GuardEvent] = []

    @property
    def effective_batch(self) -> int:
        """``micro_batch x accumulation``: always ``batch_size``."""
        return self.micro_batch * self.accumulation

    def _release(self) -> None:
        release_after_oom(*devices_of(self.optimizer))

    def _record(self, event: GuardEvent) -> None:
        self.events.append(event)
        log.warning("batchlab OOMGuard: %s", event.message())
        if self.on_event is not None:
            self.on_event(event)

    def _backward(self, loss: torch.Tensor) -> None:
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        if self.backward is not None:
            self.backward(scaled)
        else:
            scaled.backward()

    def _accumulate(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """Forward and backward over every micro-batch of ``batch``; return the batch's loss (detached)."""
        length = batch_len(batch)
        if length is None:
            raise TypeError(
                f"OOMGuard cannot find a batch dimension in {type(batch).__name__}: pass a tensor, or a "
                "tuple/list/dict of tensors"
            )
        starts = list(range(0, length, self.micro_batch))
        total = None
        for index, start in enumerate(starts):
            chunk = slice_batch(batch, start, min(start + self.micro_batch, length))
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
        self._record(
            GuardEvent(self.steps, *before, self.micro_batch, self.accumulation, self.effective_batch, error)
        )

    def _apply_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()

    def _optimizer_step(self) -> None:
        """``optimizer.step()``, retried once after the release when it ran out of memory having applied
        nothing (module docstring); otherwise its error is re-raised with a note saying why."""
        for attempt in range(2):
            record = StepRecord(self.optimizer)
            error = None
            try:
                self._apply_step()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                why = record.applied()
                where = f"out of memory in optimizer.step() at step {self.steps}"
                if why is not None:
                    _note(exc, f"{where}, not retried: {why}")
                    raise
                record.drop_created_state()
                if attempt == 1:
                    _note(
                        exc,
                        f"{where} again after releasing memory; nothing was applied, the optimizer is as before",
                    )
                    raise
                error = _first_line(exc)
            finally:
                record.close()
            if error is None:
                return
            self._release()
            self._record(
                GuardEvent(
                    self.steps,
                    self.micro_batch,
                    self.accumulation,
                    self.micro_batch,
                    self.accumulation,
                    self.effective_batch,
                    error,
                    "optimizer",
                )
            )

    def step(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """One optimizer step over ``batch``, retried at smaller micro-batches until it fits; returns the loss.

        The returned loss is the batch's (mean-reduced: the mean over the batch), detached. An out-of-memory
        error in ``optimizer.step()`` itself is retried only as the module docstring says.
        """
        if self.ranks is not None:
            return self._step_together(batch, loss_fn)
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            error = None
            try:
                loss = self._accumulate(batch, loss_fn)
            except Exception as exc:
                if not is_out_of_memory(exc) or self.micro_batch <= self.min_micro_batch:
                    raise
                error = _first_line(exc)
            if error is None:
                break
            # Outside the except block: the exception's traceback held the failed micro-batch's tensors.
            # A half-accumulated gradient must not leak into the retry.
            self.optimizer.zero_grad(set_to_none=True)
            self._release()
            self._shrink(error)
        self._finish_step()
        return loss

    def _finish_step(self) -> None:
        if self.before_optimizer_step is not None:
            self.before_optimizer_step()
        self._optimizer_step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def _agree(
        self, run: Callable[[], Any], *, can_shrink: bool, sync: bool
    ) -> tuple[Any, Verdict, str | None]:
        """Run ``run()`` as one try every rank settles together; return its value, the shared verdict and this
        rank's own out-of-memory message (``sync``: with sync points in the model). This rank's own non-OOM error (or an OOM it cannot step back from) is
        re-raised once every rank knows; another rank's error raises :class:`BatchlabError` naming it."""
        agreement = StepAgreement.among(self.ranks, f"OOMGuard step {self.steps}", self.collective_timeout)
        value, own_error, message = None, None, None
        with collective_timeout(self.collective_timeout, self.ranks.group):
            with sync_points([self.model] if sync and self.model is not None else [], agreement):
                try:
                    value = run()
                    code = DONE
                except PeerFailureError:
                    code = PEER
                except Exception as exc:  # settled below, with every rank
                    if is_out_of_memory(exc) and can_shrink:
                        code, message = OUT_OF_MEMORY, _first_line(exc)
                    else:
                        code, own_error = ERROR, exc
            verdict = agreement.finish(code, account(code, own_error or message))
        if verdict.error_ranks:
            if own_error is not None:
                raise own_error
            raise BatchlabError(
                f"OOMGuard step {self.steps}: rank(s) {verdict.error_ranks} raised; every rank stops (see that "
                "rank's log for its error)"
            )
        return value, verdict, message

    def _step_together(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """:meth:`step` on every rank at once: every try's outcome is settled with all ranks (module docstring)."""
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            loss, verdict, message = self._agree(
                lambda: self._accumulate(batch, loss_fn),
                can_shrink=self.micro_batch > self.min_micro_batch,
                sync=True,
            )
            if verdict.ok:
                break
            # Outside any except block; every rank is here, with the same verdict, and retries together.
            if self.model is not None:
                reset_after_failure([self.model])
            self.optimizer.zero_grad(set_to_none=True)
            self._release()
            self._shrink(message or f"out of memory on rank(s) {verdict.oom_ranks}")
        self._agree(self._finish_step, can_shrink=False, sync=False)
        return loss

    def evaluate(self, batch: Any, fn: Callable[[Any], Any]) -> Any:
        """``fn(batch)`` under ``torch.no_grad()``, in chunks small enough to fit; returns what ``fn(batch)``
        would: its per-sample outputs (a tensor, or a tuple/list/dict of tensors, with the batch along
        dimension 0), the chunks' outputs concatenated.

        The first try is the whole batch (or the chunk that last fitted, ``eval_micro_batch``); each
        out-of-memory error halves the chunk, down to 1, after which it is re-raised. The training micro-batch
        never changes for an evaluation (transformers #32215). ``fn`` must return per-sample values -- a
        mean over a chunk is not a mean over the batch -- so a loss is ``reduction="none"``, reduced after.
        """
        length = batch_len(batch)
        if length is None:
            raise TypeError(
                f"OOMGuard.evaluate cannot find a batch dimension in {type(batch).__name__}: pass a tensor, or a "
                "tuple/list/dict of tensors"
            )
        while True:
            chunk = min(self.eval_micro_batch or length, length)
            try:
                return concat(evaluate_chunks(batch, fn, length, chunk))
            except Exception as exc:
                if not is_out_of_memory(exc) or chunk <= 1:
                    raise
                error = _first_line(exc)
            # Outside the except block, whose traceback held the chunks evaluated so far (they are evaluated
            # again) and the failed chunk's tensors.
            self._release()
            self.eval_micro_batch = chunk // 2
            self._record(
                GuardEvent(
                    self.steps,
                    chunk,
                    math.ceil(length / chunk),
                    self.eval_micro_batch,
                    math.ceil(length / self.eval_micro_batch),
                    length,
                    error,
                    "evaluate",
                )
            )
