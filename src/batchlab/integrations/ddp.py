"""``find_batch_size`` under ``torch.distributed`` (torchrun, DDP): measure per rank, agree on the minimum.

Every rank runs its own search on its own device -- the ranks' steps need no communication (a probe runs the
plain model: DistributedDataParallel's gradient hooks only fire after a forward through the DDP wrapper) -- then
the ranks exchange their answers in one collective and all take the smallest, so a rank with less free memory
(another process on its GPU, a smaller card) decides for everyone. The global batch is
``micro x accumulation x world size``; with ``target_global_batch`` the accumulation comes from
:func:`batchlab.scaling.plan_batch`, so the global batch is what was asked for.

A rank whose search fails still takes part in the exchange (it sends 0 for "does not fit", -1 for an error),
so no rank hangs in a collective that another never reaches; then every rank raises.

Not counted in a probe: DDP's gradient buckets (about one more copy of the gradients, ``bucket_cap_mb`` at a
time) and the communication library's buffers -- the fraction's margin (0.90 of capacity by default) covers
them on most models; lower it (``batch=0.8``) for very large ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab.advice.scaling import BatchPlan, plan_batch
from batchlab.errors import BatchlabError, DoesNotFitError
from batchlab.fit import FitResult, find_batch_size

log = logging.getLogger("batchlab")

__all__ = ["DistributedFitResult", "agree_on_batch_size", "all_gather_ints", "find_batch_size_distributed"]

_DOES_NOT_FIT = 0  # what a rank sends when even the smallest size does not fit
_FAILED = -1  # what a rank sends when its search raised anything else


@dataclass
class DistributedFitResult:
    """The batch every rank uses, how it was agreed, and the global batch it makes.

    ``batch_size`` (the per-rank micro-batch) is the same on every rank: the minimum of ``per_rank``, each
    rank's own answer. ``global_batch = batch_size * accumulation_steps * world_size``. ``local`` is this rank's
    own :class:`~batchlab.FitResult` (its probes and memory); ``plan`` is set when a target global batch was
    given.
    """

    batch_size: int
    accumulation_steps: int
    world_size: int
    rank: int
    global_batch: int
    per_rank: list[int]
    local: FitResult
    plan: BatchPlan | None = None
    limited_by_rank: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["local"] = self.local.to_dict()
        return data

    def summary(self) -> str:
        accum = f" x {self.accumulation_steps} accumulation" if self.accumulation_steps > 1 else ""
        return (
            f"batch {self.batch_size} per rank{accum} x {self.world_size} ranks = global batch {self.global_batch} "
            f"(ranks found {self.per_rank}; rank {self.limited_by_rank} has the least room)"
        )


def all_gather_ints(value: int, group: Any = None) -> list[int]:
    """Every rank's ``value``, in rank order, through one all_gather (gloo: CPU tensors; nccl: CUDA tensors)."""
    import torch.distributed as dist

    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [int(t.item()) for t in everyone]


def agree_on_batch_size(
    local: Callable[[], int], gather: Callable[[int], Sequence[int]], *, rank: int
) -> tuple[int, list[int]]:
    """Run ``local()`` (this rank's search) and agree with the other ranks on the smallest answer.

    ``gather(value)`` must return every rank's value in rank order (``torch.distributed.all_gather``, or a
    framework's, e.g. Lightning's ``strategy.all_gather``). Every rank calls it exactly once, whatever ``local``
    did: a failure is sent as 0 (does not fit) or -1 (any other error) and re-raised after the exchange, and the
    ranks that did not fail raise :class:`~batchlab.BatchlabError` naming the rank that did.

    Taking the minimum of the gathered list is what an all-reduce with ``ReduceOp.MIN`` computes; gathering
    instead keeps each rank's answer for the report.
    """
    error: BaseException | None = None
    try:
        value = int(local())
    except DoesNotFitError as exc:
        value, error = _DOES_NOT_FIT, exc
    except Exception as exc:  # re-raised below, after the collective every rank must reach
        value, error = _FAILED, exc
    values = [int(v) for v in gather(value)]
    if error is not None:
        raise error
    failed = [r for r, v in enumerate(values) if v == _FAILED]
    if failed:
        raise BatchlabError(f"the batch-size search failed on rank(s) {failed}; see their logs")
    too_big = [r for r, v in enumerate(values) if v == _DOES_NOT_FIT]
    if too_big:
        raise BatchlabError(f"even the smallest batch does not fit on rank(s) {too_big}")
    agreed = min(values)
    if agreed < values[rank]:
        log.info("batchlab: rank %d could run %d; all ranks use %d", rank, values[rank], agreed)
    return agreed, values


def find_batch_size_distributed(
    workload: Any,
    *,
    target_global_batch: int | None = None,
    grad_accum: int | None = None,
    group: Any = None,
    gather: Callable[[int], Sequence[int]] | None = None,
    **kwargs: Any,
) -> DistributedFitResult:
    """:func:`batchlab.find_batch_size` on every rank, then the same answer on all of them.

    Call it on every rank (after ``torch.distributed.init_process_group``), with the rank's own model on its
    own device. ``kwargs`` go to :func:`~batchlab.find_batch_size` unchanged (``device``, ``batch``,
    ``memory_budget``, ``preserve``, ...).

    Args:
        target_global_batch: the global batch to keep; the accumulation steps are planned with
            :func:`~batchlab.scaling.plan_batch` from the agreed micro-batch (which then never exceeds the
            per-rank share: ``max_batch_size`` is capped at ``ceil(target / world)``).
        grad_accum: without a target, the accumulation steps in the reported global batch (default: the
            workload's ``grad_accum``, else 1).
        group: the process group (default: the world).
        gather: replaces the exchange (tests, or a framework's own all_gather); see :func:`agree_on_batch_size`.

    Without an initialised process group it is :func:`~batchlab.find_batch_size` on one rank (world size 1).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    rank = dist.get_rank(group) if distributed else 0
    if target_global_batch is not None:
        per_rank_share = -(-int(target_global_batch) // world)
        cap = kwargs.get("max_batch_size")
        kwargs["max_batch_size"] = min(cap, per_rank_share) if cap else per_rank_share
    if gather is None:
        gather = (lambda value: all_gather_ints(value, group)) if distributed else (lambda value: [value])

    local_result: list[FitResult] = []

    def search() -> int:
        local_result.append(find_batch_size(workload, **kwargs))
        return local_result[0].batch_size

    agreed, per_rank = agree_on_batch_size(search, gather, rank=rank)
    local = local_result[0]
    notes = []
    if agreed < local.batch_size:
        notes.append(
            f"this rank alone could run {local.batch_size}; rank {per_rank.index(agreed)} limits all ranks"
        )
    plan = None
    if target_global_batch is not None:
        plan = plan_batch(int(target_global_batch), agreed, world)
        micro, accum = plan.micro_batch, plan.accumulation_steps
        notes.append(plan.note)
    else:
        micro = agreed
        accum = grad_accum if grad_accum is not None else int(getattr(workload, "grad_accum", 1) or 1)
    return DistributedFitResult(
        batch_size=micro,
        accumulation_steps=accum,
        world_size=world,
        rank=rank,
        global_batch=micro * accum * world,
        per_rank=per_rank,
        local=local,
        plan=plan,
        limited_by_rank=per_rank.index(agreed),
        notes=notes,
    )
