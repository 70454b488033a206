"""Profile tables: ``batchlab.profile`` over the built-in workloads (CPU) or the GPU-class models, as Markdown.

Usage (from the repository root):

    python benchmarks/profile_builtin.py                                   # CPU: mlp-digits, cnn, resnet, gpt
    python benchmarks/profile_builtin.py --workloads cnn --precision fp32,bf16 --checkpointing off,on
    python benchmarks/profile_builtin.py --gpu-models resnet50,vit-b,gpt2-small --device cuda \\
        --precision fp32,bf16 --memory-budget 24GiB --out "$OUT/profile"  # what gpu_check.sh runs
    python benchmarks/profile_builtin.py --gpu-models resnet50 --scale tiny --device cpu  # the dry run

Writes, under ``--out``: ``profile.md`` (a summary table, then one table of points per workload, appended
after each workload so a run cut short keeps what it finished), ``<workload>.json`` (the whole Profile) and
``plots/<workload>-{throughput,memory}.png``. The Markdown also goes to stdout.

Defaults and why: CPU budgets are per workload (``DEFAULT_CPU_BUDGETS``) so the searches stay at sizes a
2-core machine profiles in minutes; one torch thread on the CPU, because on a shared 2-core machine two
threads wait for each other's time slices (a tiny model's step measured 50x slower); ``--deadline`` skips
the workloads left when time runs out, so a GPU script with a hard limit still returns its tables.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from batchlab.profiling.api import profile
from batchlab.profiling.plots import plot_profile
from batchlab.profiling.records import Profile
from batchlab.units import format_bytes, parse_bytes
from batchlab.workloads import BUILTIN, load_workload
from provenance import machine_line

BENCHMARKS = Path(__file__).resolve().parent
# Whole-process budgets on the CPU (the fraction 0.9 applies): a few hundred MiB above the ~300 MiB that
# torch and the model take, so each search ends at tens to hundreds of samples, not at the machine's RAM.
DEFAULT_CPU_BUDGETS = {"mlp-digits": "700MiB", "cnn": "900MiB", "resnet": "900MiB", "gpt": "1GiB"}


def gpu_models():
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_models as models  # benchmarks/gpu_models.py, beside this script

    return models.MODELS


def budgets(specs: list[str], names: list[str], device: str) -> dict[str, int | None]:
    """``NAME=SIZE`` or ``SIZE`` (for all) -> bytes per workload; CPU defaults, none on CUDA."""
    chosen: dict[str, int | None] = {
        name: (
            parse_bytes(DEFAULT_CPU_BUDGETS[name])
            if device == "cpu" and name in DEFAULT_CPU_BUDGETS
            else None
        )
        for name in names
    }
    for spec in specs:
        if "=" in spec:
            name, _, size = spec.partition("=")
            chosen[name.strip()] = parse_bytes(size)
        else:
            chosen = {name: parse_bytes(spec) for name in names}
    return chosen


def _at(batch: int | None, samples_per_second: float | None) -> str:
    if batch is None:
        return "-"
    return f"{batch} ({samples_per_second:,.0f}/s)" if samples_per_second else str(batch)


def summary_rows(result: Profile) -> list[str]:
    rows = []
    for v in result.variants:
        rows.append(
            f"| {result.workload} | {v.variant} | {v.fit_batch_size or '-'} | "
            f"{_at(v.knee_batch, v.knee_samples_per_second)} | {_at(v.best_batch, v.best_samples_per_second)} | "
            f"{_at(v.largest_fitting_batch, v.largest_fitting_samples_per_second)} | "
            f"{format_bytes(v.bytes_per_sample)} | {format_bytes(result.budget_bytes)} |"
        )
    return rows


SUMMARY_HEADER = [
    "| workload | variant | fit | knee (samples/s) | best (samples/s) | largest fitting (samples/s) | memory/sample | budget |",
    "|---|---|--:|--:|--:|--:|--:|--:|",
]


def points_table(result: Profile) -> list[str]:
    allocated = any(p.allocated_bytes is not None for p in result.points)
    header = (
        "| variant | batch | fits | ms/step | samples/s | peak |"
        + (" allocated |" if allocated else "")
        + " from | |"
    )
    lines = [header, "|---|--:|---|--:|--:|--:|" + ("--:|" if allocated else "") + "---|---|"]
    for v in result.variants:
        for p in result.points_of(v.variant):
            marks = [m for m, on in (("knee", p.batch_size == v.knee_batch), ("best", p == result.best),
                                     ("fit", p.fit_answer)) if on]  # fmt: skip
            cells = [
                p.variant,
                str(p.batch_size),
                "yes" if p.fits else p.outcome,
                f"{p.step_seconds * 1e3:.1f}" if p.step_seconds else "",
                f"{p.samples_per_second:,.1f}" if p.samples_per_second else "",
                format_bytes(p.peak_bytes),
            ]
            if allocated:
                cells.append(format_bytes(p.allocated_bytes))
            cells += ["search" if p.memory_source == "fit search" else "timed", " ".join(marks)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads", default=None, help=f"built-ins, comma-separated ({', '.join(BUILTIN)})"
    )
    parser.add_argument("--gpu-models", default=None, help="from gpu_models.py: resnet50,vit-b,gpt2-small")
    parser.add_argument(
        "--scale", choices=("full", "tiny"), default="full", help="gpu models: tiny = dry run"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--checkpointing", default="off")
    parser.add_argument("--memory-budget", action="append", default=[], help="NAME=SIZE or SIZE for all")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--seconds-per-point", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (default 1, see above)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds; skip workloads after it")
    parser.add_argument("--out", default=str(BENCHMARKS / "results" / "profile"))
    args = parser.parse_args(argv)

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.gpu_models:
        factories = gpu_models()
        names = args.gpu_models.split(",")
        build = {name: (lambda n=name: factories[n](device=args.device, scale=args.scale)) for name in names}
    else:
        names = (args.workloads or "mlp-digits,cnn,resnet,gpt").split(",")
        build = {name: (lambda n=name: load_workload(n, device=args.device)) for name in names}
    precisions = args.precision.split(",")
    checkpointing = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    limits = budgets(args.memory_budget, names, args.device)
    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    report = out / "profile.md"
    started = time.perf_counter()
    command = "python benchmarks/profile_builtin.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [
        f"Profile tables, {datetime.date.today().isoformat()}, {machine_line(args.device)}.",
        f"Command: `{command}`",
        "",
    ]
    report.write_text("\n".join(head) + "\n")
    print("\n".join(head))
    summaries, details = [], []
    for name in names:
        if args.deadline is not None and time.perf_counter() - started > args.deadline:
            details += [f"{name}: skipped, past the {args.deadline:.0f} s deadline", ""]
            continue
        workload = build[name]()
        t0 = time.perf_counter()
        result = profile(
            workload,
            device=args.device,
            precisions=precisions,
            checkpointing=checkpointing,
            memory_budget=limits.get(name),
            max_batch_size=args.max_batch_size,
            seconds_per_point=args.seconds_per_point,
        )
        took = time.perf_counter() - t0
        (out / f"{result.workload}.json").write_text(result.to_json(indent=1))
        plot_profile(result, out / "plots")
        summaries += summary_rows(result)
        details += (
            [f"**{result.workload}** on {result.device}, {took:.0f} s:", ""] + points_table(result) + [""]
        )
        details += [f"- {line}" for line in result.findings] + [f"- warning: {w}" for w in result.warnings]
        details += [""]
        del workload
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        body = SUMMARY_HEADER + summaries + [""] + details
        report.write_text("\n".join(head + body) + "\n")  # rewritten after each workload: a cut run keeps it
        print("\n".join(points_table(result)), flush=True)
    print("\n".join(SUMMARY_HEADER + summaries))
    print(f"\nwrote {report} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
