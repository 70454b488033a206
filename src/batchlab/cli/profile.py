"""``batchlab profile``: throughput and peak memory over batch sizes, precisions and checkpointing; the knee."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from batchlab.cli.common import Display, add_workload_options, build_workload, comma_ints, comma_list
from batchlab.defaults import KNEE_THRESHOLD, MEASURED_MAX_BATCH, WARMUP_STEPS
from batchlab.optional import require
from batchlab.profiling.analysis import DEFAULT_TIMING_ROUNDS, SECONDS_PER_POINT, check_rounds
from batchlab.profiling.api import parse_precisions, profile
from batchlab.profiling.records import MemorySource, Profile
from batchlab.units import format_bytes, parse_bytes

_SWITCH = {"off": False, "on": True, "false": False, "true": True, "no": False, "yes": True}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="throughput and memory over batch sizes, precisions and checkpointing; the knee",
        description="Measure samples/s and peak memory at the powers of two up to the largest batch that fits "
        "(found once, its probes reused), for each precision and checkpointing setting, and find the knee.",
    )
    add_workload_options(parser)
    parser.add_argument(
        "--precision",
        default=None,
        help="comma-separated: fp32, bf16, fp16 (autocast; default: the workload's own)",
    )
    parser.add_argument(
        "--checkpointing",
        default="off",
        help="activation checkpointing of the model's repeated blocks: off, on, or off,on to compare",
    )
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated sizes to profile (default: powers of two up to the fit)",
    )
    parser.add_argument(
        "--memory-budget", default=None, help='treat the device as having this much memory, e.g. "4GiB"'
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help=f"never profile above this (default, for searched sizes: {MEASURED_MAX_BATCH:,}: no larger batch can "
        "win on goodput, and a small model with no dataset size fits millions)",
    )
    parser.add_argument(
        "--knee-threshold",
        type=float,
        default=KNEE_THRESHOLD,
        help=f"the knee is the smallest batch reaching this share of the best samples/s (default {KNEE_THRESHOLD})",
    )
    parser.add_argument(
        "--seconds-per-point",
        type=float,
        default=SECONDS_PER_POINT,
        help=f"timed seconds aimed for per batch size and variant (default {SECONDS_PER_POINT})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"time the fitting sizes in this many interleaved rounds, steps pooled per size (default "
        f"{DEFAULT_TIMING_ROUNDS}; more for a machine whose load comes in bursts that cover one size's window)",
    )
    parser.add_argument("--plot", default=None, metavar="DIR", help="write throughput and memory PNGs here")
    parser.set_defaults(run=run)


def parse_switches(text: str) -> list[bool]:
    """``"off,on"`` -> ``[False, True]``."""
    values = []
    for item in comma_list(text):
        if item.lower() not in _SWITCH:
            raise ValueError(f"invalid --checkpointing {text!r}: expected off, on or off,on")
        values.append(_SWITCH[item.lower()])
    if not values:
        raise ValueError(f"invalid --checkpointing {text!r}: expected off, on or off,on")
    return values


def run(args: argparse.Namespace) -> int:
    # Validate every argument before building anything: a typo must not cost a model build.
    precisions = parse_precisions(args.precision)
    checkpointing = parse_switches(args.checkpointing)
    sizes = None if args.batch_sizes is None else comma_ints("--batch-sizes", args.batch_sizes)
    check_rounds(args.rounds, "--rounds")
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    if args.plot is not None:
        # a missing matplotlib fails now, not after minutes of measuring
        require("matplotlib.figure", extra="plot", purpose="plots")
    workload = build_workload(args)
    with Display(f"profile {args.workload}", enabled=not args.json) as display:
        display.phase("fit search" if sizes is None else "timing batch sizes")
        result = profile(
            workload,
            device=args.device,
            batch_sizes=sizes,
            precisions=precisions,
            checkpointing=checkpointing,
            memory_budget=args.memory_budget,
            max_batch_size=args.max_batch_size,
            knee_threshold=args.knee_threshold,
            seconds_per_point=args.seconds_per_point,
            rounds=args.rounds,
            on_point=display.point,
            on_probe=display.variant_probe,
        )
    plots = {}
    if args.plot is not None:
        from batchlab.profiling.plots import plot_profile

        plots = {kind: str(path) for kind, path in plot_profile(result, args.plot).items()}
    if args.json:
        data = result.to_dict()
        data["plots"] = plots
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        print_profile(console, result)
        for kind, path in plots.items():
            console.print(f"{kind} plot: {path}")
    return 0 if result.best is not None else 1


def profile_table(result: Profile) -> Table:
    """One row per (variant, batch size): fits, median step time, samples/s, peak memory, where from, marks."""
    allocated = any(p.allocated_bytes is not None for p in result.points)
    loader = any(p.loader_samples_per_second for p in result.points)
    table = Table(
        title=f"{result.workload} on {result.device}: budget {format_bytes(result.budget_bytes)}",
        show_header=True,
    )
    table.add_column("variant", no_wrap=True)
    table.add_column("batch", justify="right")
    table.add_column("fits", no_wrap=True)
    table.add_column("ms/step", justify="right")
    table.add_column("samples/s", justify="right")
    if loader:
        table.add_column("+loader", justify="right")
    table.add_column("peak", justify="right", no_wrap=True)
    if allocated:
        table.add_column("allocated", justify="right", no_wrap=True)
    table.add_column("from")  # the fit search's probe (reused) or this profile's own run
    table.add_column("")
    for summary in result.variants:
        for p in result.points_of(summary.variant):
            marks = []
            if p.batch_size == summary.knee_batch:
                marks.append("knee")
            if result.best is not None and p == result.best:
                marks.append("[bold green]best[/]")
            if p.fit_answer:
                marks.append("fit")
            row = [
                p.variant,
                str(p.batch_size),
                "yes" if p.fits else f"[red]{p.outcome}[/]",
                f"{p.step_seconds * 1e3:.1f}" if p.step_seconds else "",
                f"{p.samples_per_second:,.1f}" if p.samples_per_second else "",
            ]
            if loader:
                row.append(f"{p.loader_samples_per_second:,.1f}" if p.loader_samples_per_second else "")
            row.append(format_bytes(p.peak_bytes))
            if allocated:
                row.append(format_bytes(p.allocated_bytes))
            row += ["search" if p.memory_source is MemorySource.FIT_SEARCH else "own run", " ".join(marks)]
            table.add_row(*row)
    return table


def print_profile(console: Console, result: Profile) -> None:
    console.print()
    console.print(profile_table(result))
    for line in result.findings:
        console.print(f"- {line}")
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]")
    console.print(
        f"[dim]ms/step: median of the timed steps after {WARMUP_STEPS} warm-up steps; knee: the smallest batch "
        f"reaching {result.knee_threshold:.0%} of the variant's best samples/s; fit: the fit search's answer; "
        f"from: peak memory of the search's probe (reused) or of the profile's own run of the size; took {result.seconds:.1f} s[/]"
    )
