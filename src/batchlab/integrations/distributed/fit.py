"""``find_batch_size`` under ``torch.distributed`` (torchrun; DDP or FSDP2): one answer that every rank runs.

Two ways to search, chosen by the model:

- **Independent** (a model that is not sharded, e.g. the module that DDP wraps): every rank runs its own search
  on its own device -- a probe runs the plain model, whose step needs no communication (DDP's gradient hooks
  fire only after a forward through the wrapper) -- then the ranks exchange their answers in one collective
  and all take the smallest (:func:`~batchlab.integrations.distributed.agreement.agree_on_batch_size`).
- **Lockstep** (a model with FSDP2 ``fully_shard`` modules, or ``lockstep=True``): the step all-gathers and
  reduce-scatters, so every rank probes the same size at the same time on a
  :class:`~batchlab.devices.lockstep.LockstepDevice`: each probe measures each rank's whole step -- its shard
  of the parameters, gradients and optimizer state, the unsharded parameters and the all-gather /
  reduce-scatter buffers, and on the CPU the whole process's resident memory, the communication library's
  buffers included -- and every rank's search sees the tightest rank's reading, scaled to a common budget,
  so every rank takes the same decisions. Ranks with different room (``memory_budget`` per rank, mixed
  cards) get the batch every rank can run; the result names the rank that limited it and each rank's peak.
  An out-of-memory error on one rank ends the probe on every rank (:mod:`batchlab.devices.agreement`); a
  failure where no sync point reaches the other ranks (inside a collective they wait in) makes every rank
  raise :class:`~batchlab.errors.ProcessGroupFailedError` within ``collective_timeout`` seconds.

The global batch is ``micro x accumulation x world size``; with ``target_global_batch`` the accumulation
comes from :func:`batchlab.advice.scaling.plan_batch` and is exact, or the call refuses (gradient averaging,
:mod:`~batchlab.integrations.distributed.agreement`).

Not counted in an independent probe: DDP's gradient buckets (about one more copy of the gradients,
``bucket_cap_mb`` at a time) and the communication library's buffers -- the fraction's margin (0.90 of
capacity by default) covers them on most models; lower it (``batch=0.8``) for very large ones. In lockstep
on the CPU the readings also hold batchlab's copy of this rank's shard of the state (it is not netted out
across ranks): conservative by that much.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab.advice.scaling import BatchPlan, plan_batch
from batchlab.defaults import COLLECTIVE_TIMEOUT_S
from batchlab.devices import resolve_device
from batchlab.devices.lockstep import LockstepDevice
from batchlab.devices.ranks import current_ranks, require_ranks
from batchlab.fit import FitResult, find_batch_size
from batchlab.integrations.distributed.agreement import (
    agree_on_batch_size,
    check_even_split,
    check_same_everywhere,
)
from batchlab.units import format_bytes, parse_bytes

_UNSET = -1  # on the wire: an argument left as None


@dataclass
class DistributedFitResult:
    """The batch every rank uses, how it was agreed, and the global batch it makes.

    ``batch_size`` (the per-rank micro-batch) is the same on every rank. ``global_batch = batch_size *
    accumulation_steps * world_size``. ``per_rank`` is each rank's own answer (independent search; in lockstep
    every rank ran the same sizes, so it is the agreed size on each). ``local`` is this rank's own
    :class:`~batchlab.FitResult` (its probes and memory); ``plan`` is set when a target global batch was given.
    In lockstep, ``rank_peak_bytes`` is each rank's own measured peak at the agreed size, ``rank_budget_bytes``
    each rank's budget, and ``limited_by_rank`` the rank that used the largest share of its budget.
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
    lockstep: bool = False
    rank_peak_bytes: list[int | None] = field(default_factory=list)
    rank_budget_bytes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["local"] = self.local.to_dict()
        return data

    def summary(self) -> str:
        accum = f" x {self.accumulation_steps} accumulation" if self.accumulation_steps > 1 else ""
        head = f"batch {self.batch_size} per rank{accum} x {self.world_size} ranks = global batch {self.global_batch}"
        if self.lockstep and self.rank_peak_bytes:
            peaks = ", ".join(
                f"rank {r}: {format_bytes(p)} of {format_bytes(b)}"
                for r, (p, b) in enumerate(zip(self.rank_peak_bytes, self.rank_budget_bytes, strict=True))
            )
            return f"{head} (ranks probed in lockstep; peaks {peaks}; rank {self.limited_by_rank} has the least room)"
        return f"{head} (ranks found {self.per_rank}; rank {self.limited_by_rank} has the least room)"


def is_sharded(model: Any) -> bool:
    """True when ``model`` holds a module sharded by FSDP2's ``fully_shard`` (its step communicates)."""
    if not isinstance(model, torch.nn.Module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def find_batch_size_distributed(
    workload: Any,
    *,
    target_global_batch: int | None = None,
    grad_accum: int | None = None,
    group: Any = None,
    gather: Callable[[int], Sequence[int]] | None = None,
    lockstep: bool | None = None,
    collective_timeout: float | None = COLLECTIVE_TIMEOUT_S,
    **kwargs: Any,
) -> DistributedFitResult:
    """:func:`batchlab.find_batch_size` on every rank, then the same answer on all of them.

    Call it on every rank (after ``torch.distributed.init_process_group``), with the rank's own model on its
    own device. ``kwargs`` go to :func:`~batchlab.find_batch_size` unchanged (``device``, ``batch``,
    ``memory_budget`` -- this rank's own: ranks may differ --, ``preserve``, ...).

    Args:
        target_global_batch: the global batch to keep; it must be a multiple of the world size (every rank
            the same share) and the same on every rank. The accumulation steps are planned with
            :func:`~batchlab.advice.scaling.plan_batch` from the agreed micro-batch, which never exceeds the
            per-rank share (``max_batch_size`` is capped at ``target / world``).
        grad_accum: without a target, the accumulation steps in the reported global batch (default: the
            workload's ``grad_accum``, else 1); the same on every rank.
        group: the process group (default: the world).
        gather: replaces the exchange of answers (tests, or a framework's own all_gather); see
            :func:`~batchlab.integrations.distributed.agreement.agree_on_batch_size`.
        lockstep: probe every rank together (module docstring); default: when the workload's model is sharded
            by FSDP2. Needs an initialised process group.
        collective_timeout: in lockstep, the seconds any collective of a probe may wait before every rank
            raises :class:`~batchlab.errors.ProcessGroupFailedError` (default
            :data:`~batchlab.defaults.COLLECTIVE_TIMEOUT_S`; None: the group's own timeout, 30 min for gloo).

    Without an initialised process group it is :func:`~batchlab.find_batch_size` on one rank (world size 1),
    with no collective.
    """
    ranks = current_ranks(group)
    if lockstep is None:
        lockstep = ranks is not None and is_sharded(getattr(workload, "model", None))
    elif lockstep:
        ranks = require_ranks(group, what="find_batch_size_distributed(lockstep=True)")
    world = ranks.world_size if ranks else 1
    rank = ranks.rank if ranks else 0
    if gather is None:
        gather = ranks.all_gather_ints if ranks else (lambda value: [value])
    accum_default = int(getattr(workload, "grad_accum", 1) or 1)
    if world > 1:  # the same plan on every rank, or none at all (agreement.py: gradient averaging)
        check_same_everywhere(
            "target_global_batch", gather(_UNSET if target_global_batch is None else int(target_global_batch))
        )
        check_same_everywhere("grad_accum", gather(_UNSET if grad_accum is None else int(grad_accum)))
    if target_global_batch is not None:
        share = check_even_split(target_global_batch, world)
        cap = kwargs.get("max_batch_size")
        kwargs["max_batch_size"] = min(cap, share) if cap else share
    device: LockstepDevice | None = None
    if lockstep:
        inner = resolve_device(kwargs.pop("device", "auto"), getattr(workload, "device", None))
        budget = kwargs.pop("memory_budget", None)
        own_budget = parse_bytes(budget) if budget is not None else inner.capacity_bytes()
        model = getattr(workload, "model", None)
        device = LockstepDevice(
            inner,
            ranks,
            own_budget,
            models=[model] if model is not None else [],
            collective_timeout=collective_timeout,
        )
        kwargs.update(device=device, memory_budget=device.common_bytes)

    local_result: list[FitResult] = []

    def search() -> int:
        local_result.append(find_batch_size(workload, **kwargs))
        return local_result[0].batch_size

    agreed, per_rank = agree_on_batch_size(search, gather, rank=rank)
    local = local_result[0]
    notes = []
    limited_by = per_rank.index(agreed)
    rank_peaks: list[int | None] = []
    if device is not None:
        rank_peaks = device.rank_peaks.get(agreed, [])
        limited_by = device.limiting_rank(agreed) or 0
        notes.append(
            f"probed in lockstep on {world} ranks: every reading is the tightest rank's, scaled to the smallest "
            f"budget ({format_bytes(device.common_bytes)})"
        )
    elif agreed < local.batch_size:
        notes.append(f"this rank alone could run {local.batch_size}; rank {limited_by} limits all ranks")
    plan = None
    if target_global_batch is not None:
        plan = plan_batch(int(target_global_batch), agreed, world)
        micro, accum = plan.micro_batch, plan.accumulation_steps
        notes.append(plan.note)
    else:
        micro = agreed
        accum = grad_accum if grad_accum is not None else accum_default
    return DistributedFitResult(
        batch_size=micro,
        accumulation_steps=accum,
        world_size=world,
        rank=rank,
        global_batch=micro * accum * world,
        per_rank=per_rank,
        local=local,
        plan=plan,
        limited_by_rank=limited_by,
        lockstep=device is not None,
        rank_peak_bytes=rank_peaks,
        rank_budget_bytes=device.rank_budgets if device is not None else [],
        notes=notes,
    )


__all__ = ["DistributedFitResult", "find_batch_size_distributed", "is_sharded"]
