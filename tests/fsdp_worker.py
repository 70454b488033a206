"""One rank of the torchrun + gloo + FSDP2 runs in tests/test_fsdp.py (issue 14).

Usage: torchrun --nproc-per-node N fsdp_worker.py MODE OUT_DIR. Every mode builds the same 4-layer MLP, shards
it with ``fully_shard`` (each layer, then the root), trains it with Adam, and writes OUT_DIR/rank{RANK}.json:

- ``fit``: find_batch_size_distributed under a per-rank memory budget (``BUDGETS_MIB``: extra MiB over the
  process's resident memory, by rank; mixed when they differ), then 20 steps at the agreed batch, their peak
  read as the search reads it; with ``TARGET`` set, the plan for that global batch.
- ``oom-search`` / ``error-search``: rank 1 alone raises an out-of-memory error (or a ValueError) in layer 2's
  forward once the batch reaches ``INJECT_AT``, during the search.
- ``oom-guard`` / ``error-guard``: OOMGuard steps of batch 64; rank 1 alone raises in layer 2's forward
  (``oom-guard``: while the micro-batch exceeds 16; ``error-guard``: at step 1); ``oom-guard-loss``: the
  out-of-memory error in the loss, after the forward -- the other rank learns of it at the backward's first
  sync point, before FSDP's backward all-gathers.
- ``oom-backward-search`` / ``error-backward-search``: as the search modes, but layer 2 raises in its
  *backward* -- after FSDP's all-gather of its parameters, before its reduce-scatter (the other rank would
  wait in that reduce-scatter); ``oom-backward-guard`` / ``error-backward-guard``: as the guard modes, with
  layer 0 raising in its backward (its reduce-scatter runs in FSDP's final backward callback).
- ``backward-ooms``: the two out-of-memory modes of the backward (run on 4 ranks).
- ``failures`` / ``backward-failures``: the forward (and loss) modes above, or the backward ones, in turn, in
  one process group -- which also shows that every rank is still in step with the others after each failure.
  Results are keyed by mode. ``PG_TIMEOUT_S`` sets the process group's timeout (default: torch's, 30 min).
- ``stalled-search`` / ``stalled-guard``: rank 1 alone runs out of memory in layer 2's forward just before
  a collective of the layer's own (the search: from ``INJECT_AT`` on; the guard: at step 1), where rank 0
  already waits: no sync point reaches it, the group times out after ``COLLECTIVE_TIMEOUT_S`` (batchlab's
  ``collective_timeout``) and cannot be used again -- one mode per torchrun.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

MIB = 2**20
WIDTH_IN, WIDTH = 2048, 64
INJECT_AT = 24
COLLECTIVE_TIMEOUT_S = float(os.environ.get("COLLECTIVE_TIMEOUT_S", 300))
FAILURES = ("oom-search", "error-search", "oom-guard", "error-guard", "oom-guard-loss")
BACKWARD_FAILURES = (
    "oom-backward-search",
    "error-backward-search",
    "oom-backward-guard",
    "error-backward-guard",
)


class RaiseInBackward(torch.autograd.Function):
    """Identity forward; the backward raises ``error`` -- inside the sharded module's backward, after FSDP's
    all-gather of its parameters and before its reduce-scatter of their gradients."""

    @staticmethod
    def forward(ctx, x, error):
        ctx.error = error
        return x.clone()  # not a view: FSDP warns about a sharded module returning one

    @staticmethod
    def backward(ctx, grad):
        if ctx.error is not None:
            raise ctx.error
        return grad, None


class Injected(nn.Module):
    """A layer that raises on ``rank`` when ``when(batch)`` -- the failure of one rank only -- in its forward,
    or (``in_backward``) in its backward."""

    def __init__(
        self,
        inner: nn.Module,
        rank: int,
        error: BaseException | None,
        when,
        in_backward=False,
        collective=False,
    ):
        super().__init__()
        self.inner, self.rank, self.error, self.when = inner, rank, error, when
        self.in_backward, self.collective = in_backward, collective

    def forward(self, x):
        fails = self.error is not None and dist.get_rank() == self.rank and self.when(len(x))
        if fails and not self.in_backward:
            raise self.error
        if self.collective:  # the model's own collective (as tensor parallelism has): no sync point before it
            dist.all_reduce(torch.ones(1))
        if self.in_backward:  # the output's backward is the first of this module's backward
            return RaiseInBackward.apply(self.inner(x), self.error if fails else None)
        return self.inner(x)


def build(
    error: BaseException | None = None,
    when=lambda b: False,
    layer: int = 2,
    in_backward=False,
    collective=False,
):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(WIDTH_IN, WIDTH), nn.ReLU())]
    layers += [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(3)]
    layers[layer] = Injected(layers[layer], 1, error, when, in_backward, collective)
    model = nn.Sequential(*layers)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def make_batch(b: int):
    gen = torch.Generator().manual_seed(b)
    return torch.randn(b, WIDTH_IN, generator=gen), torch.randn(b, WIDTH, generator=gen)


def workload(model, optimizer):
    from batchlab import Workload

    return Workload(model, make_batch, F.mse_loss, optimizer, name="fsdp-mlp")


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def fit(rank: int) -> dict:
    from batchlab.devices import CPUDevice
    from batchlab.integrations.distributed import find_batch_size_distributed

    model, optimizer = build()
    work = workload(model, optimizer)
    extra = [int(v) for v in os.environ["BUDGETS_MIB"].split(",")][rank]
    budget = rss() + extra * MIB
    target = int(os.environ["TARGET"]) if os.environ.get("TARGET") else None
    before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    result = find_batch_size_distributed(
        work, device="cpu", memory_budget=budget, max_batch_size=16384, target_global_batch=target
    )
    unchanged = all(torch.equal(before[k], v.to_local()) for k, v in model.state_dict().items())
    later = CPUDevice().run(work.step, result.batch_size, steps=20)  # the user's own steps, measured alike
    return {
        "result": result.to_dict(),
        "probes": [p["batch_size"] for p in result.local.to_dict()["probes"]],
        "budget": budget,
        "later_peak": later.peak_bytes,
        "later_ok": later.ok,
        "unchanged": unchanged,
    }


def search_failure(rank: int, error: BaseException, **where) -> dict:
    from batchlab.integrations.distributed import find_batch_size_distributed

    model, optimizer = build(error, lambda b: b >= INJECT_AT, **where)
    try:
        result = find_batch_size_distributed(
            workload(model, optimizer),
            device="cpu",
            memory_budget=rss() + 256 * MIB,
            max_batch_size=256,
            collective_timeout=COLLECTIVE_TIMEOUT_S,
        )
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc), "reports": getattr(exc, "reports", None)}
    return {
        "batch_size": result.batch_size,
        "probes": [(p["batch_size"], p["outcome"]) for p in result.local.to_dict()["probes"]],
    }


def guard(rank: int, error: BaseException, when, in_loss: bool = False, **where) -> dict:
    from batchlab.training import OOMGuard

    state = {"step": 0}
    model, optimizer = build(None if in_loss else error, lambda b: when(b, state["step"]), **where)

    def loss_fn(batch):
        out = model(batch[0])
        if in_loss and rank == 1 and when(len(out), state["step"]):  # after the forward, before the backward
            raise error
        return F.mse_loss(out, batch[1])

    guard = OOMGuard(optimizer, 64, model=model, collective_timeout=COLLECTIVE_TIMEOUT_S)
    losses = []
    try:
        for step in range(3):
            state["step"] = step
            x, y = make_batch(64)
            losses.append(float(guard.step((x, y), loss_fn)))
    except Exception as exc:
        reports = getattr(exc, "reports", None)
        return {"raised": type(exc).__name__, "message": str(exc), "losses": losses, "reports": reports}
    return {
        "losses": losses,
        "micro": [guard.micro_batch, guard.accumulation],
        "events": [e.to_dict() for e in guard.events],
        "local_weights": [float(p.to_local().sum()) for p in model.parameters()],
    }


def main(mode: str, out_dir: str) -> None:
    timeout = float(os.environ.get("PG_TIMEOUT_S", 1800))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    rank = dist.get_rank()
    oom = torch.OutOfMemoryError("injected: out of memory on this rank only")
    modes = {
        "fit": lambda: fit(rank),
        "oom-search": lambda: search_failure(rank, oom),
        "error-search": lambda: search_failure(rank, ValueError("injected shape bug")),
        "oom-guard": lambda: guard(rank, oom, lambda b, step: b > 16),
        "error-guard": lambda: guard(rank, ValueError("injected shape bug"), lambda b, step: step == 1),
        "oom-guard-loss": lambda: guard(rank, oom, lambda b, step: b > 16, in_loss=True),
        # in a sharded module's backward: layer 2's reduce-scatter runs in its own post-backward, layer 0's
        # (whose input needs no gradient) in FSDP's final callback at the end of the backward
        "oom-backward-search": lambda: search_failure(rank, oom, in_backward=True),
        "error-backward-search": lambda: search_failure(
            rank, ValueError("injected shape bug"), in_backward=True
        ),
        "oom-backward-guard": lambda: guard(rank, oom, lambda b, step: b > 16, layer=0, in_backward=True),
        "error-backward-guard": lambda: guard(
            rank, ValueError("injected shape bug"), lambda b, step: step == 1, layer=0, in_backward=True
        ),
        # just before the model's own collective, which rank 0 already waits in: the group times out
        "stalled-search": lambda: search_failure(rank, oom, collective=True),
        "stalled-guard": lambda: guard(rank, oom, lambda b, step: step == 1, collective=True),
    }
    result = {}
    # "failures": every failure mode in turn, in one process group (one torchrun start instead of four)
    groups = {
        "failures": FAILURES,
        "backward-failures": BACKWARD_FAILURES,
        "backward-ooms": ("oom-backward-search", "oom-backward-guard"),
    }
    for name in groups.get(mode, [mode]):
        try:
            result[name] = modes[name]()
        except Exception:
            result[name] = {"crashed": traceback.format_exc()}
    result["rank"], result["world"] = rank, dist.get_world_size()
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # gloo sometimes aborts (SIGABRT) at interpreter teardown; the results are written already
