"""Take and restore everything a training step changes, bitwise.

A probe runs real training steps: the optimizer moves the weights, Adam creates its moments, BatchNorm
updates its running statistics, ``make_batch`` draws from the RNG. :class:`StateSnapshot` records all of it
before the first probe and puts it back after every probe, so the search never trains the user's model and
every probe starts from the state the user's own first step will start from (no optimizer state yet, if
there was none) -- which is why the optimizer state's creation is counted in every measured peak.

Parameters keep their identity (values are copied back in place), so the optimizer, hooks and anything
else holding a reference to them stay valid. Copies are kept on the CPU so that a CUDA search does not spend
GPU memory on its own bookkeeping.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class _SavedTensor:
    """A tensor's values copied to the CPU, with the device to put them back on."""

    values: torch.Tensor
    device: torch.device


def _save(value: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (values only; no autograd history)."""
    if isinstance(value, torch.Tensor):
        return _SavedTensor(value.detach().to("cpu", copy=True), value.device)
    if isinstance(value, dict):
        return {key: _save(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_save(item) for item in value)
    return copy.deepcopy(value)


def _load(saved: Any) -> Any:
    """A fresh live copy of something :func:`_save` produced, each tensor back on its own device."""
    if isinstance(saved, _SavedTensor):
        return saved.values.to(saved.device, copy=True)
    if isinstance(saved, dict):
        return {key: _load(item) for key, item in saved.items()}
    if isinstance(saved, (list, tuple)):
        return type(saved)(_load(item) for item in saved)
    return copy.deepcopy(saved)


def _saved_nbytes(saved: Any) -> int:
    if isinstance(saved, _SavedTensor):
        return saved.values.numel() * saved.values.element_size()
    if isinstance(saved, torch.Tensor):
        return saved.numel() * saved.element_size()
    if isinstance(saved, dict):
        return sum(_saved_nbytes(item) for item in saved.values())
    if isinstance(saved, (list, tuple)):
        return sum(_saved_nbytes(item) for item in saved)
    return 0


@dataclass
class RNGState:
    """The global random states a step may draw from: Python, NumPy, torch CPU and every CUDA device."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RNGState:
        cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)


@dataclass
class StateSnapshot:
    """A copy of a model's and optimizer's state (and the RNGs), restorable any number of times.

    Use :meth:`capture` to take one and :meth:`restore` to put it back; ``nbytes`` says how much host memory
    the copy holds (on a CPU search it sits in the measured process, so it is reported, not hidden).
    """

    modules: list[torch.nn.Module] = field(default_factory=list)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    extra: list[Any] = field(
        default_factory=list
    )  # objects with state_dict()/load_state_dict(), e.g. GradScaler
    _tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _grads: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list, repr=False)
    _training: list[tuple[torch.nn.Module, bool]] = field(default_factory=list, repr=False)
    _optimizer_states: list[tuple[dict, list[dict]]] = field(default_factory=list, repr=False)
    _extra_states: list[Any] = field(default_factory=list, repr=False)
    _rng: RNGState | None = field(default=None, repr=False)

    @classmethod
    def capture(
        cls,
        modules: list[torch.nn.Module] | tuple = (),
        optimizers: list[torch.optim.Optimizer] | tuple = (),
        extra: list[Any] | tuple = (),
    ) -> StateSnapshot:
        snap = cls(list(modules), list(optimizers), list(extra))
        seen: set[int] = set()
        for module in snap.modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                if id(tensor) in seen:  # tied weights are stored once
                    continue
                seen.add(id(tensor))
                snap._tensors.append((tensor, tensor.detach().to("cpu", copy=True)))
                if isinstance(tensor, torch.nn.Parameter):
                    grad = tensor.grad
                    snap._grads.append((tensor, None if grad is None else grad.detach().to("cpu", copy=True)))
            snap._training.extend((sub, sub.training) for sub in module.modules())
        for optimizer in snap.optimizers:
            state = {param: _save(values) for param, values in optimizer.state.items()}
            groups = [
                {key: _save(val) for key, val in group.items() if key != "params"}
                for group in optimizer.param_groups
            ]
            snap._optimizer_states.append((state, groups))
        snap._extra_states = [_save(obj.state_dict()) for obj in snap.extra]
        snap._rng = RNGState.capture()
        return snap

    @property
    def nbytes(self) -> int:
        """Host bytes held by the copies of parameters, buffers, gradients and optimizer state."""
        return (
            sum(_saved_nbytes(saved) for _, saved in self._tensors)
            + sum(_saved_nbytes(saved) for _, saved in self._grads)
            + sum(_saved_nbytes(state) for state, _ in self._optimizer_states)
        )

    def restore(self) -> None:
        """Put every recorded value back, in place; safe to call repeatedly."""
        with torch.no_grad():
            for live, saved in self._tensors:
                live.copy_(saved)
        for param, saved_grad in self._grads:
            param.grad = None if saved_grad is None else saved_grad.to(param.device, copy=True)
        for module, training in self._training:
            module.training = training
        for optimizer, (state, groups) in zip(self.optimizers, self._optimizer_states):
            optimizer.state.clear()
            for param, values in state.items():
                optimizer.state[param] = _load(values)
            for group, saved_group in zip(optimizer.param_groups, groups):
                params = group["params"]
                group.clear()
                group.update(_load(saved_group))
                group["params"] = params
        for obj, saved in zip(self.extra, self._extra_states):
            obj.load_state_dict(_load(saved))
        if self._rng is not None:
            self._rng.restore()
