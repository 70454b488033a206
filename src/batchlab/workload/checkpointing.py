"""Activation checkpointing applied to a model from outside, for as long as a ``with`` block lasts.

Checkpointing trades time for memory: a checkpointed block keeps only its inputs during the forward pass and
recomputes its activations during the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"), so activation memory per sample falls and each step runs roughly one extra forward.

:func:`activation_checkpointing` wraps modules in ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False``,
the variant PyTorch recommends: keyword arguments, non-tensor outputs and inputs without ``requires_grad`` all
work) by setting an instance attribute ``forward`` on each one; the class is never touched, and on exit every
instance attribute is put back as it was -- nothing else about the model changes, so its parameters, buffers
and ``state_dict`` are bitwise what they were. Which modules, in order of preference:

1. the ``modules`` the caller names;
2. the model's *repeated blocks*: children of an ``nn.ModuleList`` / ``nn.Sequential`` that have children
   of their own and share a type with a sibling (a transformer's layers, a ResNet stage's blocks) -- the
   outermost such, never a block inside another; a ResNet's stages (Sequentials of blocks) are looked into;
3. otherwise the longest ``nn.Sequential`` of at least ``MIN_SEQUENTIAL`` layers, cut into about sqrt(n)
   segments with ``checkpoint_sequential`` (sqrt(n) segments give the O(sqrt n) memory of Chen et al.).

Caveat (PyTorch's, not batchlab's): a BatchNorm inside a checkpointed block updates its running statistics
twice per step, once in the forward and once in the recomputation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

MIN_SEQUENTIAL = 4  # a Sequential shorter than this has no segment worth recomputing
_MISSING = object()


@dataclass(frozen=True)
class CheckpointPlan:
    """What :func:`activation_checkpointing` wraps: ``blocks`` one by one, or ``sequential`` in ``segments``."""

    blocks: tuple[nn.Module, ...] = ()
    sequential: nn.Sequential | None = None
    segments: int = 0
    how: str = ""

    def describe(self) -> str:
        if self.sequential is not None:
            return f"{self.how}: {len(self.sequential)} layers in {self.segments} segments"
        kinds = sorted({type(block).__name__ for block in self.blocks})
        return f"{self.how}: {len(self.blocks)} x {'/'.join(kinds)}"


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def find_repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks of ``model``: children of a ModuleList/Sequential that are modules with
    children of their own and share a type with a sibling (never a block inside another). A Sequential child
    is a group to look into, not a block -- unless nothing inside the groups repeats, then the groups are the
    blocks. Empty when there are none."""
    if isinstance(model, (nn.ModuleList, nn.Sequential)):
        children = list(model.children())
        plain = [
            c for c in children if _has_children(c) and not isinstance(c, (nn.ModuleList, nn.Sequential))
        ]
        counts = Counter(type(c) for c in plain)
        repeated = {id(c) for c in plain if counts[type(c)] >= 2}
        found: list[nn.Module] = []
        for child in children:
            if id(child) in repeated:
                found.append(child)
            else:
                found.extend(find_repeated_blocks(child))
        groups = [c for c in children if isinstance(c, nn.Sequential) and _has_children(c)]
        if not found and len(groups) >= 2:  # e.g. Sequential(Sequential(conv, relu), Sequential(conv, relu))
            found = groups
        return found
    return [block for child in model.children() for block in find_repeated_blocks(child)]


def plan_checkpointing(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> CheckpointPlan:
    """Decide what to checkpoint (see the module docstring); raises ``ValueError`` when nothing qualifies."""
    if modules is not None:
        modules = list({id(m): m for m in modules}.values())  # each module wrapped once
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("checkpoint modules must be a non-empty list of nn.Module objects of the model")
        inside = {id(m) for m in model.modules()}
        strangers = [type(m).__name__ for m in modules if id(m) not in inside]
        if strangers:
            raise ValueError(f"checkpoint modules are not part of the model: {', '.join(strangers)}")
        return CheckpointPlan(blocks=tuple(modules), how="given modules")
    blocks = find_repeated_blocks(model)
    if blocks:
        return CheckpointPlan(blocks=tuple(blocks), how="repeated blocks")
    sequentials = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) >= MIN_SEQUENTIAL]
    if sequentials:
        longest = max(sequentials, key=len)
        segments = max(2, round(math.sqrt(len(longest))))  # Chen et al. 2016: sqrt(n) segments
        return CheckpointPlan(sequential=longest, segments=segments, how="sequential segments")
    raise ValueError(
        f"{type(model).__name__} has no repeated blocks and no nn.Sequential of {MIN_SEQUENTIAL}+ layers to "
        "checkpoint; name the modules to wrap: checkpoint_modules=[model.block1, model.block2, ...]"
    )


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing to save for backward: run as is
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _sequential_checkpointed(sequential: nn.Sequential, segments: int, forward: Any) -> Any:
    def run(input: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(input)
        return checkpoint_sequential(sequential, segments, input, use_reentrant=False)

    return run


@contextmanager
def activation_checkpointing(
    model: nn.Module, modules: Sequence[nn.Module] | None = None
) -> Iterator[CheckpointPlan]:
    """Checkpoint ``model``'s repeated blocks (or ``modules``) inside the ``with`` block; undo it on exit.

    Yields the :class:`CheckpointPlan` applied. Every patch is an instance attribute ``forward``, removed (or
    put back, if the module had one of its own) in ``finally`` -- also when the block raises.
    """
    plan = plan_checkpointing(model, modules)
    patched: list[tuple[nn.Module, Any]] = []
    try:
        if plan.sequential is not None:
            target = plan.sequential
            patched.append((target, target.__dict__.get("forward", _MISSING)))
            target.forward = _sequential_checkpointed(target, plan.segments, target.forward)
        else:
            for block in plan.blocks:
                patched.append((block, block.__dict__.get("forward", _MISSING)))
                block.forward = _checkpointed(block.forward)
        yield plan
    finally:
        for module, previous in reversed(patched):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous
