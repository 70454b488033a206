"""``batchlab plan``: the largest batch that fits a card you do not have, estimated from fake tensors; with
``--shapes 128,256,512`` the largest batch per sequence length (or image size), as ``batchlab fit --shapes`` gives."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from batchlab import checks
from batchlab.cli.common import Display, comma_shapes, print_breakdown, print_table_footer
from batchlab.planning.cards import CARDS, DEVICE_TYPES, resolve_target
from batchlab.planning.plan import PlanResult, plan
from batchlab.planning.shapes import PlanShapeTable, plan_shapes
from batchlab.spec import parse_amp, parse_batch
from batchlab.units import format_bytes
from batchlab.workloads import BUILTIN, load_workload


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate the largest batch that fits a target card, without the card (fake tensors)",
        description="Run the training step on fake tensors (no memory, no GPU) and search the largest batch "
        "whose estimated peak fits the target at the fraction.",
    )
    parser.add_argument(
        "--workload",
        required=True,
        help=f"built-in ({', '.join(BUILTIN)}), path/to/file.py:function or module:function "
        "(the function returns a batchlab.Workload)",
    )
    parser.add_argument(
        "--target",
        required=True,
        help=f"a card ({', '.join(CARDS)}) or a memory size such as 24GiB",
    )
    parser.add_argument(
        "--device-type",
        choices=DEVICE_TYPES,
        default=None,
        help="device type of a memory-size target (default cuda); a card is always cuda",
    )
    parser.add_argument(
        "--batch",
        default="-1",
        help="-1 or auto (largest at 0.90), a fraction like 0.8, or a fixed size like 64 to check",
    )
    parser.add_argument("--amp", default=None, help="plan under autocast: bf16 or fp16")
    parser.add_argument("--max-batch-size", type=int, default=None, help="never answer more than this")
    parser.add_argument("--multiple-of", type=int, default=1, help="answer a multiple of this (e.g. 8)")
    parser.add_argument(
        "--world-size", type=int, default=1, help="ranks (cards) in the run; the answer is per rank"
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model with FSDP2 over --world-size ranks (fake process group)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="the largest batch per batch shape: lengths 128,256,512 or image sizes 320x320,640x640 (the "
        "workload's make_batch takes shape=)",
    )
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Validate every argument before building anything: a typo must not cost a model build.
    target = resolve_target(args.target, device_type=args.device_type)
    parse_batch(args.batch)
    parse_amp(args.amp)
    checks.integer("--world-size", args.world_size)
    shapes = comma_shapes("--shapes", args.shapes) if args.shapes is not None else None
    workload = load_workload(
        args.workload, device="cpu"
    )  # fake copies go to the target; CPU builds are enough
    with Display(f"plan {args.workload}", enabled=not args.json) as display:
        display.phase(f"training steps on fake tensors for {target.name}")
        options = {"batch": args.batch, "amp": args.amp, "max_batch_size": args.max_batch_size,
                   "multiple_of": args.multiple_of, "world_size": args.world_size, "fsdp": args.fsdp}  # fmt: skip
        if shapes is None:
            result = plan(workload, target, **options)
        else:
            result = plan_shapes(workload, target, shapes, **options)
    if args.json:
        print(result.to_json(indent=2))
    elif isinstance(result, PlanShapeTable):
        print_shape_table(Console(), result)
    else:
        print_summary(Console(), result)
    fits = all(e.fits for e in result.entries) if isinstance(result, PlanShapeTable) else result.fits
    return 0 if fits else 1


def print_shape_table(console: Console, table: PlanShapeTable) -> None:
    """The estimated table: per shape the largest batch, tokens per batch, peak and per-sample memory."""
    console.print(f"[bold green]{table.summary().splitlines()[0]}[/]")
    rows = Table(show_header=True)
    for column in ("shape", "batch", "tokens/batch", "est. peak", "per sample"):
        rows.add_column(column, justify="left" if column == "shape" else "right")
    for entry in table.entries:
        rows.add_row(
            entry.label,
            str(entry.batch_size) if entry.fits else f"[red]{entry.batch_size} (does not fit)[/]",
            f"{entry.tokens_per_batch:,}",
            format_bytes(entry.result.peak_bytes),
            format_bytes(entry.result.bytes_per_sample),
        )
    console.print(rows)
    print_table_footer(console, table, estimated=True)


def print_summary(console: Console, result: PlanResult) -> None:
    """The readable summary: the answer, the estimated memory by category, the slope, the notes."""
    style = "bold green" if result.fits else "bold red"
    console.print(f"[{style}]{result.summary()}[/]")
    if result.bytes_per_sample is not None:
        console.print(
            f"memory per sample {format_bytes(result.bytes_per_sample)}, fixed {format_bytes(result.fixed_bytes)}; "
            f"{len(result.probes)} fake probes in {result.seconds:.1f} s"
        )
    if result.breakdown is not None:
        title = f"estimated memory at batch {result.batch_size}"
        print_breakdown(console, result.breakdown, title, result.peak_bytes)
    console.print(f"[dim]target: {result.target.source}[/]")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]")
