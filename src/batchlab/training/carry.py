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
producing LRs at the new scale, and a chained one reads the new ``lr`` anyway.

Adam's moments: torch divides them by 1 − β^t with the group's current β, so a change of the betas at step t
would change what they read (early in training by several times: the update after 0.999 -> 0.992 at step 34
is 2.44x lr). Every write of a group's betas, the undo included, scales each parameter's moments by
:func:`~batchlab.advice.transfer.bias_correction_rescale` at its own step, which keeps the bias-corrected
estimates; the audit says by how much. The optimizer's table entry names the moments (``OptimizerRule.moments``);
an optimizer it does not know keeps its state as it is, and the audit says that too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab.advice.transfer import OPTIMIZERS, CarryOver, bias_correction_rescale, carry_hyperparameters

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


def _moment_scales(
    optimizer: Any, group: dict[str, Any], before: tuple[float, ...], after: tuple[float, ...]
) -> list[tuple[dict[str, Any], str, float]]:
    """``(state, key, factor)`` for each moment that a change of ``group``'s betas from ``before`` to ``after``
    rescales: the optimizer's bias-corrected moments, per parameter at its own step (module docstring)."""
    spec = OPTIMIZERS.get(optimizer_name(optimizer))
    if spec is None or tuple(before) == tuple(after):
        return []
    scales = []
    for param in group["params"]:
        state = optimizer.state.get(param)
        if not state or "step" not in state:
            continue  # no step taken yet: nothing is bias-corrected
        step = float(state["step"])
        for key, index in spec.moments:
            factor = bias_correction_rescale(before[index], after[index], step)
            if key in state and factor != 1.0:
                scales.append((state, key, factor))
    return scales


def _write(optimizer: Any, group: dict[str, Any], key: str, value: Any) -> None:
    """Write one hyper-parameter; a change of the betas rescales the moments with it (module docstring)."""
    current = group.get(key)
    scales = _moment_scales(optimizer, group, _read(current), tuple(value)) if key == "betas" else []
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
    for state, name, factor in scales:
        state[name].mul_(factor)


def _moment_notes(optimizer: Any, groups: list[dict[str, Any]], carry: CarryOver) -> tuple[str, ...]:
    """The audit's lines for the moments a carry rescales (or, for an optimizer the table does not know, keeps)."""
    notes = []
    for index, (group, values) in enumerate(zip(groups, carry.groups)):
        if "betas" not in group or "betas" not in values or _read(group["betas"]) == tuple(values["betas"]):
            continue
        if optimizer_name(optimizer) not in OPTIMIZERS:
            notes.append(f"group {index}: {optimizer_name(optimizer)}'s state is kept as it is: how it "
                         "bias-corrects its moments is unknown")  # fmt: skip
            continue
        factors: dict[str, list[float]] = {}
        for _, key, factor in _moment_scales(optimizer, group, _read(group["betas"]), tuple(values["betas"])):
            factors.setdefault(key, []).append(factor)
        if factors:
            shown = ", ".join(
                f"{key} x{min(f):.4g}" + (f"-{max(f):.4g}" if max(f) != min(f) else "")
                for key, f in factors.items()
            )
            notes.append(f"group {index}: {shown}, so the bias-corrected moments read as before the betas "
                         "changed (torch divides by 1 - beta^t with the new beta)")  # fmt: skip
    return tuple(notes)


def _read(value: Any) -> Any:
    """A group's value as plain numbers (tensors by value), to compare and put back."""
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(float(b) for b in value)
    return value


def hyperparameter_snapshot(optimizer: Any, schedulers: Sequence[Any] = ()) -> Callable[[], None]:
    """A function that puts back what a carry may write: every group's hyper-parameters (tensors by value) and
    each scheduler's ``base_lrs``; betas put back rescale the moments back (to float rounding). Used for the
    all-or-nothing write, and by the ramp to undo a failed change."""
    optimizer = unwrap_optimizer(optimizer)
    groups = _groups(optimizer)
    saved = [{key: _read(group[key]) for key in _KEYS if key in group} for group in groups]
    bases = [list(s.base_lrs) if hasattr(s, "base_lrs") else None for s in schedulers]

    def restore() -> None:
        for group, values in zip(groups, saved):
            for key, value in values.items():
                if _read(group[key]) != value:  # only what changed: an unwritable key that did not is left
                    _write(optimizer, group, key, value)
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
    ``("betas",)``; :func:`~batchlab.advice.transfer.carry_hyperparameters`). A change of the betas rescales
    Adam's moments to keep their bias-corrected values (module docstring; the audit's notes say by how much).
    Every check runs before anything is written; a failed write leaves the optimizer as it was.
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
    carry = dataclasses.replace(carry, notes=carry.notes + _moment_notes(opt, groups, carry))
    if apply:
        restore = hyperparameter_snapshot(opt, schedulers)
        try:
            for group, values in zip(groups, carry.groups):
                for key, value in values.items():
                    _write(opt, group, key, value)
            for scheduler in schedulers:
                scheduler.base_lrs = [base * carry.lr_factor for base in scheduler.base_lrs]
        except BaseException:
            restore()
            raise
    return carry
