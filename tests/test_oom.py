import pytest
import torch

from batchlab.oom import is_out_of_memory, out_of_memory_kind


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
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "cudnn"),
        (
            RuntimeError(
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."
            ),
            "cudnn",
        ),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), "mps"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000000 bytes."
            ),
            "cpu",
        ),
        (MemoryError(), "cpu"),
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
        ValueError("out of memory"),  # not a RuntimeError family: user code's own ValueError stays itself
        KeyError("memory"),
    ],
)
def test_everything_else_is_not_oom(exc):
    assert out_of_memory_kind(exc) is None


def test_real_cpu_allocator_failure_is_recognised():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert out_of_memory_kind(info.value) == "cpu"
