"""Every rank learns how a step went on every other rank, in the same collective order, without a deadlock.

Under DDP or FSDP a training step is full of collectives (FSDP all-gathers parameters before each sharded
module and reduce-scatters gradients after it). A rank that runs out of memory -- or raises anything -- in
the middle of a step never reaches the next one, and the other ranks would wait in it until the process
group's timeout. The protocol here, after Composer's sync hooks (``composer/trainer/trainer.py``,
``_create_sync_hook``), keeps every rank at the same collective:

- each rank exchanges one status code with all ranks (one ``all_gather`` of an int) at **sync points**:
  before the forward and before the backward of every FSDP-sharded module and of the model itself
  (:func:`sync_points`), and once at the end of the step (:meth:`StepAgreement.finish`);
- inside the step a rank sends ``RUNNING``; a rank that failed sends ``OUT_OF_MEMORY`` or ``ERROR`` from its
  handler, repeatedly, until no rank is still running: a rank still inside the step meets that exchange at
  its next sync point, learns of the failure and leaves the step by raising
  :class:`~batchlab.errors.PeerFailureError` (then sends ``PEER``); a rank that finished sends ``DONE``;
- the last exchange has no ``RUNNING`` in it and is the same list on every rank, so every rank draws the
  same verdict (:class:`Verdict`): an error anywhere makes every rank raise; otherwise an out-of-memory
  anywhere makes every rank step back together (the search: a failed probe; ``OOMGuard``: a smaller
  micro-batch); otherwise the step counts.

What it cannot cover: a failure between one of the model's own collectives and the next sync point, while
the other ranks wait in that collective -- inside a sharded module's backward, after its all-gather and
before its reduce-scatter, or inside the all-gather's own allocation. There the peers wait until the process
group's timeout, as without the protocol. Forward-pass failures (activations: where a larger batch usually
runs out), failures in the loss, the optimizer step, or the batch's own allocation are covered.

Not distributed (no process group), nothing here runs: the caller never builds a :class:`StepAgreement`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from batchlab.errors import PeerFailureError

# The codes on the wire, one int per rank per exchange.
RUNNING = 0  # inside the step, at a sync point
DONE = 1  # finished its part of the step
OUT_OF_MEMORY = 2  # ran out of memory
ERROR = 3  # raised something else (or ran out of memory where it cannot step back)
PEER = 4  # left the step because another rank failed

Exchange = Callable[[int], Sequence[int]]  # this rank's code -> every rank's, in rank order


@dataclass(frozen=True)
class Verdict:
    """What every rank concluded from the last exchange (the same list on every rank)."""

    codes: tuple[int, ...]

    @property
    def error_ranks(self) -> list[int]:
        return [rank for rank, code in enumerate(self.codes) if code == ERROR]

    @property
    def oom_ranks(self) -> list[int]:
        return [rank for rank, code in enumerate(self.codes) if code == OUT_OF_MEMORY]

    @property
    def ok(self) -> bool:
        return not self.error_ranks and not self.oom_ranks


class StepAgreement:
    """One step's status exchanges (module docstring): :meth:`checkpoint` at sync points, :meth:`finish` once."""

    def __init__(self, exchange: Exchange):
        self.exchange = exchange

    def _run(self, code: int) -> tuple[int, ...]:
        return tuple(int(value) for value in self.exchange(code))

    def checkpoint(self) -> None:
        """A sync point inside the step: raise :class:`PeerFailureError` if another rank has failed."""
        codes = self._run(RUNNING)
        failed = [rank for rank, code in enumerate(codes) if code in (OUT_OF_MEMORY, ERROR)]
        if failed:
            out_of_memory = all(codes[rank] == OUT_OF_MEMORY for rank in failed)
            what = "ran out of memory" if out_of_memory else "raised an error"
            raise PeerFailureError(
                f"rank(s) {failed} {what} in this step; this rank leaves it too",
                ranks=failed,
                out_of_memory=out_of_memory,
            )

    def finish(self, code: int) -> Verdict:
        """This rank's end of the step (``DONE``, ``OUT_OF_MEMORY``, ``ERROR`` or ``PEER``): exchange until no
        rank is still running, and return the verdict every rank shares."""
        if code not in (DONE, OUT_OF_MEMORY, ERROR, PEER):
            raise ValueError(f"invalid final status {code!r}: expected DONE, OUT_OF_MEMORY, ERROR or PEER")
        codes = self._run(code)
        while RUNNING in codes:  # a rank still in the step meets this at its next sync point
            codes = self._run(code)
        return Verdict(codes)


@contextlib.contextmanager
def sync_points(modules: Sequence[torch.nn.Module], agreement: StepAgreement) -> Iterator[None]:
    """A sync point before the forward and before the backward of each module given and of every
    FSDP-sharded module inside them (``torch.distributed.fsdp.FSDPModule``), ahead of FSDP's own hooks
    (``prepend=True``: before its all-gather); removed on exit."""
    from torch.distributed.fsdp import FSDPModule

    targets: list[torch.nn.Module] = []
    for root in modules:
        for module in root.modules():
            if (module is root or isinstance(module, FSDPModule)) and module not in targets:
                targets.append(module)

    def hook(*_: object) -> None:
        agreement.checkpoint()

    handles = []
    try:
        for module in targets:
            handles.append(module.register_forward_pre_hook(hook, prepend=True))
            handles.append(module.register_full_backward_pre_hook(hook, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def reset_after_failure(modules: Sequence[torch.nn.Module]) -> None:
    """Put every FSDP2 root inside ``modules`` back to a clean iteration after a step some rank left midway.

    A rank that raised inside a module's forward left that module unsharded and its post-forward order (which
    FSDP's backward prefetch walks) half-recorded; a rank that left at the next sync point recorded one more
    module. Without a reset the retry's collectives would differ between ranks -- one all-gathers where the
    other finds the parameters unsharded, or prefetches another module -- and mismatch. torch >= 2.14 ships
    ``FSDPModule.reset_iter_state()`` for exactly this (reshard every group, clear the per-iteration trackers,
    drop in-flight reductions; called on the root); before it, ``reshard()`` on every sharded module is the
    public part of it. Every rank runs it after the verdict, before any retry.
    """
    from torch.distributed.fsdp import FSDPModule

    for root in modules:
        sharded = [module for module in root.modules() if isinstance(module, FSDPModule)]
        inner = {id(child) for module in sharded for child in module.modules() if child is not module}
        for module in sharded:
            if hasattr(module, "reset_iter_state"):  # torch >= 2.14: a feature check, not a version check
                if id(module) not in inner:  # the roots: what the top-level fully_shard was applied to
                    module.reset_iter_state()
            else:
                module.reshard()


__all__ = [
    "DONE",
    "ERROR",
    "OUT_OF_MEMORY",
    "PEER",
    "RUNNING",
    "StepAgreement",
    "Verdict",
    "reset_after_failure",
    "sync_points",
]
