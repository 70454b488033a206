"""One rank of the 2-process gloo runs in tests/test_integration_ddp.py and tests/test_integration_lightning.py.

Usage: python integration_ddp_worker.py MODE RANK OUT_DIR, with MASTER_ADDR/MASTER_PORT set; MODE is ``plain``
(find_batch_size_distributed under torch.distributed, then a DDP step at the agreed size) or ``lightning``
(BatchlabFinder in a Lightning Trainer with strategy="ddp", launched externally like torchrun). Each rank
writes OUT_DIR/rank{RANK}.json. The tests import run_ranks(), the memory model and the capacities from here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

WORLD = 2
MIB = 2**20
FIXED_BYTES, BYTES_PER_SAMPLE = 100 * MIB, 10 * MIB
CAPACITY = {0: 1000 * MIB, 1: 600 * MIB}  # rank 1 has less room (another process on its GPU, say)
TARGET_GLOBAL = 96
SAMPLES = 400


def simulated(rank: int):
    """A device whose step memory is FIXED + PER_SAMPLE * b, with a rank-dependent capacity."""
    from batchlab.devices import SimulatedDevice

    return SimulatedDevice(
        lambda b: FIXED_BYTES + BYTES_PER_SAMPLE * b, CAPACITY[rank], name=f"sim-rank{rank}"
    )


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def make_workload(model: nn.Module):
    from batchlab import Workload

    return Workload(
        model,
        lambda b: (torch.randn(b, 8), torch.randint(0, 3, (b,))),
        F.cross_entropy,
        lambda params: torch.optim.Adam(params, lr=1e-3),
        name="mlp",
    )


def _write(out_dir: str, rank: int, result: dict) -> None:
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)  # the test reads only complete files


def plain(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchlab.integrations.ddp import find_batch_size_distributed

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = make_model()
    workload = make_workload(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    agreed = find_batch_size_distributed(workload, device=simulated(rank))
    planned = find_batch_size_distributed(workload, device=simulated(rank), target_global_batch=TARGET_GLOBAL)
    # A real CPU search on both ranks: every rank measures its own process and they agree all the same.
    real = find_batch_size_distributed(
        workload, device="cpu", memory_budget=f"{_rss_mib() + 400}MiB", max_batch_size=256
    )
    unchanged = all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    # Train one DDP step at the agreed plan: micro-batch x accumulation on each rank.
    ddp = DDP(model)
    optimizer = workload.optimizer
    gen = torch.Generator().manual_seed(rank)
    for i in range(planned.accumulation_steps):
        x, y = (
            torch.randn(planned.batch_size, 8, generator=gen),
            torch.randint(0, 3, (planned.batch_size,), generator=gen),
        )
        context = ddp.no_sync() if i < planned.accumulation_steps - 1 else torch.enable_grad()
        with context:
            (F.cross_entropy(ddp(x), y) / planned.accumulation_steps).backward()
    optimizer.step()
    weights = [float(p.detach().sum()) for p in model.parameters()]
    result = {
        "agreed": agreed.to_dict(),
        "planned": planned.to_dict(),
        "real": {"batch_size": real.batch_size, "per_rank": real.per_rank, "local": real.local.batch_size},
        "state_unchanged": unchanged,
        "weights_after_ddp_step": weights,
    }
    _write(out_dir, rank, result)
    dist.barrier()
    dist.destroy_process_group()


def _rss_mib() -> int:
    import psutil

    return psutil.Process().memory_info().rss // MIB


def lightning(rank: int, out_dir: str) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from batchlab.integrations.lightning import BatchlabFinder

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(SAMPLES, 8, generator=gen), torch.randint(0, 3, (SAMPLES,), generator=gen)
    )

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.batch_size = 4
            self.net = make_model()
            self.seen: list[int] = []

        def train_dataloader(self):
            return DataLoader(data, batch_size=self.batch_size, shuffle=True)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            # a collective inside the step: BatchlabFinder detaches the trainer while probing, so it is a no-op
            self.log("train_loss", loss, sync_dist=True)
            return loss

        def on_train_batch_start(self, batch, batch_idx):
            self.seen.append(len(batch[0]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    finder = BatchlabFinder(device=simulated(rank))
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=2,
        callbacks=[finder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    result = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "optimal": finder.optimal_batch_size,
        "per_rank": finder.per_rank,
        "local": finder.result.batch_size,
        "model_batch_size": model.batch_size,
        "seen": model.seen,
    }
    _write(out_dir, rank, result)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, out: Path, timeout: float = 240) -> list[dict]:
    """Start WORLD ranks of this script in ``mode``; return each rank's results (fails with the logs if any is
    missing). A teardown abort after the results are written is not a failure (DESIGN.md: gloo at exit)."""
    import batchlab

    src = str(Path(batchlab.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",  # two processes on a small machine
    }
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(out / f"rank{rank}.log", "w")  # closed in the finally below
        logs.append(log)
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, mode, str(rank), str(out)], env=rank_env, stdout=log, stderr=log
            )
        )
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    results = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.json"
        if not path.exists():
            raise AssertionError(
                f"rank {rank} wrote no results (exit codes {codes}):\n{(out / f'rank{rank}.log').read_text()[-4000:]}"
            )
        results.append(json.loads(path.read_text()))
    return results


if __name__ == "__main__":
    mode, rank, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    {"plain": plain, "lightning": lightning}[mode](rank, out_dir)
    os._exit(0)  # gloo sometimes aborts (SIGABRT) at interpreter teardown; the results are written already
