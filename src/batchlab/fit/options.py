"""The search's options in one validated object, shared by every integration that runs a search for its user.

Lightning's callback, the Ultralytics trainer and the Hugging Face helpers each take the same handful of
options (``batch``, ``memory_budget``, ``device``, ``max_batch_size``, ``multiple_of``, ``on_probe``,
``state_copy``); they build one :class:`SearchOptions` from them -- checked at construction, before any
training starts -- and run the search through :meth:`SearchOptions.run`, so the defaults and the checks live
here once instead of in every integration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from batchlab import checks
from batchlab.devices.base import Device
from batchlab.devices.cpu import fast_allocator
from batchlab.fit.records import FitResult, Probe
from batchlab.fit.search import find_batch_size
from batchlab.fit.shapes import ShapeTable
from batchlab.memory import MemoryBreakdown
from batchlab.spec import parse_batch
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload.evaluation import StepMode
from batchlab.workload.state import STORAGES


@dataclass(frozen=True)
class SearchOptions:
    """What a search is asked for; see :func:`batchlab.find_batch_size` for each option.

    ``device=None`` means "where the caller's model is" (the integration passes it to :meth:`run`).
    """

    batch: int | float | str = -1
    memory_budget: int | str | None = None
    device: str | torch.device | Device | None = None
    max_batch_size: int | None = None
    multiple_of: int = 1
    on_probe: Callable[[Probe], None] | None = None
    state_copy: str = "auto"
    mode: str = "train"

    def __post_init__(self) -> None:
        parse_batch(self.batch)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        checks.integer("max_batch_size", self.max_batch_size, none=True)
        checks.integer("multiple_of", self.multiple_of)
        checks.choice("state_copy", self.state_copy, STORAGES)
        checks.choice("mode", self.mode, [m.value for m in StepMode])
        if self.on_probe is not None and not callable(self.on_probe):
            raise TypeError(f"on_probe must be callable with each Probe, got {self.on_probe!r}")

    def with_changes(self, **changes: Any) -> SearchOptions:
        """A copy with some options changed (checked again)."""
        return replace(self, **changes)

    def run(
        self,
        workload: Any,
        *,
        default_device: str | torch.device | Device = "auto",
        preserve: Sequence[Any] = (),
        dataset_size: int | None = None,
        max_batch_size: int | None = None,
        training_follows: bool = False,
        beside: FitResult | ShapeTable | None = None,
        shapes: Sequence[Any] | None = None,
    ) -> FitResult | ShapeTable:
        """:func:`batchlab.find_batch_size` with these options; ``max_batch_size`` here is a further cap (the
        smaller of it and the option's applies), ``default_device`` stands in for ``device=None``.

        ``training_follows``: the caller trains in this process next (a framework's fit after its search); on
        the CPU the allocator then gets its speed back (:func:`batchlab.devices.cpu.fast_allocator`).

        ``beside``: the training search's result, for an evaluation (``mode="eval"``) that runs between training
        steps -- as the Trainer's and Lightning's do -- and so beside the gradients and optimizer state the
        training search measured: the evaluation's budget leaves room for them
        (:func:`eval_memory_budget`). A training :class:`~batchlab.fit.shapes.ShapeTable` works too: its
        state is its largest entry's (:func:`training_result`).

        ``shapes``: search each batch shape (a :class:`~batchlab.fit.shapes.ShapeTable` comes back). With
        ``beside=``, an evaluation table: the budget is computed once, from ``beside``, and every shape is
        searched under it; the table's notes carry the room it left.
        """
        caps = [cap for cap in (self.max_batch_size, max_batch_size) if cap]
        memory_budget = self.memory_budget
        if beside is not None:
            beside = training_result(beside)
            now = workload.tensor_bytes() if hasattr(workload, "tensor_bytes") else None
            memory_budget = eval_memory_budget(beside, now)
        result = find_batch_size(
            workload,
            device=self.device if self.device is not None else default_device,
            batch=self.batch,
            memory_budget=memory_budget,
            max_batch_size=min(caps) if caps else None,
            dataset_size=dataset_size,
            multiple_of=self.multiple_of,
            preserve=preserve,
            on_probe=self.on_probe,
            state_copy=self.state_copy,
            mode=self.mode,
            shapes=shapes,
        )
        if beside is not None:
            result.notes.append(_room_note(beside, now))
        if training_follows and result.device == "cpu":
            fast_allocator()
        return result


def training_result(train: FitResult | ShapeTable) -> FitResult:
    """The training search's result an evaluation leaves room for: ``train`` itself, or a training table's
    entry whose measured gradients and optimizer state are the largest (the same at every shape for one model
    and optimizer; the largest, should readings differ) -- the entries share the capacity and the fraction."""
    if isinstance(train, FitResult):
        return train
    if not isinstance(train, ShapeTable):
        raise TypeError(f"beside must be a FitResult or a ShapeTable, got {type(train).__name__}")
    results = [entry.result for entry in train.entries]
    known = [r for r in results if r.memory_breakdown is not None]

    def state(result: FitResult) -> int:
        return result.memory_breakdown.gradients + result.memory_breakdown.optimizer_state

    return max(known, key=state) if known else results[0]


def training_state_bytes(train: FitResult, now: MemoryBreakdown | None) -> int | None:
    """The gradients and optimizer state a training step holds that do not exist ``now`` (None: unknown, as for
    a step callable whose tensors batchlab cannot see)."""
    held = train.memory_breakdown
    if held is None or now is None:
        return None
    return max(held.gradients - now.gradients, 0) + max(held.optimizer_state - now.optimizer_state, 0)


def eval_memory_budget(train: FitResult, now: MemoryBreakdown | None) -> int:
    """The capacity an evaluation between training steps may search against: the training search's capacity
    less room for the training state it measured (:func:`training_state_bytes`), scaled so that the fraction
    applied to it leaves exactly that room: ``fraction x budget' = fraction x capacity - state``."""
    state = training_state_bytes(train, now) or 0
    fraction = train.fraction if train.fraction is not None else 1.0
    return train.capacity_bytes - math.ceil(state / fraction)


def _room_note(train: FitResult, now: MemoryBreakdown | None) -> str:
    state = training_state_bytes(train, now)
    if state is None:
        return (
            "the training state (gradients, optimizer state) beside the evaluation is unknown for a step "
            "callable: the evaluation batch leaves no room for it"
        )
    return f"the evaluation budget leaves room for the training state beside it: {format_bytes(state)}"
