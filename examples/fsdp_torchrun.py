# torchrun --nproc-per-node=2 examples/fsdp_torchrun.py   (gloo on the CPU; use "nccl" and device="cuda" on GPUs)
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from batchlab import Workload
from batchlab.integrations.distributed import find_batch_size_distributed
from batchlab.training import OOMGuard

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(4)])
for layer in model:
    fully_shard(layer)  # each layer its own all-gather / reduce-scatter
fully_shard(model)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)


def make_batch(b):
    return torch.randn(b, 1024), torch.randn(b, 1024)


workload = Workload(model, make_batch, F.mse_loss, optimizer)
# Every rank probes the same sizes together (lockstep) under its own budget; all agree on one plan.
result = find_batch_size_distributed(
    workload, device="cpu", memory_budget=os.environ.get("BUDGET", "3GiB"), target_global_batch=512
)
if dist.get_rank() == 0:
    print(
        result.summary()
    )  # "batch 256 per rank x 2 ranks = global batch 512 (... rank 1 has the least room)"

# Train at the plan; an OOM on any rank makes every rank halve the micro-batch together.
per_rank = result.batch_size * result.accumulation_steps
guard = OOMGuard(optimizer, per_rank, micro_batch=result.batch_size, model=model)
for _ in range(3):
    inputs, targets = make_batch(per_rank)
    loss = guard.step((inputs, targets), lambda b: F.mse_loss(model(b[0]), b[1]))
if dist.get_rank() == 0:
    print(f"trained 3 steps at {guard.micro_batch} x {guard.accumulation} per rank, loss {float(loss):.3f}")
dist.destroy_process_group()
os._exit(0)  # gloo can abort at interpreter teardown (torch's CPU build); everything is done by now
