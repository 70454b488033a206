"""Devices to plan for without having them: a table of common cards, and the CUDA costs that are not tensors.

A target is where the planned training step will run: a card from :data:`CARDS` (``"a100-80gb"``, ...), or
a memory size (``"24GiB"``) with a device type. :func:`resolve_target` is the one parser for both, used by
:func:`batchlab.plan` and ``batchlab plan --target``.

What a card's memory holds besides the step's tensors, and how batchlab counts it:

- **CUDA context** (driver state, loaded kernels): outside torch's counters. batchlab's CUDA device counts
  capacity as ``free + reserved``, which already leaves it out, so a card's *usable* memory is its
  CUDA-visible total minus :data:`CUDA_CONTEXT_BYTES`.
- **cuBLAS workspace**: inside torch's counters (allocated through the caching allocator), so the fake device
  adds it to the step's estimate (:data:`CUBLAS_WORKSPACE_BYTES`, per card generation).
- **Allocator rounding**: modelled per tensor by the fake device (see :mod:`batchlab.planning.fake`).

The numbers are sources, not measurements on this project's machines; ``benchmarks/plan_accuracy.py``
measures the context and the estimate's error on whatever GPU it runs on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from batchlab.units import parse_bytes

MiB = 2**20

# The CUDA context: ~300 MiB right after initialisation with lazy module loading (CUDA >= 11.7, the default
# on Linux since 12.2), over 1000 MiB before it (ptrblck, pytorch/pytorch#107667, 2023). cuDNN and cuBLAS
# kernels load lazily as the model first runs them and add to it, hence an allowance of 512 MiB.
CUDA_CONTEXT_BYTES = 512 * MiB

# cuBLAS workspace per (handle, stream): torch's default CUBLAS_WORKSPACE_CONFIG is ":4096:8" = 32 MiB on
# sm90+ and ":4096:2:16:8" = 2 x 4 MiB + 8 x 16 KiB = 8.125 MiB before (aten/src/ATen/cuda/
# CublasHandlePool.cpp, parseChosenWorkspaceSize); getNewWorkspace() takes it from the caching allocator, so
# it shows in memory_reserved (the 8519680-byte block in discuss.pytorch.org/t/178671).
CUBLAS_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_WORKSPACE_BYTES_SM90 = 4096 * 1024 * 8


@dataclass(frozen=True)
class Card:
    """A GPU model: its CUDA-visible memory (``total_bytes``), compute capability, and where the number is from."""

    name: str
    total_bytes: int
    compute_capability: tuple[int, int]
    source: str

    @property
    def usable_bytes(self) -> int:
        """What torch's caching allocator can hold: the CUDA-visible total less the CUDA context."""
        return self.total_bytes - CUDA_CONTEXT_BYTES

    @property
    def cublas_workspace_bytes(self) -> int:
        """torch's default cuBLAS workspace on this card's generation."""
        return CUBLAS_WORKSPACE_BYTES_SM90 if self.compute_capability[0] >= 9 else CUBLAS_WORKSPACE_BYTES


# Totals are what CUDA reports (torch.cuda.get_device_properties(i).total_memory, cudaMemGetInfo's total)
# where a source gives it: a few hundred MiB below nvidia-smi's "MiB" total on some cards (driver
# reservations), equal on others. Where only nvidia-smi's figure was found it is used and said so.
CARDS: dict[str, Card] = {
    card.name: card
    for card in (
        Card(
            "a100-80gb",
            85_056_798_720,  # 81,117 MiB
            (8, 0),
            "torch total_memory recorded for an A100-SXM4-80GB (85,056,798,720 B); nvidia-smi shows 81,920 MiB",
        ),
        Card(
            "h100-80gb",
            81_089 * MiB,
            (9, 0),
            "torch total_memory for an H100 80GB HBM3 (torch 2.7, CUDA 12.8: 81,089 MiB); nvidia-smi shows 81,559 MiB",
        ),
        Card(
            "rtx4090",
            24_563 * MiB,
            (8, 9),
            "torch total_memory for a GeForce RTX 4090 (24,563 MiB); nvidia-smi shows 24,564 MiB",
        ),
        Card(
            "l4",
            23_034 * MiB,
            (8, 9),
            "nvidia-smi total for an L4 (23,034 MiB); CUDA's own total was not found and may be a little lower",
        ),
        Card(
            "t4",
            15_079 * MiB,
            (7, 5),
            "lowest torch total_memory seen for a Tesla T4 (15,079-15,109 MiB by driver); nvidia-smi shows 15,360 MiB",
        ),
    )
}

DEVICE_TYPES = ("cuda", "cpu")


@dataclass(frozen=True)
class PlanTarget:
    """Where a plan is for: a device type and the memory its training step may use.

    ``capacity_bytes`` is held against the estimate's peak (the fraction applies to it). For a card it is the
    usable memory (:attr:`Card.usable_bytes`); for a size given by the user it is that size, taken like
    ``--memory-budget`` -- the memory the step may use, nothing subtracted. ``cublas_workspace_bytes`` is
    added to CUDA estimates (0 on the CPU).
    """

    name: str
    device_type: str
    capacity_bytes: int
    cublas_workspace_bytes: int
    card: Card | None = None

    @property
    def source(self) -> str:
        """Where the capacity comes from, in words."""
        if self.card is not None:
            return f"{self.card.source}; less {CUDA_CONTEXT_BYTES // MiB} MiB CUDA context"
        return "given by the user"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source"] = self.source
        return data


def _accepted() -> str:
    return f"a card ({', '.join(CARDS)}) or a memory size such as '24GiB'"


def resolve_target(spec: str | int | PlanTarget, *, device_type: str | None = None) -> PlanTarget:
    """Parse a target: a card name from :data:`CARDS` (case-insensitive) or a memory size (``"24GiB"``, bytes).

    ``device_type`` (``"cuda"`` or ``"cpu"``) applies to memory sizes and defaults to ``"cuda"`` -- planning
    is mostly for a GPU you do not have; a card is always CUDA. Raises ``ValueError`` naming the value and
    listing the accepted cards.
    """
    if isinstance(spec, PlanTarget):
        return spec
    if device_type is not None and device_type not in DEVICE_TYPES:
        raise ValueError(
            f"invalid target device type {device_type!r}: expected one of {', '.join(DEVICE_TYPES)}"
        )
    if isinstance(spec, str) and spec.strip().lower() in CARDS:
        card = CARDS[spec.strip().lower()]
        if device_type == "cpu":
            raise ValueError(f"target {spec!r} is a CUDA card; device_type='cpu' needs a memory size")
        return PlanTarget(card.name, "cuda", card.usable_bytes, card.cublas_workspace_bytes, card)
    try:
        capacity = parse_bytes(spec)
    except ValueError:
        raise ValueError(f"invalid target {spec!r}: expected {_accepted()}") from None
    kind = device_type or "cuda"
    workspace = CUBLAS_WORKSPACE_BYTES_SM90 if kind == "cuda" else 0  # unknown generation: the larger
    name = spec.strip() if isinstance(spec, str) else f"{capacity} bytes"
    return PlanTarget(name, kind, capacity, workspace)
