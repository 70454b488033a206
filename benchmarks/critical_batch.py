"""The critical-batch experiment: does the noise scale measured during training predict B_crit?

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") model the steps S needed to reach a
given loss at batch size B as S = S_min (1 + B_crit/B), and find the critical batch size B_crit close to the
gradient noise scale B_simple = tr(Σ)/|G|² measured along the way. This script tests that on two offline
datasets with batchlab.sweep:

1. For each batch size (7 powers of two, 8..512), train a fresh MLP with Adam at the LR scaled by the square
   root rule from ``--base-batch`` times each multiplier of a small grid (the Tuning Playbook: the LR must be
   re-tuned when the batch changes); every run stops when the validation loss reaches the target.
2. Steps-to-target per batch size = the best multiplier's mean over seeds (interpolated between evaluations,
   every 4 steps); fit S_min and B_crit in log space (batchlab.noise.critical.fit_critical_batch).
3. B_simple: every step also measures the noise scale (split-batch collector, which does not change the
   gradient); the per-step |G|² and tr(Σ) estimates over the second half of each run's steps to the target are
   averaged and pooled over the best-LR runs of all batch sizes (batchlab.noise.critical.pooled_noise_scale).
4. Compare: ratio B_simple / B_crit, target within 2x. Writes benchmarks/results/critical_batch.png and .json
   and prints a Markdown section for benchmarks/RESULTS.md.

Runs on the CPU with one torch thread (tiny models; more threads only contend on a shared 2-core machine).
``--quick`` runs one seed (about 4 minutes here); the default, two seeds (~7 minutes on a loaded 2-core VM).
``--branch`` runs the other experiment instead: B_crit swept from one checkpoint, against B_simple and the
curvature-aware B_noise measured there, on digits, MNIST-1D and a char-level LM (benchmarks/critical_branch.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchlab.sweeps import SweepResult, sweep
from batchlab.workloads.tasks import Task
from provenance import load_average, machine_line, provenance

HERE = Path(__file__).resolve().parent
BATCH_SIZES = [8, 16, 32, 64, 128, 256, 512]
# Per dataset: base LR at batch 8 (then the sqrt rule), its grid of multipliers, the target validation loss and
# the per-run step cap. Set from calibration sweeps (1 seed, grid 0.5..4 around lr 2e-3; then 2 seeds, grid
# 0.5..2): the targets sit where every batch size gets there before overfitting sets in (digits' validation
# loss bottoms out near 0.07, MNIST-1D's MLP near 1.0); the grid spans 16x because the best multiplier moved
# from x2 at small batches to x0.5 at the largest (the sqrt rule over-scales here), and a best LR at the edge
# of the grid is flagged in the table.
GRID = [0.25, 0.5, 1.0, 2.0, 4.0]
EXPERIMENTS = {
    "mlp-digits": {"lr": 4e-3, "grid": GRID, "target": 0.12, "budget": 1500},
    "mnist1d": {"lr": 2e-3, "grid": GRID, "target": 1.2, "budget": 2000},
}


def run(name: str, settings: dict, seeds: int, directory: Path, tracking: bool) -> SweepResult:
    return sweep(
        Task(name, noise_every=1),
        BATCH_SIZES,
        lr=settings["lr"],
        base_batch=BATCH_SIZES[0],
        rule="sqrt",
        lr_multipliers=settings["grid"],
        seeds=seeds,
        budget=settings["budget"],
        target=settings["target"],
        stop_at_target=True,
        eval_every=4,
        directory=directory,
        tracking_uri=None if tracking else False,
        report=tracking,
    )


def plot(results: dict[str, SweepResult], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

    class Plain(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:g}"

    fig = Figure(figsize=(11, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, result) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        rows = result.by_batch_size()
        for m in sorted(set(result.config.lr_multipliers)):  # every LR of the grid, faint
            pts = []
            for b in result.batch_sizes:
                runs = [r for r in result.runs_at(b) if r.lr_multiplier == m]
                if runs and all(r.steps_to_target is not None for r in runs):
                    pts.append((b, sum(r.steps_to_target for r in runs) / len(runs)))
            if pts:
                ax.scatter(*zip(*pts), s=12, color="0.7", zorder=2)
        ax.scatter([], [], s=12, color="0.7", label="other LRs of the grid")
        reached = [(s.batch_size, s.steps_to_target) for s in rows if s.steps_to_target is not None]
        ax.plot(*zip(*reached), "o", color="C0", ms=7, zorder=4, label="best LR (mean over seeds)")
        fit, noise = result.critical_batch(), result.noise_scale()
        lo, hi = min(BATCH_SIZES) / 1.5, max(BATCH_SIZES) * 1.5
        grid = [lo * (hi / lo) ** (k / 200) for k in range(201)]
        if fit is not None:
            ax.plot(grid, [fit.steps(b) for b in grid], color="C1", lw=2, label="fit S = S_min(1 + B_crit/B)")
            ax.axhline(fit.s_min, color="C1", ls=":", lw=1.2, label=f"S_min ≈ {fit.s_min:.0f} steps")
            ax.axvline(fit.b_crit, color="C1", ls="--", lw=1.5, label=f"B_crit ≈ {fit.b_crit:.0f} (fit)")
        if noise is not None:
            ax.axvline(noise, color="C3", ls="-.", lw=1.6, label=f"B_simple ≈ {noise:.0f} (measured)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(BATCH_SIZES))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x))}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(lo, hi)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))  # 20, 100, 400 rather than 2x10^1
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.8)))
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel("optimizer steps to target (log scale)")
        ax.set_title(f"{name}: steps to {result.config.target.describe()}")
        ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, format="png", metadata={"Software": None})


def summarize(name: str, result: SweepResult) -> dict:
    fit, noise = result.critical_batch(), result.noise_scale()
    return {
        "dataset": name,
        "target": result.config.target.describe(),
        "runs": len(result.runs),
        "rows": [
            {
                "batch_size": s.batch_size,
                "lr": s.lr,
                "lr_multiplier": s.lr_multiplier,
                "at_grid_edge": s.lr_multiplier
                in (min(result.config.lr_multipliers), max(result.config.lr_multipliers)),
                "steps_to_target": s.steps_to_target,
                "samples_to_target": s.samples_to_target,
                "fitted_steps": fit.steps(s.batch_size) if fit else None,
                "noise_scale_at_target": s.noise_scale,
            }
            for s in result.by_batch_size()
        ],
        "fit": fit.to_dict() if fit else None,
        "b_simple": noise,
        "ratio": noise / fit.b_crit if fit and noise else None,
        "diverged": [r.key for r in result.runs if r.status != "finished"],
        "missed": [r.key for r in result.runs if r.steps_to_target is None],
    }


def markdown(summaries: list[dict], command: str, seconds: float, load: str) -> str:
    lines = [
        f"## Critical batch size vs the measured noise scale ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- Machine: {machine_line()}; load average at start {load}",
        f"- Command: `{command}` ({seconds:.0f} s)",
        "- Method: batchlab.sweep per dataset over batch sizes 8..512 (powers of two), Adam with the LR scaled by the "
        "square-root rule from batch 8 times each multiplier of the grid; every run stops at the target validation "
        "loss (evaluated every 4 steps, steps interpolated between evaluations). Steps-to-target per batch size = "
        "the best multiplier's mean over seeds; S = S_min(1 + B_crit/B) fitted in log space. B_simple: measured on "
        "every step (split-batch collector), |G|² and tr(Σ) averaged over the second half of each run's steps to "
        "the target and pooled over the best-LR runs of every batch size.",
        "",
    ]
    for s in summaries:
        fit = s["fit"]
        lines += [
            f"**{s['dataset']}** — {s['target']}, {s['runs']} runs",
            "",
            "| batch | best lr | steps to target | samples to target | fitted steps | noise scale at target |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in s["rows"]:
            cell = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
            lines.append(
                f"| {r['batch_size']} | {r['lr']:.3g} (×{r['lr_multiplier']:g}{', grid edge' if r['at_grid_edge'] else ''}) | "
                f"{cell(r['steps_to_target'], '.1f')} | "
                f"{cell(r['samples_to_target'], ',.0f')} | {cell(r['fitted_steps'], '.1f')} | "
                f"{cell(r['noise_scale_at_target'], '.0f')} |"
            )
        if fit:
            lines.append("")
            lines.append(
                f"Fit: S_min = {fit['s_min']:.1f} steps, **B_crit = {fit['b_crit']:.0f}**, E_min = {fit['e_min']:,.0f} "
                f"samples, rms log error {fit['rms_log_error']:.3f}{'' if fit['bounded'] else ' (NOT bounded: ' + fit['note'] + ')'}. "
                f"Measured **B_simple = {s['b_simple']:.0f}**, ratio B_simple / B_crit = **{s['ratio']:.2f}** "
                f"({'within' if 0.5 <= s['ratio'] <= 2 else 'NOT within'} 2x)."
            )
        if s["missed"]:
            lines.append(
                f"Runs that missed the target (LRs too low or too high for their batch): {', '.join(s['missed'])}."
            )
        lines.append("")
    within = [s for s in summaries if s["ratio"] is not None and 0.5 <= s["ratio"] <= 2]
    ratios = ", ".join(f"{s['dataset']} {s['ratio']:.2f}x" for s in summaries if s["ratio"] is not None)
    lines.append(
        f"**Verdict:** B_simple is within 2x of the fitted B_crit on {len(within)} of {len(summaries)} datasets "
        f"({ratios}). Plot: `benchmarks/results/critical_batch.png`."
    )
    return "\n".join(lines)


def main() -> None:
    if (
        "--branch" in sys.argv[1:]
    ):  # issue 13 item 4: B_crit branched from one checkpoint (critical_branch.py)
        from critical_branch import main as branch

        branch([a for a in sys.argv[1:] if a != "--branch"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed (~4 min)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per (batch, LR) (default 2; 1 with --quick)"
    )
    parser.add_argument("--datasets", default=",".join(EXPERIMENTS), help="comma-separated subset")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the PNG and JSON go")
    parser.add_argument("--track", action="store_true", help="log to MLflow in --dir and write reports")
    parser.add_argument(
        "--dir",
        default=None,
        help="where the sweeps live (default: a new temp dir; ./batchlab-runs with --track); an existing one "
        "resumes, so a finished run only redraws the plot and tables",
    )
    args = parser.parse_args()
    # tiny MLPs: one thread is fastest on a shared machine, and timing stays comparable
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 2)
    load = load_average()
    started = time.time()
    run_by = provenance(("numpy", "scikit-learn", "mnist1d", "mlflow"))  # taken before training
    if args.dir:
        directory = Path(args.dir)
    else:
        directory = Path("batchlab-runs") if args.track else Path(tempfile.mkdtemp(prefix="critical-batch-"))
    print(f"sweeps in {directory}", flush=True)
    results = {}
    for name in args.datasets.split(","):
        t0 = time.time()
        results[name] = run(name, EXPERIMENTS[name], seeds, directory, args.track)
        print(f"{name}: {len(results[name].runs)} runs in {time.time() - t0:.0f} s", flush=True)
        print(results[name].summary(), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "critical_batch.png")
    summaries = [summarize(name, result) for name, result in results.items()]
    (out / "critical_batch.json").write_text(
        json.dumps({"results": summaries, "provenance": run_by}, indent=2)
    )
    command = (
        "python benchmarks/critical_batch.py"
        + (" --quick" if args.quick else "")
        + (f" --seeds {args.seeds}" if args.seeds else "")
    )
    print()
    print(markdown(summaries, command, time.time() - started, load))


if __name__ == "__main__":
    main()
