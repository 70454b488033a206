"""Is this exception an out-of-memory? One pure classifier, every pattern tagged with its backend.

Deciding *what* an exception is stays apart from acting on it (as in accelerate's ``utils/memory.py``): the
devices call :func:`out_of_memory_kind` and turn a recognised OOM into a failed measurement; anything it does
not recognise is re-raised unchanged, so a shape error is never reported as "does not fit".
"""

from __future__ import annotations

import torch

# (backend, substring of the message), matched in order against str(exc) of RuntimeError-family exceptions
# (torch.OutOfMemoryError and torch.distributed.DistBackendError are RuntimeErrors).
_MESSAGE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("cuda", "CUDA out of memory"),  # the caching allocator (c10/cuda/CUDACachingAllocator.cpp)
    ("cuda", "CUDA error: out of memory"),  # raised by the driver outside the allocator
    ("cublas", "CUBLAS_STATUS_ALLOC_FAILED"),  # cuBLAS workspace allocation
    # torch creates a cuBLAS handle lazily, at a thread's first matmul on a device -- often with the card
    # already full -- and when cublasCreate cannot get its memory it returns NOT_INITIALIZED, which torch raises
    # as "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`" (TORCH_CUDABLAS_CHECK in
    # aten/src/ATen/cuda/CublasHandlePool.cpp; answered "reduce the batch" in ultralytics/yolov5#8914,
    # EleutherAI/lm-evaluation-harness#1689). Only handle creation is matched: the same status from any other
    # cuBLAS call is a setup error.
    ("cublas", "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
    ("cudnn", "CUDNN_STATUS_ALLOC_FAILED"),  # cuDNN workspace allocation
    # Not CUDNN_STATUS_NOT_SUPPORTED: it means no cuDNN kernel takes that configuration (layout, dtype, size),
    # and it must surface as itself -- treated as an OOM, a search would shrink the batch around a real error.
    # NCCL's CUDACHECK logs "Cuda failure '<cudaGetErrorString>'" (nccl src/include/checks.h); torch appends
    # NCCL's last error to the DistBackendError it raises.
    ("nccl", "Cuda failure 'out of memory'"),
    ("hip", "HIP out of memory"),
    ("xpu", "XPU out of memory"),
    ("mps", "MPS backend out of memory"),
    ("cpu", "DefaultCPUAllocator: can't allocate memory"),  # c10/core/impl/alloc_cpu.cpp
    ("cpu", "DefaultCPUAllocator: not enough memory"),  # the same allocator on Windows
)


def out_of_memory_kind(exc: BaseException) -> str | None:
    """Return the backend whose out-of-memory ``exc`` is ("cuda", "cpu", "nccl", ...), or None if it is not an OOM.

    A ``torch.OutOfMemoryError`` is tagged by its message like any other (a CUDA allocator's is "cuda", the CPU
    allocator's "cpu"); one whose message names no backend above is "torch". A Python ``MemoryError`` is "cpu".
    """
    if isinstance(exc, MemoryError):
        return "cpu"
    if not isinstance(exc, RuntimeError):
        return None
    message = str(exc)
    for backend, pattern in _MESSAGE_PATTERNS:
        if pattern in message:
            return backend
    return "torch" if isinstance(exc, torch.OutOfMemoryError) else None


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is an out-of-memory error from any backend batchlab knows."""
    return out_of_memory_kind(exc) is not None
