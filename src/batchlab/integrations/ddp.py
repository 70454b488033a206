"""The first home of ``find_batch_size_distributed`` (torchrun, DDP); the code lives in
:mod:`batchlab.integrations.distributed` now, and this import path keeps working."""

from batchlab.integrations.distributed import (
    DistributedFitResult,
    agree_on_batch_size,
    all_gather_ints,
    find_batch_size_distributed,
)

__all__ = ["DistributedFitResult", "agree_on_batch_size", "all_gather_ints", "find_batch_size_distributed"]
