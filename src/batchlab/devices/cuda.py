"""CUDA device: the caching allocator's peaks, against what this process can hold on the card.

Peak is ``max_memory_reserved`` (what the process holds from the driver, fragmentation included -- what runs
out), reported beside ``max_memory_allocated`` (live tensors); their difference is the allocator's overhead
(block rounding, fragmentation), which the memory split reports apart from activations. Capacity is the
driver's free memory plus what torch already reserved (``mem_get_info`` counts other processes), capped by
``set_per_process_memory_fraction`` when one is set (how the benchmark emulates a smaller card). The CUDA
context and NCCL buffers sit outside torch's counters and outside the capacity alike.

Both steps of a probe are read in one window, so the first step's one-off costs are in the peak: with
``torch.backends.cudnn.benchmark`` on, cuDNN's autotuner tries algorithms -- and allocates their workspaces
through the caching allocator -- on the first step at each new shape; that is the peak the user's first step
at that shape will reach.

Process-wide effects a user can see (they cannot be avoided): before each probe the cache is emptied
(``empty_cache``: an earlier, larger probe's cached blocks would otherwise read as this one's peak) and the
peak statistics are reset (``reset_peak_memory_stats``), so peaks read after a search start from it.

``cuda`` is the ``torch.cuda`` namespace; tests pass a scripted stand-in with the same calls
(tests/test_cuda_device.py), so this module is tested on machines without a GPU.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from batchlab.devices.base import Device
from batchlab.devices.release import release_after_oom

ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second is torch >= 2.9's name


class CUDADevice(Device):
    """Runs steps on one CUDA device and reads its caching-allocator statistics."""

    def __init__(self, index: int | str | torch.device | None = None, *, cuda: ModuleType | Any = torch.cuda):
        if not cuda.is_available():
            raise RuntimeError("CUDA is not available in this process (torch.cuda.is_available() is False)")
        device = torch.device("cuda", cuda.current_device()) if index is None else torch.device(index)
        if device.type != "cuda":
            raise ValueError(f"CUDADevice needs a cuda device, got {device}")
        self.cuda = cuda
        self.device = torch.device(
            "cuda", device.index if device.index is not None else cuda.current_device()
        )
        self.name = str(self.device)

    def _fraction(self) -> float:
        get_fraction = getattr(self.cuda, "get_per_process_memory_fraction", None)  # newer torch only
        return get_fraction(self.device) if get_fraction else 1.0

    def capacity_bytes(self) -> int:
        free, total = self.cuda.mem_get_info(self.device)
        capacity = free + self.cuda.memory_reserved(self.device)
        return min(capacity, int(self._fraction() * total))

    def in_use_bytes(self) -> int:
        return self.cuda.memory_reserved(self.device)

    def settings(self) -> dict[str, Any]:
        """The allocator configuration and cuDNN autotuning: both change the peak a step reaches."""
        return {
            **{name: os.environ[name] for name in ALLOCATOR_ENV if name in os.environ},
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "per_process_memory_fraction": self._fraction(),
        }

    def synchronize(self) -> None:
        self.cuda.synchronize(self.device)

    def release(self) -> None:
        release_after_oom(self.device, cuda=self.cuda)

    def _begin(self) -> int:
        # Return cached blocks first: reserved memory left over from an earlier, larger probe would otherwise
        # count as this probe's peak (max_memory_reserved starts from what is reserved now).
        self.cuda.empty_cache()
        self.cuda.reset_peak_memory_stats(self.device)
        return self.cuda.memory_reserved(self.device)

    def _end(self) -> tuple[int, int]:
        return self.cuda.max_memory_reserved(self.device), self.cuda.max_memory_allocated(self.device)

    def __repr__(self) -> str:
        return f"CUDADevice({self.name})"
