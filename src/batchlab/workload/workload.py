"""Workload: one full training step at batch size ``b``, and the state it must leave untouched.

A step is what a real training loop does per optimizer update -- forward, loss, backward, optimizer step --
because every part of it takes memory: the first ``optimizer.step()`` creates Adam's two moments (2x the
parameters), which forward+backward probes (Ultralytics AutoBatch) never see. Mixed precision and gradient
accumulation are part of the step when asked for.

Anything that runs a training step can stand in for a Workload: a plain callable ``step(batch_size)`` (the
escape hatch for any training loop) is wrapped by :func:`as_workload`; pass ``preserve=(model, optimizer)`` to
have its state restored too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from batchlab import checks
from batchlab.errors import WorkloadError
from batchlab.memory import MemoryBreakdown, held_bytes
from batchlab.spec import parse_amp
from batchlab.workload.state import RNGState, StateSnapshot, is_grad_scaler, is_lr_scheduler

Batch = Any  # (inputs, targets) or a dict of model keyword arguments
Shape = int | tuple[int, ...]  # a sequence length, or (h, w) of an image: what varies between batches


def _takes_shape(function: Callable[..., Any]) -> bool:
    """Whether ``function`` accepts a ``shape=`` keyword (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the call itself tell
        return True
    return any(
        p.kind == p.VAR_KEYWORD or (p.name == "shape" and p.kind != p.POSITIONAL_ONLY) for p in parameters
    )


def _check_takes_shape(function: Callable[..., Any], what: str, shape: Shape) -> None:
    if not _takes_shape(function):
        raise TypeError(
            f"shape {shape!r} needs {what}(batch_size, shape=...): this {what} takes no shape parameter"
        )


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _tensor_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += held_bytes(tensor)
    return total


def tensor_bytes_of(
    modules: Sequence[torch.nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> MemoryBreakdown:
    """Bytes held right now by the modules' parameters, buffers and gradients and the optimizers' state."""
    params = [p for module in modules for p in module.parameters()]
    state_tensors = [
        value
        for optimizer in optimizers
        for values in optimizer.state.values()
        for value in values.values()
        if isinstance(value, torch.Tensor)
    ]
    return MemoryBreakdown(
        parameters=_tensor_nbytes(params),
        buffers=_tensor_nbytes(b for module in modules for b in module.buffers()),
        gradients=_tensor_nbytes(p.grad for p in params if p.grad is not None),
        optimizer_state=_tensor_nbytes(state_tensors),
    )


class Workload:
    """One training step of ``model`` on ``make_batch(b)`` with ``loss_fn`` and ``optimizer``.

    Args:
        model: the ``nn.Module`` to train, already on its device; batches are moved to that device.
        make_batch: ``make_batch(b)`` returns a batch of ``b`` samples: ``(inputs, targets)`` -- the loss is
            ``loss_fn(model(inputs), targets)`` -- or a dict of keyword arguments (Hugging Face style), where
            the loss is ``model(**batch).loss`` (or ``loss_fn(output, batch)`` when ``loss_fn`` is given).
        loss_fn: the loss for tuple batches; may be None for dict batches whose output carries ``.loss``.
        optimizer: an ``Optimizer`` over the model's parameters, or a factory ``f(parameters) -> Optimizer``.
        amp: None (fp32), ``"bf16"`` or ``"fp16"``: autocast around forward and loss; fp16 adds a GradScaler.
        grad_accum: micro-batches of size ``b`` per optimizer step; the batch size searched is the micro-batch.
        dataset_size: optional number of samples in the dataset; a search never answers more than this.
        name: a label for reports.
        validation: held-out data a sweep compares its runs on: a batch in the form ``make_batch`` returns
            (its loss is the validation loss) or a function ``model -> {"loss": ...}``; the other commands
            ignore it (see :mod:`batchlab.sweeps.workload_run`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make_batch: Callable[[int], Batch],
        loss_fn: Callable[..., torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        *,
        amp: str | None = None,
        grad_accum: int = 1,
        dataset_size: int | None = None,
        name: str | None = None,
        validation: Any = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Workload model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(make_batch):
            raise TypeError(
                f"Workload make_batch must be callable as make_batch(batch_size), got {make_batch!r}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Workload loss_fn must be callable or None, got {loss_fn!r}")
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        elif callable(optimizer):
            self.optimizer = optimizer(model.parameters())
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"Workload optimizer factory returned {type(self.optimizer).__name__}, not a torch.optim.Optimizer"
                )
        else:
            raise TypeError(
                "Workload optimizer must be a torch.optim.Optimizer or a factory such as "
                f"lambda params: torch.optim.AdamW(params, lr=1e-3); got {optimizer!r}"
            )
        checks.integer("grad_accum", grad_accum)
        checks.integer("dataset_size", dataset_size, none=True)
        self.model = model
        self.make_batch = make_batch
        self.loss_fn = loss_fn
        self.amp = parse_amp(amp)
        self.grad_accum = grad_accum
        self.dataset_size = dataset_size
        self.name = name or type(model).__name__
        self.validation = validation
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None
        self.shape: Shape | None = None  # set on the copies with_shape makes

    def with_shape(self, shape: Shape) -> Workload:
        """The same step on batches of one ``shape``: ``make_batch(b)`` calls ``make_batch(b, shape=shape)``.

        A workload says how its batches' shape varies by giving ``make_batch`` a ``shape`` keyword -- a sequence
        length (int) or an image's ``(h, w)`` -- which the shape search (``find_batch_size(..., shapes=...)``)
        passes and every other command leaves at its default. The copy shares this workload's model,
        optimizer and data. One batch of one sample is built here (the random state restored after it), so a
        shape the workload cannot build fails now, in one line naming it, rather than in the middle of a search.
        """
        shape = checks.shape("shape", shape)
        _check_takes_shape(self.make_batch, "make_batch", shape)
        rng = RNGState.capture()  # building the trial batch must not move the user's random streams
        try:
            self.make_batch(1, shape=shape)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"the workload cannot build shape {shape!r}: make_batch(1, shape={shape!r}) raised "
                f"{type(exc).__name__}{': ' + reason if reason else ''}"
            ) from exc
        finally:
            rng.restore()
        shaped = Workload(self.model, functools.partial(self.make_batch, shape=shape), self.loss_fn,
                          self.optimizer, amp=self.amp, grad_accum=self.grad_accum,
                          dataset_size=self.dataset_size, name=f"{self.name} shape={shape}",
                          validation=self.validation)  # fmt: skip
        shaped.shape = shape
        return shaped

    def with_amp(self, amp: str | None) -> Workload:
        """The same step under another precision, sharing this workload's model, optimizer and data."""
        if parse_amp(amp) == self.amp:
            return self
        copy = Workload(self.model, self.make_batch, self.loss_fn, self.optimizer, amp=amp,
                        grad_accum=self.grad_accum, dataset_size=self.dataset_size, name=self.name,
                        validation=self.validation)  # fmt: skip
        copy.shape = self.shape
        return copy

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (or buffer); CPU for a model with neither."""
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    # The step in public pieces, so code that needs to act between them (a noise-scale collector, a guard)
    # runs exactly the step batchlab measures: begin_step, then per micro-batch next_batch -> loss -> backward,
    # then finish_step.

    def begin_step(self) -> None:
        """Put the model in training mode and drop the previous step's gradients (``set_to_none``)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)

    def next_batch(self, batch_size: int) -> Batch:
        """``make_batch(batch_size)``, moved to the model's device."""
        return _to_device(self.make_batch(batch_size), self.device)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one batch (already on the device), under the workload's autocast when ``amp`` is set."""
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp is not None):
            return self._loss(batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, scaled by the GradScaler under fp16."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def finish_step(self) -> None:
        """The optimizer step (through the GradScaler under fp16, which skips non-finite steps)."""
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def step(self, batch_size: int) -> torch.Tensor:
        """Run one optimizer step on ``grad_accum`` micro-batches of ``batch_size``; return the detached loss."""
        self.begin_step()
        total = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum):
            loss = self.loss(self.next_batch(batch_size)) / self.grad_accum
            self.backward(loss)
            total += loss.detach()
            del loss  # free this micro-batch's activations before the next one is built
        self.finish_step()
        return total

    def _loss(self, batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            output = self.model(**batch)
            if self.loss_fn is not None:
                return self.loss_fn(output, batch)
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if loss is None:
                raise WorkloadError("dict batch: the model output has no .loss; pass loss_fn(output, batch)")
            return loss
        if isinstance(batch, Sequence) and len(batch) == 2:
            inputs, targets = batch
            if self.loss_fn is None:
                raise WorkloadError("(inputs, targets) batches need a loss_fn(outputs, targets)")
            outputs = self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)
            return self.loss_fn(outputs, targets)
        raise WorkloadError(
            f"make_batch returned {type(batch).__name__}; expected (inputs, targets) or a dict of model kwargs"
        )

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    @property
    def scalers(self) -> list[torch.amp.GradScaler]:
        return [self.scaler] if self.scaler else []

    def snapshot_bytes(self) -> int:
        """Bytes :meth:`snapshot` would copy (trainable parameters, buffers, gradients, optimizer state)."""
        return StateSnapshot.copy_bytes([self.model], [self.optimizer])

    def snapshot(self, directory: str | None = None) -> StateSnapshot:
        """Capture model, optimizer, GradScaler and RNG state, to be restored after every probe.

        ``directory``: keep the copy in files there instead of RAM (see :func:`batchlab.workload.state.copy_storage`).
        """
        return StateSnapshot.capture([self.model], [self.optimizer], self.scalers, directory=directory)

    def tensor_bytes(self) -> MemoryBreakdown:
        """Bytes held right now by the model's parameters, buffers, gradients and the optimizer's state."""
        return tensor_bytes_of([self.model], [self.optimizer])

    def __repr__(self) -> str:
        return f"Workload({self.name}, amp={self.amp}, grad_accum={self.grad_accum}, dataset_size={self.dataset_size})"


class StepFunction:
    """Adapter that lets any callable ``step(batch_size)`` be searched like a :class:`Workload`.

    batchlab cannot see inside a plain callable, so it restores only what ``preserve`` names -- modules,
    optimizers, GradScalers and LR schedulers -- plus the global RNGs always; memory is reported as a whole,
    not split by kind unless ``tensor_bytes`` says what the model and optimizer hold (e.g.
    ``lambda: tensor_bytes_of([model], [optimizer])``). Pass the step's GradScaler: a probe step it skips (fp16 overflow) then still creates
    the optimizer state (:mod:`batchlab.workload.skipped_steps`), and its scale is restored.
    """

    amp = None
    grad_accum = 1

    def __init__(
        self,
        step: Callable[[int], Any],
        *,
        preserve: Sequence[Any] = (),
        dataset_size: int | None = None,
        name: str | None = None,
        tensor_bytes: Callable[[], MemoryBreakdown] | None = None,
    ):
        if not callable(step):
            raise TypeError(f"expected a Workload or a callable step(batch_size), got {step!r}")
        self._step = step
        self._modules = [obj for obj in preserve if isinstance(obj, torch.nn.Module)]
        self._optimizers = [obj for obj in preserve if isinstance(obj, torch.optim.Optimizer)]
        self._extra = [obj for obj in preserve if is_grad_scaler(obj) or is_lr_scheduler(obj)]
        known = self._modules + self._optimizers + self._extra
        unknown = [obj for obj in preserve if not any(obj is k for k in known)]
        if unknown:
            raise TypeError(
                "preserve accepts nn.Module, Optimizer, GradScaler and LR scheduler objects, got "
                f"{', '.join(type(obj).__name__ for obj in unknown)}"
            )
        self.dataset_size = dataset_size
        self.name = name or getattr(step, "__name__", type(step).__name__)
        self._tensor_bytes = tensor_bytes
        self.preserve = tuple(preserve)
        self.shape: Shape | None = None  # set on the copies with_shape makes

    def with_shape(self, shape: Shape) -> StepFunction:
        """The same step on batches of one ``shape``: ``step(b)`` calls ``step(b, shape=shape)`` (see
        :meth:`Workload.with_shape`); the copy restores the same ``preserve`` objects."""
        shape = checks.shape("shape", shape)
        _check_takes_shape(self._step, "step", shape)
        shaped = StepFunction(functools.partial(self._step, shape=shape), preserve=self.preserve,
                              dataset_size=self.dataset_size, name=f"{self.name} shape={shape}",
                              tensor_bytes=self._tensor_bytes)  # fmt: skip
        shaped.shape = shape
        return shaped

    def step(self, batch_size: int) -> Any:
        return self._step(batch_size)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers)

    @property
    def scalers(self) -> list[torch.amp.GradScaler]:
        return [obj for obj in self._extra if is_grad_scaler(obj)]

    def snapshot_bytes(self) -> int:
        return StateSnapshot.copy_bytes(self._modules, self._optimizers)

    def snapshot(self, directory: str | None = None) -> StateSnapshot:
        return StateSnapshot.capture(self._modules, self._optimizers, self._extra, directory=directory)

    def tensor_bytes(self) -> MemoryBreakdown | None:
        return self._tensor_bytes() if self._tensor_bytes is not None else None  # else out of sight


def as_workload(
    obj: Workload | StepFunction | Callable[[int], Any], *, preserve: Sequence[Any] = ()
) -> Workload | StepFunction:
    """Return ``obj`` as something with ``step``, ``snapshot`` and ``tensor_bytes``: a Workload as is, a callable wrapped."""
    if isinstance(obj, (Workload, StepFunction)):
        if preserve:
            raise TypeError(
                "preserve= applies to a plain step callable; a Workload already restores its own state"
            )
        return obj
    return StepFunction(obj, preserve=preserve)
