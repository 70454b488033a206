"""Is this exception an out-of-memory? One pure classifier, every pattern tagged with its backend.

Deciding *what* an exception is stays apart from acting on it (as in accelerate's ``utils/memory.py``): the
devices call :func:`out_of_memory_kind` and turn a recognised OOM into a failed measurement; anything it does
not recognise is re-raised unchanged, so a shape error is never reported as "does not fit".
"""

from __future__ import annotations

import torch

# (backend, substring of the message). Matched against str(exc) of RuntimeError-family exceptions.
_MESSAGE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("cuda", "CUDA out of memory"),  # caching allocator, torch < 2.1 message
    ("cuda", "CUDA error: out of memory"),  # raised by the driver outside the allocator
    ("cublas", "CUBLAS_STATUS_ALLOC_FAILED"),  # cuBLAS workspace allocation
    ("cudnn", "CUDNN_STATUS_ALLOC_FAILED"),  # cuDNN workspace allocation
    # cuDNN reports a failed workspace allocation for large batches as NOT_SUPPORTED; accelerate and
    # Lightning both treat it as OOM (accelerate utils/memory.py, lightning tuner/batch_size_scaling).
    ("cudnn", "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"),
    ("hip", "HIP out of memory"),
    ("xpu", "XPU out of memory"),
    ("mps", "MPS backend out of memory"),
    ("cpu", "DefaultCPUAllocator: can't allocate memory"),  # c10/core/impl/alloc_cpu.cpp
    ("cpu", "DefaultCPUAllocator: not enough memory"),  # the same allocator on Windows
)


def out_of_memory_kind(exc: BaseException) -> str | None:
    """Return the backend whose out-of-memory ``exc`` is ("cuda", "cpu", ...), or None if it is not an OOM."""
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is the same class
        return "cuda" if "CUDA" in str(exc) else "torch"
    if isinstance(exc, MemoryError):
        return "cpu"
    if isinstance(exc, RuntimeError):
        message = str(exc)
        for backend, pattern in _MESSAGE_PATTERNS:
            if pattern in message:
                return backend
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is an out-of-memory error from any backend batchlab knows."""
    return out_of_memory_kind(exc) is not None
