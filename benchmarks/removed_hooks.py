"""What a removed tensor hook leaves behind: a backward's cost on parameters hooked once and then unhooked.

Usage (from the repository root, with the project's virtualenv):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/removed_hooks.py     # ~15 s

``Tensor.register_hook`` gives the tensor a hook dict and autograd a C++ pre-hook that calls into Python with
that dict on every backward. ``handle.remove()`` empties the dict but leaves both in place, so a model whose
parameters were hooked once (by a noise-scale measurement, for example) pays a Python call per parameter per
backward for good. Setting ``_backward_hooks = None`` when the dict is empty, as
:meth:`batchlab.noise.backward_norms.BackwardNorms.remove` does now, drops the C++ hook with it.

Method: three copies of the mlp-digits task's model (64-256-256-10, ``Task("mlp-digits").model(0)``): never
hooked, hooked and the handles removed, and hooked and removed by ``BackwardNorms`` (reset to None). Each step is 4 micro-batches of 64 (the noise-overhead
benchmark's mlp-digits step, without the optimizer). ``--reps`` rounds of ``--steps`` steps per copy, in an
order rotated every round; per round the process CPU time per step; the ratios are paired within a round, and
the first rounds are dropped as warm-up. Prints the medians with their quartiles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from batchlab.noise.backward_norms import BackwardNorms
from batchlab.workloads.tasks import Task
from provenance import load_average, machine_line

MICRO, ACCUM = 64, 4  # noise_overhead.py's mlp-digits step
WARM_UP = 3  # rounds dropped


def _model() -> nn.Module:
    return Task("mlp-digits").model(0)


def _unhook(model: nn.Module, reset: bool) -> None:
    """Hook every parameter and take the hooks out again: with plain handles (``reset`` False, as before), or
    through :class:`BackwardNorms` (``reset`` True), whose ``remove`` now resets the emptied hook dicts."""
    if reset:
        BackwardNorms(model.parameters()).remove()
        return
    for handle in [p.register_hook(lambda g: None) for p in model.parameters()]:
        handle.remove()


def measure(reps: int, steps: int) -> dict[str, dict[str, float]]:
    """Per copy, the median CPU ms per step; per unhooked copy, its paired ratio to the never-hooked one."""
    models = {"never hooked": _model(), "removed": _model(), "removed, reset to None": _model()}
    _unhook(models["removed"], reset=False)
    _unhook(models["removed, reset to None"], reset=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MICRO * ACCUM, 64, generator=generator)
    y = torch.randint(0, 10, (MICRO * ACCUM,), generator=generator)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
            (F.cross_entropy(model(xb), yb) / ACCUM).backward()

    names = list(models)
    per_step: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            for _ in range(steps):
                step(models[name])
            per_step[name].append((time.process_time() - start) / steps)
    kept = {name: times[WARM_UP:] for name, times in per_step.items()}
    out = {}
    for name in names:
        ratios = [t / base for t, base in zip(kept[name], kept[names[0]])]
        low, _, high = statistics.quantiles(ratios, n=4)
        out[name] = {"ms": 1e3 * statistics.median(kept[name]), "ratio": statistics.median(ratios),
                     "ratio_q1": low, "ratio_q3": high}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=60, help="rounds (the first 3 are warm-up; default 60)")
    parser.add_argument("--steps", type=int, default=40, help="steps per copy per round (default 40)")
    args = parser.parse_args(argv)
    if args.reps < WARM_UP + 4 or args.steps < 1:
        parser.error(f"--reps must be >= {WARM_UP + 4} and --steps >= 1, got {args.reps} and {args.steps}")
    torch.set_num_threads(1)
    print(f"# {machine_line()}, load {load_average()}, {args.reps} rounds x {args.steps} steps")
    print("| parameters | CPU ms per step | vs never hooked [quartiles] |")
    print("|---|---:|---:|")
    for name, row in measure(args.reps, args.steps).items():
        print(f"| {name} | {row['ms']:.3f} | {row['ratio'] - 1:+.1%} "
              f"[{row['ratio_q1'] - 1:+.1%}, {row['ratio_q3'] - 1:+.1%}] |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
