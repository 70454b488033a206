"""One release path after an out-of-memory error, shared by every caller that recovers from one: the search's
devices (:meth:`batchlab.devices.Device.release`), :class:`batchlab.OOMGuard` and the Accelerate drop-in
(:func:`batchlab.integrations.hf.find_executable_batch_size`).

The contract, for every caller: call :func:`release_after_oom` *after* the ``except`` block that caught the
error has ended, from the thread that ran the failed step, and keep nothing of the exception but its text. The
exception's ``__traceback__`` holds the frames of the failed step, and those frames hold its tensors (the loss,
whose graph reaches every activation); Python drops the exception, and with it the frames, only when the
``except`` block ends (``except E as exc`` deletes ``exc`` there). Inside the block nothing can be freed.

:func:`release_after_oom` then frees, in this order:

1. **A failed backward's graph.** When an error is raised inside ``backward()`` -- an out-of-memory in one
   branch -- the nodes autograd had queued but not yet run stay queued, with the tensors they saved, until the
   next backward on that device runs; ``gc`` cannot reach them (pytorch/pytorch#82218; measured here: 350 MiB
   held on the CPU, see tests/test_release.py). One tiny backward per device drains them
   (:func:`flush_failed_backward`). The CPU queue belongs to the calling thread, hence "the same thread".
2. **Reference cycles** (``gc.collect()``): tensors held only by cycles are not freed by reference counting,
   and the allocator cannot reuse their memory until the collector runs.
3. **The CUDA cache** (``torch.cuda.empty_cache()``), when CUDA is initialised: blocks torch has cached but no
   tensor uses go back to the driver, where allocations outside torch's allocator -- cuBLAS/cuDNN handle
   creation, NCCL buffers -- and other processes can get them. It is process-wide (every device's cache) and
   never initialises CUDA.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

__all__ = ["devices_of", "flush_failed_backward", "release_after_oom"]


def flush_failed_backward(device: str | torch.device = "cpu") -> None:
    """Make autograd drop what a backward that raised still holds on ``device`` (pytorch/pytorch#82218).

    After an exception inside ``backward()``, the failed graph's queued nodes keep their saved tensors until
    the next backward on that device runs; one backward of a one-element tensor is that next backward.
    """
    torch.ones(1, device=device, requires_grad=True).sum().backward()


def devices_of(*holders: Any) -> list[torch.device]:
    """The devices of the parameters of ``holders`` (modules, or optimizers through their ``param_groups``),
    each once, in order of first appearance: where a failed step on them left its graph."""
    found: dict[torch.device, None] = {}
    for holder in holders:
        if isinstance(holder, torch.nn.Module):
            params = holder.parameters()
        else:
            params = (p for group in getattr(holder, "param_groups", ()) for p in group["params"])
        for param in params:
            found.setdefault(param.device, None)
    return list(found)


def release_after_oom(*devices: str | torch.device, cuda: Any = torch.cuda) -> None:
    """Free what a failed step left behind; call it after its ``except`` block has ended (module docstring).

    ``devices`` are where the failed step ran (e.g. :func:`devices_of` its model). The CPU's queue is always
    drained (any graph's CPU-side nodes wait there, and it costs microseconds); a CUDA device is drained only
    when CUDA is initialised, so this never creates a CUDA context. Other device types get only the CPU drain
    and the collection. ``cuda`` is the ``torch.cuda`` namespace (a scripted stand-in in tests).
    """
    flush_failed_backward("cpu")
    for device in dict.fromkeys(torch.device(d) for d in devices):
        if device.type == "cuda" and cuda.is_initialized():
            flush_failed_backward(device)
    gc.collect()
    if cuda.is_initialized():
        cuda.empty_cache()
