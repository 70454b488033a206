"""Memory named by what it is: the one breakdown type of a measured probe, a fake-tensor estimate and a model.

Every part of batchlab that splits memory -- a fitted batch's peak (:mod:`batchlab.fit`), the fake device's
estimate (:mod:`batchlab.planning`), the bytes a model and optimizer hold (``Workload.tensor_bytes``) -- uses
:class:`MemoryBreakdown`, so a user reads the same names everywhere (as torch's ``mem_tracker`` names its
categories: parameter, buffer, gradient, activation, temporary, optimizer state).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by what holds them; the fields sum to :attr:`total` (a step's peak, where that is what it splits).

    - ``parameters``, ``buffers``, ``gradients``, ``optimizer_state``: the model's and the optimizer's tensors.
    - ``activations``: what the forward pass saves for the backward. A measurement cannot tell the backward's
      temporaries apart and counts them here; an estimate counts them in ``temporaries``.
    - ``allocator_overhead``: what the CUDA caching allocator holds beyond live tensors -- measured, reserved
      minus allocated; estimated, its block rounding and segments. 0 on the CPU.
    - ``cuda_workspace``: torch's cuBLAS workspace (an estimate's; a measurement counts it as allocated).
    - ``other``: the rest -- in a CPU measurement the whole process's other memory (runtime, libraries, the
      batch), on CUDA the tensors before the step that are not the model's (the batch).

    The totals of the two kinds agree; the split between gradients and activations is read differently. An
    estimate splits the peak *at its moment* (MemTracker's snapshot), so its ``gradients`` are those alive
    then: with ``zero_grad(set_to_none=True)`` a peak at the end of the forward pass holds none, or only the
    last layers' (the built-in ``cnn``'s plan: 5 KiB of its 369 KiB). A measurement reads one peak per step
    and attributes it: the model's tensors as they stand after the step, the rest of the step's rise counted
    as activations -- so where the peak comes before the backward has made every gradient, its activations
    read low, and its gradients high, by the gradients not yet made.
    """

    parameters: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    temporaries: int = 0
    allocator_overhead: int = 0
    cuda_workspace: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        """The sum of every field."""
        return sum(getattr(self, item.name) for item in fields(self))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def held_bytes(tensor: Any) -> int:
    """Bytes this process holds for ``tensor``: its elements, or for a DTensor (FSDP2's sharded parameters,
    their gradients and optimizer state) its local shard only -- ``numel()`` is the global size (issue 14)."""
    local = tensor.to_local() if callable(getattr(tensor, "to_local", None)) else tensor
    return local.numel() * local.element_size()


def measured_breakdown(
    *,
    peak_bytes: int,
    baseline_bytes: int,
    allocated_bytes: int | None,
    before: MemoryBreakdown,
    after: MemoryBreakdown,
) -> MemoryBreakdown:
    """Split a measured step's peak: the model's tensors as they stand ``after`` the step, what the step created
    beyond them (activations and temporaries), the allocator's overhead, and the rest of what was in use before.

    ``before``/``after``: the model's and optimizer's tensors before and after the step (parameters, buffers,
    gradients, optimizer state); ``allocated_bytes``: the peak of live tensors where the device reads one (CUDA).
    """
    step = peak_bytes - baseline_bytes
    overhead = 0 if allocated_bytes is None else peak_bytes - allocated_bytes
    created = (after.gradients - before.gradients) + (after.optimizer_state - before.optimizer_state)
    model_before = after.parameters + after.buffers + before.gradients + before.optimizer_state
    return MemoryBreakdown(
        parameters=after.parameters,
        buffers=after.buffers,
        gradients=after.gradients,
        optimizer_state=after.optimizer_state,
        activations=step - created - overhead,
        allocator_overhead=overhead,
        other=baseline_bytes - model_before,
    )
