"""The batch ramp on real data: does growing the batch with the noise scale beat every fixed batch? (issue 13, item 3)

For each data set -- sklearn's digits, MNIST-1D (generated offline), and a byte-level language model of the
Python standard library's own source (``char-lm``) -- two sweeps through :func:`batchlab.sweep`, the same LR grid
and seeds, every run stopping at the target validation loss:

1. **Fixed**: every batch size of ``BATCH_SIZES``, the LR scaled from ``base_batch`` by the square-root rule
   times each multiplier of ``GRID`` (the built-in tasks: MLPs with Adam).
2. **Ramp**: :class:`batchlab.sweeps.RampFactory` from the smallest batch, up to the largest, micro-batches of at
   most ``MAX_MICRO`` (standing in for the fitted maximum): the noise scale is measured from the accumulation
   micro-batches and each change carries the LR (and Adam's betas and eps) by the same square-root rule.

Per batch size (and for the ramp) the best multiplier's mean steps and samples to the target over the seeds
(:meth:`batchlab.sweeps.SweepResult.by_batch_size`). The issue's goals: no fixed batch reaches the target with
both fewer steps and fewer samples than the ramp; against the most sample-efficient fixed batch, the ramp takes
>= 30% fewer steps at <= 1.1x its samples.

Every run is logged to MLflow in a SQLite store under ``--directory`` (a temporary directory by default; never
committed). Writes benchmarks/results/batch_ramp.json and prints a Markdown section for RESULTS.md. One torch
thread (tiny models; more only contend on a shared 2-core machine); run with ``nice -n 5``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from batchlab.sweeps import Budget, RampFactory, SweepResult, sweep
from batchlab.workloads.tasks import Task

HERE = Path(__file__).resolve().parent
BATCH_SIZES = [16, 32, 64, 128, 256]
GRID = [0.5, 1.0, 2.0]
MAX_MICRO = 64  # the micro-batch cap: 256 runs as 4 x 64
# Per data set: the LR at batch 16 (critical_batch.py's calibrated LRs at batch 8, x sqrt(2)), the target
# validation loss (reached by every batch size before it overfits: digits bottoms out near 0.07, MNIST-1D's MLP
# near 1.0, the char-LM keeps improving past 2.1 in 50k samples) and a sample cap per run.
EXPERIMENTS = {
    "mlp-digits": {"lr": 5.6e-3, "target": 0.12, "samples": 40_000},
    "mnist1d": {"lr": 2.8e-3, "target": 1.2, "samples": 60_000},
    "char-lm": {"lr": 3e-3, "target": 2.4, "samples": 60_000},
}
EVAL_EVERY = 2  # steps; steps/samples to the target are interpolated between evaluations


def _sweep(factory, sizes, settings, seeds, directory, uri, name) -> SweepResult:
    return sweep(
        factory,
        sizes,
        lr=settings["lr"],
        base_batch=BATCH_SIZES[0],
        rule="sqrt",
        lr_multipliers=GRID,
        seeds=seeds,
        budget=Budget(samples=settings["samples"]),
        target=settings["target"],
        stop_at_target=True,
        eval_every=EVAL_EVERY,
        name=name,
        directory=directory,
        tracking_uri=uri,
        report=False,
    )


def _trajectory(result: SweepResult, multiplier: float) -> list[list[list[int]]]:
    """Per seed at the best multiplier: the (step, batch) where the ramp's batch changed."""
    out = []
    for run in result.runs:
        if run.lr_multiplier != multiplier:
            continue
        points, last = [], None
        for step, batch in zip(run.train.step, run.train["batch_size"]):
            if batch != last:
                points.append([step, int(batch)])
                last = batch
        out.append(points)
    return out


def compare(name: str, fixed: SweepResult, ramp: SweepResult, seeds: int) -> dict:
    rows = [s.to_dict() for s in fixed.by_batch_size()]
    ramp_row = ramp.by_batch_size()[0].to_dict()
    reached = [r for r in rows if r["samples_to_target"] is not None and r["reached"] == seeds]
    out = {"dataset": name, "seeds": seeds, "fixed": rows, "ramp": ramp_row,
           "ramp_batches": _trajectory(ramp, ramp_row["lr_multiplier"])}  # fmt: skip
    if ramp_row["steps_to_target"] is None or ramp_row["reached"] < seeds or not reached:
        out.update(dominated_by=None, efficient=None, goal_not_dominated=False, goal_steps_samples=False)
        return out
    rs, rn = ramp_row["steps_to_target"], ramp_row["samples_to_target"]
    dominated = [
        r["batch_size"] for r in reached if r["steps_to_target"] < rs and r["samples_to_target"] < rn
    ]
    efficient = min(reached, key=lambda r: r["samples_to_target"])
    steps_ratio, samples_ratio = rs / efficient["steps_to_target"], rn / efficient["samples_to_target"]
    out.update(
        dominated_by=dominated,
        efficient=efficient["batch_size"],
        steps_ratio=steps_ratio,
        samples_ratio=samples_ratio,
        goal_not_dominated=not dominated,
        goal_steps_samples=steps_ratio <= 0.7 and samples_ratio <= 1.1,
    )
    return out


def markdown(results: list[dict], command: str, seconds: float) -> str:
    lines = [
        f"## Batch ramp against every fixed batch ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)",
        "",
        f"Issue 13 item 3. Machine: 2-core shared CPU, no GPU, torch {torch.__version__.split('+')[0]}, "
        f"Python {platform.python_version()}, 1 torch thread. Command: `{command}` ({seconds / 60:.1f} min).",
        f"Fixed batches {BATCH_SIZES}; LR grid x{GRID} on the sqrt rule from batch {BATCH_SIZES[0]}; the ramp from "
        f"{BATCH_SIZES[0]} to {BATCH_SIZES[-1]}, micro-batches <= {MAX_MICRO}; means over seeds at each row's best "
        "multiplier (fewest steps). Raw: benchmarks/results/batch_ramp.json.",
        "",
    ]
    for r in results:
        lines += [f"**{r['dataset']}**", "", "| run | best lr x | steps to target | samples to target | seeds reached |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for row in [*r["fixed"], {**r["ramp"], "label": "ramp"}]:
            label = row.get("label") or f"fixed {row['batch_size']}"
            steps = f"{row['steps_to_target']:.0f}" if row["steps_to_target"] is not None else "-"
            samples = f"{row['samples_to_target']:.0f}" if row["samples_to_target"] is not None else "-"
            lines.append(
                f"| {label} | {row['lr_multiplier']:g} | {steps} | {samples} | {row['reached']}/{row['runs']} |"
            )
        lines.append("")
        if r.get("efficient") is not None:
            lines.append(
                f"Ramp batches per seed (step, batch): {r['ramp_batches']}. Most sample-efficient fixed batch: "
                f"{r['efficient']}; ramp/it: steps x{r['steps_ratio']:.2f}, samples x{r['samples_ratio']:.2f}. "
                f"Not dominated: **{'met' if r['goal_not_dominated'] else 'MISSED (by ' + str(r['dominated_by']) + ')'}**; "
                f">= 30% fewer steps at <= 1.1x samples: **{'met' if r['goal_steps_samples'] else 'MISSED'}**."
            )
        else:
            lines.append("The ramp or every fixed batch missed the target: **MISSED**.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--directory", default=None, help="sweeps and the MLflow store (default: a temp dir)")
    parser.add_argument("--target", type=float, default=1.0, help="the ramp grows toward target x B_simple")
    parser.add_argument("--out", default=str(HERE / "results" / "batch_ramp.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = Path(args.directory or tempfile.mkdtemp(prefix="batchlab-batch-ramp-"))
    uri = f"sqlite:///{(directory / 'mlflow.db').resolve()}"
    started = time.time()
    results = []
    for name in args.datasets.split(","):
        settings = EXPERIMENTS[name]
        t0 = time.time()
        fixed = _sweep(
            Task(name, noise_every=0), BATCH_SIZES, settings, args.seeds, directory, uri, f"{name}-fixed"
        )
        ramp_factory = RampFactory(Task(name, noise_every=0), max_batch=BATCH_SIZES[-1], max_micro_batch=MAX_MICRO,
                                   target=args.target)  # fmt: skip
        ramp = _sweep(ramp_factory, [BATCH_SIZES[0]], settings, args.seeds, directory, uri, f"{name}-ramp")
        result = compare(name, fixed, ramp, args.seeds)
        result["seconds"] = time.time() - t0
        results.append(result)
        print(json.dumps({k: result.get(k) for k in ("dataset", "efficient", "steps_ratio", "samples_ratio",
                                                     "dominated_by", "seconds")}), flush=True)  # fmt: skip
    seconds = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "settings": EXPERIMENTS, "batch_sizes": BATCH_SIZES, "grid": GRID,
               "max_micro": MAX_MICRO, "ramp_target": args.target, "seeds": args.seeds, "seconds": seconds,
               "mlflow": uri}  # fmt: skip
    Path(args.out).write_text(json.dumps(payload, indent=2))
    command = "nice -n 5 python benchmarks/batch_ramp.py" + (
        f" --target {args.target:g}" if args.target != 1.0 else ""
    )
    print(markdown(results, command, seconds))


if __name__ == "__main__":
    main()
