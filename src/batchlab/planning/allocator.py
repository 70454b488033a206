"""What the CUDA caching allocator adds over a step's live tensors: block rounding and segments, modelled.

The sizes are the allocator's own (quoted below); :class:`CachingAllocatorModel` follows every storage a fake
step creates and keeps what ``max_memory_allocated`` and ``max_memory_reserved`` would read.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented home of TorchDispatchMode

# The CUDA caching allocator's sizes: c10/cuda/CUDACachingAllocator.cpp (torch <= 2.7; now
# c10/core/AllocatorConfig.h), whose comments are quoted.
BLOCK_BYTES = 512  # kMinBlockSize: "all sizes are rounded to at least 512 bytes"
SMALL_BYTES = 1024**2  # kSmallSize: "largest 'small' allocation is 1 MiB"
SMALL_SEGMENT_BYTES = 2 * 1024**2  # kSmallBuffer: "'small' allocations are packed in 2 MiB blocks"
MID_BYTES = 10 * 1024**2  # kMinLargeAlloc: "allocations between 1 and 10 MiB may use kLargeBuffer"
MID_SEGMENT_BYTES = 20 * 1024**2  # kLargeBuffer: "'large' allocations may be packed in 20 MiB blocks"
LARGE_ROUND_BYTES = 2 * 1024**2  # kRoundLarge: "round up large allocations to 2 MiB"


def round_block(size: int) -> int:
    """The caching allocator's block size for a request: up to a multiple of 512 bytes, at least 512."""
    return max(BLOCK_BYTES, math.ceil(size / BLOCK_BYTES) * BLOCK_BYTES)


def round_up(size: int, unit: int) -> int:
    return math.ceil(size / unit) * unit


def tensors_in(value: Any):
    """Yield the tensors in an op's output (a tensor, or nested tuples/lists of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)


class CachingAllocatorModel(TorchDispatchMode):
    """The CUDA caching allocator's rounding over the live storages of a (fake) step.

    ``allocated`` counts each storage's block (512-byte rounding): what ``max_memory_allocated`` counts.
    ``reserved`` adds segments: blocks up to 1 MiB packed into 2 MiB segments, blocks of 1-10 MiB into 20 MiB
    segments, larger blocks each rounded up to 2 MiB. The real allocator also splits segments, reuses cached
    blocks and fragments over time, which no model of live tensors can see; the benchmark measures the gap.
    Storages are followed by weak references and dropped when torch frees them, as MemTracker does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, int] = {}  # id(storage) -> block bytes, for live storages only
        self._small = self._mid = self._large = 0
        self.peak_allocated = self.peak_reserved = 0

    @property
    def allocated(self) -> int:
        return self._small + self._mid + self._large

    @property
    def reserved(self) -> int:
        return (
            round_up(self._small, SMALL_SEGMENT_BYTES) + round_up(self._mid, MID_SEGMENT_BYTES) + self._large
        )

    def _change(self, block: int, sign: int) -> None:
        if block <= SMALL_BYTES:
            self._small += sign * block
        elif block < MID_BYTES:
            self._mid += sign * block
        else:
            self._large += sign * round_up(block, LARGE_ROUND_BYTES)

    def _release(self, key: int) -> None:
        self._change(self._blocks.pop(key), -1)

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage once, until it is freed."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._blocks or storage.nbytes() == 0:
            return
        self._blocks[key] = block = round_block(storage.nbytes())
        self._change(block, +1)
        weakref.finalize(storage, self._release, key)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tensors_in(out):
            self.track(tensor)
        return out
