"""Is B_simple's standard error the size of its run-to-run spread? Many short measurements from one state.

Usage (from the repository root, with the project's virtualenv):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/noise_stderr.py                # 3 data sets, ~3 min
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/noise_stderr.py --tasks mlp-digits --runs 8

``batchlab noise`` and ``advise`` report B_simple ± one standard error, and advise switches only when its gain
holds across that interval (issue 13 item 6). :meth:`GradientNoiseScale.result` derives the error from the
scatter of the per-step estimates, treating the steps as independent. Two things can make it wrong: the steps
are correlated (each step's gradient comes from weights the previous step moved), which makes it too small;
and B_simple drifts inside the window as training goes on, which widens the scatter and makes it too large.

Method: per data set (the sweep tasks' own splits and models, Adam at ``--lr``, default 1e-3 as the
``mlp-digits`` workload), ``--runs`` measurements of ``--steps`` steps each at batch ``--batch`` with the
default collector (split halves) and EMA decay. Every run starts from the same initial weights (seed 0); only the data order
differs (seed 100 + run). The spread across runs is then the error of one measurement from that state, and
``spread / mean SE`` says how the reported error compares: 1 is calibrated, above 1 the interval is too narrow.
Beside it, what the usual correction for serial correlation (AR(1): n_eff x (1 - r1)/(1 + r1), with r1 the
lag-1 autocorrelation of the ratio's residual y_t - B x_t) would report instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from batchlab import Workload
from batchlab.noise import measure_noise_scale
from batchlab.noise.estimator import estimate_components
from batchlab.workloads.tasks import Task
from provenance import load_average, machine_line, provenance

TASKS = ("mlp-digits", "mnist1d", "char-lm")
RESULTS_DIR = Path(__file__).with_name("results")


def _workload(name: str, lr: float) -> Workload:
    """The sweep task's split and model as a Workload: weights from seed 0 (every run starts there), batches
    drawn with torch's global RNG (seeded per run below), Adam at ``lr`` (0: the weights never move, so the
    spread is the estimator's alone, without the paths that different data orders take)."""
    return Task(name, noise_every=0)(128, lr, 0).workload()


def _lag1(series: list[float]) -> float:
    mean = statistics.fmean(series)
    var = sum((v - mean) ** 2 for v in series)
    return sum((a - mean) * (b - mean) for a, b in zip(series, series[1:])) / var if var else 0.0


def measure(name: str, runs: int, steps: int, batch: int, lr: float = 1e-3) -> dict:
    """``runs`` measurements from one state; each run's B_simple, reported SE and the AR(1)-corrected SE."""
    # measure_noise_scale restores the workload bitwise, so every run starts from seed 0's weights
    workload = _workload(name, lr)
    rows = []
    for run in range(runs):
        torch.manual_seed(100 + run)
        pairs: list[tuple[float, float]] = []  # each step's (|G|², tr Σ) estimates, for the lag-1 correlation

        def keep(_index: int, norms, into: list = pairs) -> None:
            into.append(
                estimate_components(norms.sq_norm_small, norms.sq_norm_big, norms.b_small, norms.b_big)
            )

        est = measure_noise_scale(workload, batch, steps=steps, on_step=keep)
        if est.b_simple is None or est.b_simple_stderr is None:
            rows.append({"b_simple": None, "stderr": None, "note": est.note})
            continue
        r1 = max(0.0, _lag1([y - est.b_simple * x for x, y in pairs]))
        rows.append({"b_simple": est.b_simple, "stderr": est.b_simple_stderr, "lag1": r1,
                     "stderr_ar1": est.b_simple_stderr * math.sqrt((1 + r1) / (1 - r1))})  # fmt: skip
    good = [r for r in rows if r["b_simple"] is not None]
    spread = statistics.stdev(r["b_simple"] for r in good)
    mean_se = statistics.fmean(r["stderr"] for r in good)
    mean_ar1 = statistics.fmean(r["stderr_ar1"] for r in good)
    centre = statistics.fmean(r["b_simple"] for r in good)
    return {
        "task": name, "runs": runs, "defined": len(good), "steps": steps, "batch": batch, "lr": lr,
        "mean": centre, "spread": spread, "mean_stderr": mean_se, "mean_stderr_ar1": mean_ar1,
        "spread_over_stderr": spread / mean_se, "spread_over_stderr_ar1": spread / mean_ar1,
        # a run's interval mean +- SE holds the runs' centre about 68% of the time when SE is calibrated
        "covered": sum(abs(r["b_simple"] - centre) <= r["stderr"] for r in good) / len(good),
        "median_lag1": statistics.median(r["lag1"] for r in good),
        # the spread of a standard deviation from n normal draws is about sd / sqrt(2 (n - 1))
        "spread_relative_error": 1 / math.sqrt(2 * (len(good) - 1)),
        "rows": rows,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument(
        "--runs", type=int, default=48, help="measurements per data set and window (default 48)"
    )
    parser.add_argument(
        "--steps", default="100,300", help="window lengths in steps (default 100,300; 100 is noise's)"
    )
    parser.add_argument(
        "--batch", type=int, default=128, help="batch per step (default 128, noise's default)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="Adam's LR (default 1e-3; 0 keeps the weights where they start)",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    if not args.lr >= 0.0:
        parser.error(f"--lr must be >= 0, got {args.lr}")
    if args.runs < 3:
        parser.error(f"--runs must be >= 3 for a spread, got {args.runs}")
    parts = args.steps.split(",")
    windows = [int(part) for part in parts if part.strip().isdigit()]
    if len(windows) != len(parts) or min(windows) < 2:
        parser.error(f"--steps {args.steps}: expected window lengths of at least 2 steps, comma-separated")

    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {started:%Y-%m-%d %H:%M} UTC, {machine_line()}, load {load_average()}")
    print("| data set | steps | runs | B_simple mean | spread (sd) | mean SE | spread / SE | runs within 1 SE | "
          "median lag-1 r | spread / AR(1) SE |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for name in names:
        for steps in windows:
            t0 = time.perf_counter()
            r = measure(name, args.runs, steps, args.batch, args.lr)
            r["seconds"] = time.perf_counter() - t0
            results.append(r)
            print(f"| {name} | {steps} | {r['defined']}/{r['runs']} | {r['mean']:.0f} | {r['spread']:.0f} | "
                  f"{r['mean_stderr']:.0f} | {r['spread_over_stderr']:.2f} ± {r['spread_relative_error'] * r['spread_over_stderr']:.2f} | "
                  f"{r['covered']:.0%} | {r['median_lag1']:.2f} | {r['spread_over_stderr_ar1']:.2f} |", flush=True)  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"noise_stderr_{started:%Y%m%d_%H%M}.json"
    record = {"started": started.isoformat(), "command": " ".join(sys.argv), "results": results,
              "provenance": provenance(("numpy", "scikit-learn", "mnist1d"), ("src/batchlab/noise/estimator.py",))}  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"raw results: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
