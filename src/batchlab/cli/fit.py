"""``batchlab fit``: the largest batch that fits (``--batch -1``/``0.8``) or a check of a fixed one (``64``)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from batchlab.cli.common import Display, add_workload_options, build_workload, print_breakdown
from batchlab.fit import FitResult, find_batch_size
from batchlab.spec import parse_amp, parse_batch
from batchlab.units import format_bytes, parse_bytes


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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Validate every argument before building anything: a typo must not cost a model build.
    parse_batch(args.batch)
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    parse_amp(args.amp)
    workload = build_workload(args)
    with Display(f"fit {args.workload}", enabled=not args.json) as display:
        display.phase("probing batch sizes")
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
        )
    if args.json:
        print(result.to_json(indent=2))
    else:
        print_summary(Console(), result)
    return 0 if result.fits else 1


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
