"""The ranks of a ``torch.distributed`` run as batchlab sees them: who am I, how many are we, one int each.

Everything here is a fact about the process group or one small collective; what to *do* with the answers is
decided above (the agreement protocol in :mod:`batchlab.devices.agreement`, the search, the guard). When no
process group is initialised :func:`current_ranks` says so with ``None`` and nothing here runs a collective:
the single-process path stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world_size`` ranks of ``group`` (None: the default group)."""

    rank: int
    world_size: int
    group: Any = None

    def all_gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order (see :func:`all_gather_ints`)."""
        return all_gather_ints(value, self.group)


def current_ranks(group: Any = None) -> Ranks | None:
    """The ranks of ``group`` (default: the world) when a process group is initialised, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Ranks(dist.get_rank(group), dist.get_world_size(group), group)


def require_ranks(group: Any = None, *, what: str) -> Ranks:
    """:func:`current_ranks`, or a one-line error saying that ``what`` needs an initialised process group."""
    ranks = current_ranks(group)
    if ranks is None:
        raise RuntimeError(
            f"{what} needs an initialised process group (torch.distributed.is_initialized() is False): call "
            "torch.distributed.init_process_group() on every rank first (torchrun sets RANK and WORLD_SIZE)"
        )
    return ranks


def all_gather_ints(value: int, group: Any = None) -> list[int]:
    """Every rank's ``value``, in rank order, through one all_gather (gloo: CPU tensors; nccl: CUDA tensors)."""
    import torch.distributed as dist

    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [int(t.item()) for t in everyone]


__all__ = ["Ranks", "all_gather_ints", "current_ranks", "require_ranks"]
