"""Sweeping your own model: one function returning a batchlab.Workload serves every command.

    batchlab fit   --workload examples/sweep_own_model.py:make_workload --device cpu
    batchlab sweep --workload examples/sweep_own_model.py:make_workload --batch-sizes 16,64,256 \\
                   --lr 3e-3 --budget-steps 300 --target-loss 0.8

``fit``, ``profile``, ``noise`` and ``plan`` use one training step of it; ``sweep`` calls the function once per
run (a fresh model each time, its initialisation seeded with the run's seed), sets the optimizer's learning
rate to the run's, trains at each batch size and compares the runs on ``workload.validation``.
"""

import torch
from torch import nn

import batchlab

N_TRAIN, N_VAL, FEATURES, CLASSES = 2048, 512, 20, 4


def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic: labels from a fixed random linear rule plus noise. Its own generator: the same data and the
    same train/validation split in every run, whatever seed the run has."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, FEATURES, generator=generator)
    w = torch.randn(FEATURES, CLASSES, generator=generator)
    y = (x @ w + torch.randn(N_TRAIN + N_VAL, CLASSES, generator=generator)).argmax(dim=1)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_workload() -> batchlab.Workload:
    (train_x, train_y), validation = _data()
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, N_TRAIN, (batch_size,))  # torch's global RNG: a sweep seeds it per run
        return train_x[index], train_y[index]

    workload = batchlab.Workload(
        model,
        make_batch,
        nn.functional.cross_entropy,
        lambda params: torch.optim.Adam(params, lr=1e-3),  # a sweep sets each run's lr on this optimizer
        dataset_size=N_TRAIN,
        name="my-mlp",
        validation=validation,  # held-out (inputs, targets): what a sweep compares its runs on
    )
    return workload
