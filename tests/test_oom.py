"""The out-of-memory classifier: one test per pattern, each with its backend tag, and what must not match."""

import pytest
import torch
import torch.distributed

from batchlab.devices.oom import is_out_of_memory, out_of_memory_kind

# torch's ProcessGroupNCCL message when a collective's CUDA allocation fails, NCCL's last error appended
NCCL_OOM = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled cuda error "
    "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\n"
    "ncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\nCuda failure 'out of memory'"
)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cuda"),
        (
            RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)"),
            "cuda",
        ),
        (
            RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
            "cuda",
        ),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
            "cublas",
        ),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
            "cublas",
        ),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "cudnn"),
        (torch.distributed.DistBackendError(NCCL_OOM), "nccl"),
        (RuntimeError(NCCL_OOM), "nccl"),
        (RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB"), "hip"),
        (RuntimeError("XPU out of memory. Tried to allocate 1.00 GiB"), "xpu"),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), "mps"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000000 bytes."
            ),
            "cpu",
        ),
        (
            torch.OutOfMemoryError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                "tried to allocate 4611686018427387904 bytes. Error code 12 (Cannot allocate memory)"
            ),
            "cpu",
        ),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB."), "cpu"),
        (MemoryError(), "cpu"),
        (torch.OutOfMemoryError("out of memory (no backend named)"), "torch"),
    ],
)
def test_recognises_each_backend(exc, kind):
    assert out_of_memory_kind(exc) == kind
    assert is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x16)"),
        RuntimeError("CUDA error: device-side assert triggered"),
        # a configuration no cuDNN kernel takes: a real error, which must surface as itself
        RuntimeError(
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."
        ),
        # NOT_INITIALIZED from a call other than handle creation is a setup error
        RuntimeError(
            "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasSgemm( handle, opa, opb)`"
        ),
        torch.distributed.DistBackendError(
            "NCCL error: unhandled system error, Cuda failure 'invalid argument'"
        ),
        ValueError("out of memory"),  # not a RuntimeError family: user code's own ValueError stays itself
        KeyError("memory"),
    ],
)
def test_everything_else_is_not_oom(exc):
    assert out_of_memory_kind(exc) is None
    assert not is_out_of_memory(exc)


def test_real_cpu_allocator_failure_is_recognised():
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator") as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert out_of_memory_kind(info.value) == "cpu"
