"""BatchlabFinder under Lightning's ModelParallelStrategy (FSDP2: ``fully_shard`` in ``configure_model``) on
2 CPU ranks with gloo, for tests/test_fsdp.py. Lightning launches the second rank itself (run with plain
python: ``python lightning_fsdp_worker.py OUT_DIR``); each rank writes OUT_DIR/rank{RANK}.json."""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from batchlab.integrations.lightning import BatchlabFinder


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.batch_size = 2
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)
        )

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(4096, 2048, generator=gen), torch.randn(4096, 64, generator=gen))
        return DataLoader(data, batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(out_dir: str) -> None:
    import psutil

    budget = (
        psutil.Process().memory_info().rss
        + (400 if os.environ.get("LOCAL_RANK", "0") == "0" else 360) * 2**20
    )
    finder = BatchlabFinder(device="cpu", memory_budget=budget)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
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
        "rank": trainer.global_rank,
        "optimal": finder.optimal_batch_size,
        "device": finder.result.device,
        "probes": [p.batch_size for p in finder.result.probes],
        "model_batch_size": model.batch_size,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # gloo sometimes aborts at interpreter teardown; the results are written
