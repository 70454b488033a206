"""One rank of the 2-process gloo run in tests/test_noise_ddp.py (not a test module itself).

Usage: python noise_ddp_worker.py RANK OUT_DIR, with MASTER_ADDR/MASTER_PORT set. Trains a small MLP under DDP
with a GradScaler and a DDPCollector, and writes every step's NormPair and the final estimate to
OUT_DIR/rank{RANK}.json. The test also imports make_problem() and shard() from here, so the single-process
reference sees exactly the same model, data and split.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

STEPS = 12
LOCAL_BATCH = 8
WORLD = 2
LR = 0.1
BETA = 0.9
INIT_SCALE = 2.0**8  # a power of two: scaling and unscaling are exact in float32


def make_problem():
    """The model (same initial weights on every call) and the data of all steps."""
    gen = torch.Generator().manual_seed(0)
    n = STEPS * LOCAL_BATCH * WORLD
    x, y = torch.randn(n, 5, generator=gen), torch.randn(n, 2, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    return model, x, y


def shard(x: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of step ``step``'s global batch (which is micro-batch ``rank`` for the reference)."""
    start = (step * WORLD + rank) * LOCAL_BATCH
    return x[start : start + LOCAL_BATCH]


def main(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchlab.noise import DDPCollector, GradientNoiseScale

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model, x, y = make_problem()
    # ~200-byte buckets; find_unused_parameters keeps DDP on this size-based bucketing (else one bucket at first)
    ddp = DDP(model, bucket_cap_mb=0.0002, find_unused_parameters=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    gns = DDPCollector(ddp, LOCAL_BATCH, GradientNoiseScale(beta=BETA), scaler=scaler)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    pairs, buckets = [], []
    for step in range(STEPS):
        loss = F.mse_loss(ddp(shard(x, step, rank)), shard(y, step, rank))
        scaler.scale(loss).backward()
        buckets.append(len(gns._small))  # test-only peek: how many buckets the hook saw this step
        pairs.append(gns.step().to_dict())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    result = {"pairs": pairs, "buckets": buckets, "estimate": gns.result().to_dict()}
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)  # the test reads only complete files
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo sometimes aborts (SIGABRT) at interpreter teardown; the results are written already


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
