"""The ranks of a ``torch.distributed`` run as batchlab sees them: who am I, how many are we, one int each.

Everything here is a fact about the process group or one small collective; what to *do* with the answers is
decided above (the agreement protocol in :mod:`batchlab.devices.agreement`, the search, the guard). When no
process group is initialised :func:`current_ranks` says so with ``None`` and nothing here runs a collective:
the single-process path stays as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

_REPORTS = "batchlab/failed-step/"  # the store's keys for :meth:`Ranks.tell_everyone`, + the global rank


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world_size`` ranks of ``group`` (None: the default group)."""

    rank: int
    world_size: int
    group: Any = None

    def all_gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order (see :func:`all_gather_ints`)."""
        return all_gather_ints(value, self.group)

    def tell_everyone(self, text: str, wait_s: float) -> list[str | None]:
        """Every rank's ``text``, in rank order, through the c10d store the process group was built from --
        not through the group, so it works when the group itself has failed (a gloo timeout closes its
        connections for good). Waits up to ``wait_s`` for the others' texts; a rank that sent none by then
        (crashed, or still waiting in a collective) is None. Without a store only this rank's is known.

        The store is the default group's (``torch.distributed.distributed_c10d._get_default_store``: no
        public accessor; feature-checked), which torchrun's agent hosts outside the ranks' processes.
        """
        import torch.distributed as dist

        get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
        store = get_store() if get_store is not None else None
        if store is None:
            return [text if rank == self.rank else None for rank in range(self.world_size)]
        group = self.group if self.group is not None else dist.group.WORLD
        keys = [_REPORTS + str(dist.get_global_rank(group, r)) for r in range(self.world_size)]
        store.set(keys[self.rank], text)
        deadline = time.monotonic() + wait_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [store.get(key).decode() if store.check([key]) else None for key in keys]


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


@contextlib.contextmanager
def collective_timeout(seconds: float | None, group: Any = None) -> Iterator[None]:
    """Bound every collective issued on ``group`` inside the block to ``seconds``; the group's own timeout
    (``init_process_group(timeout=...)``: 30 min for gloo, 10 min for nccl by default) is back on exit. A
    group whose own timeout is already shorter keeps it.

    ``torch.distributed.set_timeout`` (torch >= 2.8) changes the timeout of the group's later work; the one in
    force is read from the backend's options (``options._timeout``, as ``init_process_group`` stores it) to
    restore it. ``seconds=None``, or a torch or backend without either, leaves the group as it is. Once a
    gloo collective times out the group's connections are closed: it fails every later collective at once.
    nccl's watchdog instead aborts the process at the timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
    """
    import torch.distributed as dist

    if seconds is None or not hasattr(dist, "set_timeout"):
        yield
        return
    pg = group if group is not None else dist.group.WORLD
    device = torch.device("cuda") if dist.get_backend(pg) == "nccl" else torch.device("cpu")
    get_backend = getattr(pg, "_get_backend", None)
    before = getattr(getattr(get_backend(device), "options", None), "_timeout", None) if get_backend else None
    bound = datetime.timedelta(seconds=seconds)
    if not isinstance(before, datetime.timedelta) or before <= bound:  # a bound, never a longer wait
        yield
        return
    dist.set_timeout(bound, pg)
    try:
        yield
    finally:
        dist.set_timeout(before, pg)


__all__ = ["Ranks", "all_gather_ints", "collective_timeout", "current_ranks", "require_ranks"]
