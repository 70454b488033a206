"""carry_over: move a live optimizer's hyper-parameters across a batch change, in one call, with an audit.

::

    from batchlab.training import carry_over

    carry = carry_over(optimizer, 64, 256, max_micro_batch=128)   # AdamW: lr x2, betas, eps, weight decay
    print(carry.audit())                                          # every value before and after, and why
    micro, accumulation = carry.plan.micro_batch, carry.plan.accumulation_steps

The rules and their sources are :mod:`batchlab.advice.transfer`'s (the pure math); this module reads the
param groups, looks the optimizer up by its torch.optim class (a subclass is looked up by its nearest
torch.optim base; Lightning's and Accelerate's wrappers are unwrapped through ``.optimizer``), and writes the
new values back. The write is all or nothing: if any assignment fails, every group (and every scheduler's
``base_lrs``) is put back as it was before the error propagates.

LR schedulers: a scheduler given in ``schedulers`` has its ``base_lrs`` scaled by the same factor as the
groups' ``lr`` (and ``initial_lr``, which schedulers read), so a closed-form schedule (cosine, LambdaLR) keeps
producing LRs at the new scale, and a chained one reads the new ``lr`` anyway. Adam's moment estimates are
kept: under the SDE rule only the decay rates change, and the bias correction 1 − β^t uses the new β with the
old step count (a difference that vanishes after the first ~1/(1 − β) steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab.advice.transfer import OPTIMIZERS, CarryOver, carry_hyperparameters

__all__ = ["carry_over", "optimizer_name", "unwrap_optimizer", "hyperparameter_snapshot"]

_KEYS = ("lr", "initial_lr", "betas", "alpha", "eps", "weight_decay")  # what a carry may write


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` or Accelerate's wrapper (or itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def optimizer_name(optimizer: Any) -> str:
    """The class name the rule table knows the optimizer by: its own, or its nearest torch.optim base's."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ in OPTIMIZERS and cls.__module__.startswith("torch.optim"):
            return cls.__name__
    return type(optimizer).__name__


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not groups:
        raise TypeError(
            f"carry_over needs a torch optimizer with param_groups, got {type(optimizer).__name__}"
        )
    return groups


def _write(group: dict[str, Any], key: str, value: Any) -> None:
    current = group.get(key)
    if isinstance(current, torch.Tensor):  # capturable / fused optimizers keep the LR as a tensor
        current.fill_(value)
    elif (
        key == "betas"
        and isinstance(current, (tuple, list))
        and any(isinstance(b, torch.Tensor) for b in current)
    ):
        for tensor, v in zip(current, value):
            tensor.fill_(v)
    else:
        group[key] = tuple(value) if key == "betas" else value


def _read(value: Any) -> Any:
    """A group's value as plain numbers (tensors by value), to compare and put back."""
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(float(b) for b in value)
    return value


def hyperparameter_snapshot(optimizer: Any, schedulers: Sequence[Any] = ()) -> Callable[[], None]:
    """A function that puts back what a carry may write: every group's hyper-parameters (tensors by value) and
    each scheduler's ``base_lrs``. Used for the all-or-nothing write, and by the ramp to undo a failed change."""
    groups = _groups(optimizer)
    saved = [{key: _read(group[key]) for key in _KEYS if key in group} for group in groups]
    bases = [list(s.base_lrs) if hasattr(s, "base_lrs") else None for s in schedulers]

    def restore() -> None:
        for group, values in zip(groups, saved):
            for key, value in values.items():
                if _read(group[key]) != value:  # only what changed: an unwritable key that did not is left
                    _write(group, key, value)
        for scheduler, base in zip(schedulers, bases):
            if base is not None:
                scheduler.base_lrs = list(base)

    return restore


def carry_over(
    optimizer: Any,
    old_batch: int,
    new_batch: int,
    *,
    rule: str | None = None,
    apply: bool = True,
    noise_scale: float | None = None,
    warmup_steps: int | None = None,
    max_micro_batch: int | None = None,
    world_size: int = 1,
    schedulers: Sequence[Any] = (),
    keep: Sequence[str] = (),
) -> CarryOver:
    """Carry ``optimizer``'s hyper-parameters from global batch ``old_batch`` to ``new_batch``; return the audit.

    ``rule`` overrides the optimizer's LR rule (one of :data:`batchlab.advice.RULES`) and is required for an
    optimizer :data:`batchlab.advice.transfer.OPTIMIZERS` does not know; ``noise_scale`` is for
    ``"adascale"``. ``apply=False`` only computes. ``warmup_steps``: the warm-up steps still to run at the
    old batch (returned in steps at the new batch, the samples kept). ``max_micro_batch`` (with
    ``world_size``): the accumulation that keeps each micro-batch within it (``carry.plan``). ``schedulers``:
    LR schedulers whose ``base_lrs`` follow the LR (module docstring). ``keep``: values left as they are (e.g.
    ``("betas",)``; :func:`~batchlab.advice.transfer.carry_hyperparameters`). Every check runs before anything is
    written; a failed write leaves the optimizer as it was.
    """
    opt = unwrap_optimizer(optimizer)
    groups = _groups(opt)
    carry = carry_hyperparameters(
        [{k: v for k, v in g.items() if k != "params"} for g in groups],
        old_batch,
        new_batch,
        optimizer=optimizer_name(opt),
        rule=rule,
        noise_scale=noise_scale,
        warmup_steps=warmup_steps,
        max_micro_batch=max_micro_batch,
        world_size=world_size,
        keep=keep,
    )
    for scheduler in schedulers:
        if not isinstance(getattr(scheduler, "base_lrs", None), list):
            raise TypeError(f"schedulers must be LR schedulers with base_lrs, got {type(scheduler).__name__}")
    if apply:
        restore = hyperparameter_snapshot(opt, schedulers)
        try:
            for group, values in zip(groups, carry.groups):
                for key, value in values.items():
                    _write(group, key, value)
            for scheduler in schedulers:
                scheduler.base_lrs = [base * carry.lr_factor for base in scheduler.base_lrs]
        except BaseException:
            restore()
            raise
    return carry
