"""Every rank learns how a step went on every other rank, in the same collective order, without a deadlock.

Under DDP or FSDP a training step is full of collectives (FSDP all-gathers parameters before each sharded
module and reduce-scatters gradients after it). A rank that runs out of memory -- or raises anything -- in
the middle of a step never reaches the next one, and the other ranks would wait in it until the process
group's timeout. The protocol here, after Composer's sync hooks (``composer/trainer/trainer.py``,
``_create_sync_hook``), keeps every rank at the same collective:

- each rank exchanges one status code with all ranks (one ``all_gather`` of an int) at **sync points**
  (:func:`sync_points`): before the forward and before the backward of every FSDP-sharded module and of the
  model itself; after each sharded module's backward, right before FSDP's post-backward reduce-scatter of its
  gradients; once at the end of every backward, ahead of FSDP's final callback (where the reduce-scatter of a
  module whose inputs need no gradient runs); and once at the end of the step (:meth:`StepAgreement.finish`);
- inside the step a rank sends ``RUNNING``; a rank that failed sends ``OUT_OF_MEMORY`` or ``ERROR`` from its
  handler, repeatedly, until no rank is still running: a rank still inside the step meets that exchange at
  its next sync point, learns of the failure and leaves the step by raising
  :class:`~batchlab.errors.PeerFailureError` (then sends ``PEER``); a rank that finished sends ``DONE``;
- the last exchange has no ``RUNNING`` in it and is the same list on every rank, so every rank draws the
  same verdict (:class:`Verdict`): an error anywhere makes every rank raise; otherwise an out-of-memory
  anywhere makes every rank step back together (the search: a failed probe; ``OOMGuard``: a smaller
  micro-batch); otherwise the step counts.

**What is guaranteed, and why.** The protocol lines up only if a failed rank's handler exchange meets the
other ranks at a sync point, i.e. if no collective of the model's own lies between the last sync point the
failed rank passed and the next one the others reach. FSDP2's collectives sit at the edges of each sharded
module -- the all-gather in its pre-forward and pre-backward hooks, the reduce-scatter in its post-backward
(``RegisterPostBackwardFunction`` on the module's inputs, or FSDP's final callback) -- and there is a sync
point on each side of each of them. So a failure anywhere in the forward, the loss, a sharded module's
backward (after its all-gather, before its reduce-scatter: the peers meet the failed rank at the sync point
ahead of that reduce-scatter), between modules, in the optimizer step or in the batch's allocation makes
every rank step back (or raise) together, and the process group stays in step for the next try.

What it cannot cover: a failure *inside* one of those collectives' own work on one rank -- the all-gather's
output or the reduce-scatter's input buffer that this rank cannot allocate while the others already wait in
the collective -- or inside a collective the model issues itself (tensor parallelism, a custom all-reduce).
There the peers wait in that collective until its timeout -- no rank can step back then: gloo closes the
group's connections at the timeout ("Application timeout caused pair closure" on the waiting rank,
"Connection closed by peer" on the others; measured, torch 2.14.1) and every later collective fails at once.
What is guaranteed instead: the wait is bounded -- the search and ``OOMGuard`` run each try under
:func:`batchlab.devices.ranks.collective_timeout` (``collective_timeout=``, default
:data:`batchlab.defaults.COLLECTIVE_TIMEOUT_S`, not the group's 30 min) -- and every rank then raises
:class:`~batchlab.errors.ProcessGroupFailedError`, which names what each rank raised: the accounts go
through the group's c10d store (:meth:`~batchlab.devices.ranks.Ranks.tell_everyone`), which outlives the
group. On nccl the watchdog aborts the processes at that timeout instead.

Not distributed (no process group), nothing here runs: the caller never builds a :class:`StepAgreement`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from batchlab.defaults import COLLECTIVE_TIMEOUT_S
from batchlab.errors import PeerFailureError, ProcessGroupFailedError

# The codes on the wire, one int per rank per exchange.
RUNNING = 0  # inside the step, at a sync point
DONE = 1  # finished its part of the step
OUT_OF_MEMORY = 2  # ran out of memory
ERROR = 3  # raised something else (or ran out of memory where it cannot step back)
PEER = 4  # left the step because another rank failed

Exchange = Callable[[int], Sequence[int]]  # this rank's code -> every rank's, in rank order
Tell = Callable[[str], Sequence[str | None]]  # this rank's account -> every rank's, not through the group


def account(code: int, detail: BaseException | str | None = None) -> str:
    """A rank's own words for its final ``code`` (``detail``: its error, or its out-of-memory message)."""
    if code == OUT_OF_MEMORY:
        return f"ran out of memory ({detail})" if detail else "ran out of memory"
    if code == ERROR:
        if isinstance(detail, BaseException):
            lines = str(detail).strip().splitlines()
            return f"raised {type(detail).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        return f"raised {detail}" if detail else "raised an error"
    if code == PEER:
        return "left the step for another rank's failure"
    return "finished its part of the step"


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
    """One step's status exchanges (module docstring): :meth:`checkpoint` at sync points, :meth:`finish` once.

    ``tell`` (:meth:`batchlab.devices.ranks.Ranks.tell_everyone`) is the way round a failed group: when the
    final exchange itself raises, every rank sends its account through it and raises
    :class:`~batchlab.errors.ProcessGroupFailedError` with all of them; ``where`` starts that message.
    """

    def __init__(self, exchange: Exchange, tell: Tell | None = None, where: str = "this step"):
        self.exchange, self.tell, self.where = exchange, tell, where

    @classmethod
    def among(cls, ranks: Any, where: str, collective_timeout: float | None) -> StepAgreement:
        """The agreement of ``ranks`` (a :class:`~batchlab.devices.ranks.Ranks`): statuses through its group,
        accounts through its store, waited for up to ``collective_timeout`` seconds (None:
        :data:`~batchlab.defaults.COLLECTIVE_TIMEOUT_S`) -- what the search's lockstep and OOMGuard both use."""
        wait_s = collective_timeout or COLLECTIVE_TIMEOUT_S
        return cls(ranks.all_gather_ints, functools.partial(ranks.tell_everyone, wait_s=wait_s), where=where)

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

    def finish(self, code: int, own: str = "") -> Verdict:
        """This rank's end of the step (``DONE``, ``OUT_OF_MEMORY``, ``ERROR`` or ``PEER``): exchange until no
        rank is still running, and return the verdict every rank shares.

        If the exchange raises, the group has failed (a collective of the step timed out and gloo closed its
        connections, or a peer did): with ``tell``, every rank's account (``own``: this rank's, default
        :func:`account` of ``code``) goes round the group and :class:`~batchlab.errors.ProcessGroupFailedError`
        names them all; without it the exchange's own error propagates.
        """
        if code not in (DONE, OUT_OF_MEMORY, ERROR, PEER):
            raise ValueError(f"invalid final status {code!r}: expected DONE, OUT_OF_MEMORY, ERROR or PEER")
        try:
            codes = self._run(code)
            while RUNNING in codes:  # a rank still in the step meets this at its next sync point
                codes = self._run(code)
        except Exception as exc:
            if self.tell is None:
                raise
            reports = list(self.tell(own or account(code)))
            said = "; ".join(
                f"rank {rank} {report if report is not None else 'sent no word'}"
                for rank, report in enumerate(reports)
            )
            raise ProcessGroupFailedError(
                f"{self.where}: the process group failed mid-step (its last exchange raised {type(exc).__name__}) "
                f"and cannot be used any more: {said}. A rank failed inside a collective the others already waited in, where no sync point "
                "reaches them (batchlab.devices.agreement); restart the job",
                reports=reports,
            ) from exc
        return Verdict(codes)


class _SyncBeforeReduce(torch.autograd.Function):
    """The identity on a sharded module's inputs; its backward is a sync point after the module's own backward.

    Applied by a forward pre-hook that runs after FSDP's (FSDP registers its own with ``prepend=True``), so in
    the backward it runs *before* FSDP's ``RegisterPostBackwardFunction`` on the same inputs, which
    reduce-scatters the module's gradients: a rank that failed inside the module's backward meets the others
    here, not in that reduce-scatter.
    """

    @staticmethod
    def forward(ctx: Any, agreement: StepAgreement, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.agreement = agreement
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.agreement.checkpoint()
        return (None, *grads)


def _before_reduce(agreement: StepAgreement) -> Callable[..., Any]:
    """A forward pre-hook (``with_kwargs``) that routes the module's grad-requiring inputs through
    :class:`_SyncBeforeReduce`."""

    def hook(_module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return None
        leaves, spec = tree_flatten((args, kwargs))
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        if not where:  # no input needs a gradient: FSDP reduce-scatters in its final callback (see below)
            return None
        for index, tensor in zip(
            where, _SyncBeforeReduce.apply(agreement, *[leaves[i] for i in where]), strict=True
        ):
            leaves[index] = tensor
        return tree_unflatten(leaves, spec)

    return hook


@contextlib.contextmanager
def sync_points(modules: Sequence[torch.nn.Module], agreement: StepAgreement) -> Iterator[None]:
    """The sync points of the module docstring on the modules given and every FSDP-sharded module inside them
    (``torch.distributed.fsdp.FSDPModule``); removed on exit.

    - before the forward and before the backward of each: hooks with ``prepend=True``, ahead of FSDP's own
      (before its all-gather);
    - after the backward of each sharded module: :class:`_SyncBeforeReduce` on its inputs (before its
      reduce-scatter);
    - at the end of every backward: an autograd engine callback, queued at the backward's first sync point --
      the outermost module's, which runs before FSDP's root pre-backward queues FSDP's final callback -- so it
      runs first (callbacks run in the order queued).
    """
    from torch.distributed.fsdp import FSDPModule

    targets: list[torch.nn.Module] = []
    for root in modules:
        for module in root.modules():
            if (module is root or isinstance(module, FSDPModule)) and module not in targets:
                targets.append(module)
    queued = [False]  # the end-of-backward sync point is queued for the backward under way

    def at_end_of_backward() -> None:
        queued[0] = False
        agreement.checkpoint()

    def before_forward(*_: object) -> None:
        agreement.checkpoint()

    def before_backward(*_: object) -> None:
        if not queued[0]:
            queued[0] = True
            # torch's autograd engine runs these once the backward's graph is done (FSDP queues its own alike)
            torch.autograd.Variable._execution_engine.queue_callback(at_end_of_backward)
        agreement.checkpoint()

    handles = []
    try:
        for module in targets:
            handles.append(module.register_forward_pre_hook(before_forward, prepend=True))
            handles.append(module.register_full_backward_pre_hook(before_backward, prepend=True))
            if isinstance(module, FSDPModule):
                handles.append(module.register_forward_pre_hook(_before_reduce(agreement), with_kwargs=True))
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

    Then :func:`_drop_unsharded_grads`: a backward left midway leaves gradients that neither does.
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
            _drop_unsharded_grads(module)


def _drop_unsharded_grads(module: torch.nn.Module) -> None:
    """Drop the gradients a backward left on ``module``'s *unsharded* parameters before FSDP reduced them.

    A rank that left a backward at the sync point ahead of a module's reduce-scatter has that module's whole
    gradient in autograd's ``.grad`` of FSDP's unsharded parameters; ``reset_iter_state()`` reshards but keeps
    it (measured, torch 2.14.1), so the retry's backward would *add* to it -- a stale gradient on this rank
    only, the ranks' updates no longer the same. FSDP offers no public handle on those parameters: this is
    batchlab's one access to FSDP2's internals (``_get_fsdp_state()._fsdp_param_groups[*].fsdp_params``),
    feature-checked, and a no-op where the layout differs; tests/test_fsdp.py proves its effect (the
    retried run's losses equal those of a run whose failure came before any backward).
    """
    state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
    for group in getattr(state, "_fsdp_param_groups", None) or ():
        for param in getattr(group, "fsdp_params", ()):
            unsharded = getattr(param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
            if getattr(param, "unsharded_accumulated_grad", None) is not None:
                param.unsharded_accumulated_grad = None


__all__ = [
    "DONE",
    "ERROR",
    "OUT_OF_MEMORY",
    "PEER",
    "RUNNING",
    "StepAgreement",
    "Verdict",
    "account",
    "reset_after_failure",
    "sync_points",
]
