"""CUDA device: the caching allocator's peaks, against what this process can hold on the card.

Peak is ``max_memory_reserved`` (what the process holds from the driver, fragmentation included -- what runs
out), reported beside ``max_memory_allocated`` (live tensors). Capacity is the driver's free memory plus what
torch already reserved (``mem_get_info`` counts other processes), capped by
``set_per_process_memory_fraction`` when one is set (how the benchmark emulates a smaller card). The CUDA
context and NCCL buffers sit outside torch's counters and outside the capacity alike.
"""

from __future__ import annotations

import torch

from batchlab.devices.base import Device
from batchlab.devices.release import release_after_oom


class CUDADevice(Device):
    """Runs steps on one CUDA device and reads its caching-allocator statistics."""

    def __init__(self, index: int | str | torch.device | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this process (torch.cuda.is_available() is False)")
        device = torch.device("cuda", torch.cuda.current_device()) if index is None else torch.device(index)
        if device.type != "cuda":
            raise ValueError(f"CUDADevice needs a cuda device, got {device}")
        self.device = torch.device(
            "cuda", device.index if device.index is not None else torch.cuda.current_device()
        )
        self.name = str(self.device)

    def capacity_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        capacity = free + torch.cuda.memory_reserved(self.device)
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
        fraction = get_fraction(self.device) if get_fraction else 1.0
        return min(capacity, int(fraction * total))

    def in_use_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        release_after_oom(self.device)

    def _begin(self) -> int:
        # Return cached blocks first: reserved memory left over from an earlier, larger probe would otherwise
        # count as this probe's peak (max_memory_reserved starts from what is reserved now).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_reserved(self.device)

    def _end(self) -> tuple[int, int]:
        return torch.cuda.max_memory_reserved(self.device), torch.cuda.max_memory_allocated(self.device)

    def __repr__(self) -> str:
        return f"CUDADevice({self.name})"
