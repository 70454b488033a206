"""``batchlab fit``: the largest batch that fits (``--batch -1``/``0.8``) or a check of a fixed one (``64``);
with ``--shapes 128,256,512`` the largest batch of each sequence length (or image size), as a table."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from batchlab.cli.common import (
    Display,
    add_workload_options,
    build_workload,
    comma_shapes,
    print_breakdown,
    print_table_footer,
)
from batchlab.fit import FitResult, MemoryLine, find_batch_size
from batchlab.fit.shapes import Shape, ShapeTable
from batchlab.optional import require
from batchlab.planning import estimate_memory_lines
from batchlab.spec import parse_amp, parse_batch
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload.workload import Workload


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="find the largest batch whose full training step fits in memory",
        description="Probe a few batch sizes, predict the largest that fits, verify it with real training steps.",
    )
    add_workload_options(parser)
    parser.add_argument(
        "--batch",
        default="-1",
        help="-1 or auto (largest at 0.90), a fraction like 0.8, or a fixed size like 64",
    )
    parser.add_argument(
        "--memory-budget", default=None, help='treat the device as having this much memory, e.g. "4GiB"'
    )
    parser.add_argument("--amp", default=None, help="probe under autocast: bf16 or fp16")
    parser.add_argument("--max-batch-size", type=int, default=None, help="never answer more than this")
    parser.add_argument("--multiple-of", type=int, default=1, help="answer a multiple of this (e.g. 8)")
    parser.add_argument(
        "--eval",
        action="store_true",
        help="the largest evaluation batch: forward and loss under no_grad, the model in eval mode",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="the largest batch per batch shape: lengths 128,256,512 or image sizes 320x320,640x640 (the "
        "workload's make_batch takes shape=)",
    )
    parser.add_argument(
        "--from-plan",
        action="store_true",
        help="with --shapes: first estimate each shape's memory from fake tensors (a few seconds per shape) "
        "and start the measured table from that",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="with --shapes: plot largest batch and tokens per batch here",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Validate every argument before building anything: a typo must not cost a model build.
    parse_batch(args.batch)
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    parse_amp(args.amp)
    shapes = comma_shapes("--shapes", args.shapes) if args.shapes is not None else None
    if args.plot is not None:
        if shapes is None:
            raise ValueError("--plot draws the shape table: give --shapes too")
        require("matplotlib.figure", extra="plot", purpose="plots")  # fails now, not after the search
    if args.from_plan and shapes is None:
        raise ValueError("--from-plan seeds the shape table: give --shapes too")
    if args.from_plan and args.eval:
        raise ValueError(
            "--from-plan plans the training step; the evaluation step (--eval) has no plan to seed from"
        )
    workload = build_workload(args)
    with Display(f"fit {args.workload}", enabled=not args.json) as display:
        estimate = None
        if args.from_plan:
            display.phase(f"estimating {len(shapes)} shapes from fake tensors")
            estimate = _planned_lines(workload, shapes, args.amp)
        display.phase(
            "probing batch sizes" if shapes is None else f"probing batch sizes at {len(shapes)} shapes"
        )
        result = find_batch_size(
            workload,
            device=args.device,
            batch=args.batch,
            memory_budget=args.memory_budget,
            amp=args.amp,
            max_batch_size=args.max_batch_size,
            multiple_of=args.multiple_of,
            on_probe=display.probe,
            mode="eval" if args.eval else "train",
            shapes=shapes,
            estimate=estimate,
        )
    if isinstance(result, ShapeTable):
        return _report_table(args, result)
    if args.json:
        print(result.to_json(indent=2))
    else:
        print_summary(Console(), result)
    return 0 if result.fits else 1


def _planned_lines(workload: Any, shapes: list[Shape], amp: str | None) -> dict[Shape, MemoryLine]:
    """Each shape's estimated memory line on the device type the model is on, the one searched (``--from-plan``)."""
    if not isinstance(workload, Workload):
        raise TypeError(
            "--from-plan needs a workload with a model to copy to fake tensors, not a step callable"
        )
    return estimate_memory_lines(workload, shapes, device_type=workload.device.type, amp=amp)


def _report_table(args: argparse.Namespace, table: ShapeTable) -> int:
    plot = None
    if args.plot is not None:
        from batchlab.profiling.plots import plot_shapes

        plot = str(plot_shapes(table, args.plot, title=f"{args.workload}: largest batch per length"))
    if args.json:
        data = table.to_dict()
        data["plot"] = plot
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        print_shape_table(console, table)
        if plot is not None:
            console.print(f"plot: {plot}")
    return 0 if all(entry.fits for entry in table.entries) else 1


def print_shape_table(console: Console, table: ShapeTable) -> None:
    """The table: per shape the largest batch, tokens per batch, the prediction, its probes and peak."""
    console.print()
    console.print(
        f"[bold green]largest batch per shape[/] on {table.device}, budget {format_bytes(table.budget_bytes)}; "
        f"every entry verified with real steps; {table.probes} probes in {table.search_seconds:.1f} s"
    )
    rows = Table(show_header=True)
    for column in ("shape", "batch", "tokens/batch", "predicted", "probes", "peak", "limited by"):
        rows.add_column(column, justify="left" if column in ("shape", "limited by") else "right")
    for entry in table.entries:
        rows.add_row(
            entry.label,
            str(entry.batch_size) if entry.fits else f"[red]{entry.batch_size} (does not fit)[/]",
            f"{entry.tokens_per_batch:,}",
            "-" if entry.predicted_batch_size is None else str(entry.predicted_batch_size),
            str(len(entry.result.probes)),
            format_bytes(entry.result.peak_bytes),
            str(entry.result.limited_by),
        )
    console.print(rows)
    print_table_footer(console, table, estimated=False)


def print_summary(console: Console, result: FitResult) -> None:
    """The readable summary: the answer, the memory split, every probe."""
    console.print()
    style = "bold green" if result.fits else "bold red"
    console.print(f"[{style}]{result.summary()}[/]")
    if result.bytes_per_sample is not None:
        console.print(
            f"memory per sample {format_bytes(result.bytes_per_sample)}, fixed {format_bytes(result.fixed_bytes)}"
            f" (line through the larger probes); search took {result.search_seconds:.1f} s, {result.steps_run} training steps"
        )
    if result.memory_breakdown is not None:
        print_breakdown(
            console, result.memory_breakdown, f"memory at batch {result.batch_size}", result.peak_bytes
        )
    probes = Table(title="probes", show_header=True)
    for column in ("batch", "outcome", "peak", "predicted", "seconds"):
        probes.add_column(column, justify="right" if column != "outcome" else "left")
    for probe in result.probes:
        probes.add_row(
            str(probe.batch_size),
            probe.outcome,
            format_bytes(probe.peak_bytes),
            format_bytes(probe.predicted_peak_bytes),
            f"{probe.seconds:.2f}",
        )
    console.print(probes)
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]")
    if not result.fits:
        console.print("[red]run with --batch -1 to find the largest batch that fits[/]")
