"""The search's options in one validated object, shared by every integration that runs a search for its user.

Lightning's callback, the Ultralytics trainer and the Hugging Face helpers each take the same handful of
options (``batch``, ``memory_budget``, ``device``, ``max_batch_size``, ``multiple_of``, ``on_probe``,
``state_copy``); they build one :class:`SearchOptions` from them -- checked at construction, before any
training starts -- and run the search through :meth:`SearchOptions.run`, so the defaults and the checks live
here once instead of in every integration.
"""

from __future__ import annotations

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
from batchlab.spec import parse_batch
from batchlab.units import parse_bytes
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

    def __post_init__(self) -> None:
        parse_batch(self.batch)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        checks.integer("max_batch_size", self.max_batch_size, none=True)
        checks.integer("multiple_of", self.multiple_of)
        checks.choice("state_copy", self.state_copy, STORAGES)
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
        shapes: Sequence[Any] | None = None,
    ) -> FitResult | ShapeTable:
        """:func:`batchlab.find_batch_size` with these options; ``max_batch_size`` here is a further cap (the
        smaller of it and the option's applies), ``default_device`` stands in for ``device=None``.

        ``training_follows``: the caller trains in this process next (a framework's fit after its search); on
        the CPU the allocator then gets its speed back (:func:`batchlab.devices.cpu.fast_allocator`).
        ``shapes``: search each batch shape (a :class:`~batchlab.fit.shapes.ShapeTable` comes back).
        """
        caps = [cap for cap in (self.max_batch_size, max_batch_size) if cap]
        result = find_batch_size(
            workload,
            device=self.device if self.device is not None else default_device,
            batch=self.batch,
            memory_budget=self.memory_budget,
            max_batch_size=min(caps) if caps else None,
            dataset_size=dataset_size,
            multiple_of=self.multiple_of,
            preserve=preserve,
            on_probe=self.on_probe,
            state_copy=self.state_copy,
            shapes=shapes,
        )
        if training_follows and result.device == "cpu":
            fast_allocator()
        return result
