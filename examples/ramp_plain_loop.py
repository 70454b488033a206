"""A batch ramp in a plain PyTorch loop: the batch grows with the measured noise scale, the LR follows.

Trains a small MLP on scikit-learn's bundled digits (offline: 1797 real 8x8 images, the ``mlp-digits`` task's
split) twice with the same loop, seed and start: once with a :class:`batchlab.training.BatchRamp` from batch 16
toward 1.5 x B_simple (the target that worked on digits, benchmarks/RESULTS.md), once held at 16 (the same ramp
with ``max_batch=16``, so both runs go through the same code). Each prints its batch changes and the optimizer
steps and samples it took to reach a validation loss of 0.12. On seeds 0-3 (2-core CPU, 2026-12-08) the ramp took
0.58-0.76x the steps of fixed 16 at 0.91-1.21x its samples: one seed against one fixed batch, a demonstration;
benchmarks/batch_ramp.py compares the ramp with every fixed batch and LR over seeds. Run it::

    python examples/ramp_plain_loop.py            # about 5 s on a 2-core CPU

The loop is the one in ``BatchRamp``'s docstring: ask the ramp for the micro-batch and the accumulation, run that
many backward passes, step the optimizer, then ``ramp.step()``, which reads the step's gradients and may grow
the batch (carrying the LR, Adam's betas and eps through ``carry_over``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from batchlab.training import BatchRamp
from batchlab.workloads.tasks import Task

TARGET_LOSS = 0.12  # digits' validation loss the ramp benchmark counts to (benchmarks/batch_ramp.py)
LR = 5.6e-3  # Adam's LR at batch 16 there; the ramp carries it by the sqrt rule as the batch grows
MAX_SAMPLES = 40_000  # give up after this many training samples, as the benchmark does


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits, pixels in [0, 1]: train x, y, validation x, y -- the ``mlp-digits`` task's split
    (1438 / 359), so TARGET_LOSS means here what it means in the benchmark."""
    (x, y), (val_x, val_y) = Task("mlp-digits").data()
    return x, y, val_x, val_y


def train(max_batch: int, target: float, seed: int) -> tuple[int | None, int | None, BatchRamp]:
    """One run from batch 16; returns the steps and samples at the first evaluation under TARGET_LOSS (None:
    not reached within MAX_SAMPLES) and the ramp, whose ``events`` are its batch changes."""
    torch.manual_seed(seed)
    x, y, val_x, val_y = digits()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    ramp = BatchRamp(optimizer, batch_size=16, max_batch=max_batch, max_micro_batch=64, target=target)
    sampler = torch.Generator().manual_seed(seed)
    order, position, samples = torch.randperm(len(x), generator=sampler), 0, 0
    with ramp:
        while samples < MAX_SAMPLES:
            for _ in range(ramp.accumulation):  # what batch and accumulation now
                if position + ramp.micro_batch > len(x):  # a new epoch
                    order, position = torch.randperm(len(x), generator=sampler), 0
                index = order[position : position + ramp.micro_batch]
                position += ramp.micro_batch
                (loss_fn(model(x[index]), y[index]) / ramp.accumulation).backward()
            samples += ramp.batch_size
            optimizer.step()
            optimizer.zero_grad()
            event = ramp.step()  # reads this step's gradients; may grow the batch
            if event is not None:
                print("  " + event.message())
            with torch.no_grad():
                val_loss = loss_fn(model(val_x), val_y).item()
            if val_loss < TARGET_LOSS:
                return ramp.steps, samples, ramp
    return None, None, ramp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=1.5, help="grow toward this x B_simple (default 1.5)")
    parser.add_argument("--max-batch", type=int, default=256, help="the ramp's largest global batch")
    args = parser.parse_args(argv)
    for label, max_batch in (("ramp from 16", args.max_batch), ("fixed 16", 16)):
        print(f"{label}:")
        steps, samples, ramp = train(max_batch, args.target, args.seed)
        if steps is None:
            print(f"  did not reach validation loss {TARGET_LOSS} in {MAX_SAMPLES} samples")
        else:
            print(
                f"  validation loss < {TARGET_LOSS} after {steps} optimizer steps, {samples} samples "
                f"(final batch {ramp.batch_size}, lr {ramp.lr:.4g})"
            )


if __name__ == "__main__":
    main()
