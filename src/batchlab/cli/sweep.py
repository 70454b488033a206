"""``batchlab sweep``: train at several batch sizes, track every run in MLflow, write the comparison report."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchlab import checks
from batchlab.advice.ramp import MIN_ACCUMULATION
from batchlab.advice.scaling import RULES
from batchlab.cli.common import add_target_arguments, comma_ints, target_from
from batchlab.sweeps import (
    AUTO_MIN_BATCH,
    DEFAULT_DIRECTORY,
    NOISE_EVERY,
    Budget,
    RampFactory,
    SweepEvent,
    SweepResult,
    sweep,
)
from batchlab.units import format_bytes
from batchlab.workloads.tasks import ConfiguredFactory, Task, describe_tasks, load_task


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    tasks = "; ".join(f"{name}: {text}" for name, text in describe_tasks().items())
    parser = subparsers.add_parser(
        "sweep",
        help="train at several batch sizes (LR scaled by rule), track runs in MLflow, report the comparison",
        description="Train a fresh model at each batch size with the learning rate scaled by a rule, record loss "
        "curves, throughput, memory, the gradient noise scale and steps to a target; log every run to MLflow "
        "(default: ./batchlab-runs/mlflow.db); write an HTML report. Re-running the same command resumes.",
    )
    parser.add_argument(
        "--workload",
        required=True,
        help=f"built-in task ({tasks}) or path/to/file.py:function / module:function returning a factory "
        "(batch_size, lr, seed) -> trainable",
    )
    parser.add_argument(
        "--batch-sizes",
        required=True,
        help='comma-separated, e.g. 16,32,64 (samples per optimizer step), or "auto": powers of two from 8 up to '
        "the largest that fits",
    )
    parser.add_argument("--lr", type=float, required=True, help="learning rate tuned at --base-batch")
    parser.add_argument(
        "--base-batch", type=int, default=None, help="batch the --lr is for (default: the smallest)"
    )
    parser.add_argument(
        "--rule",
        default="sqrt",
        choices=[r for r in RULES if r != "adascale"],
        help="how the LR follows the batch: sqrt (Adam-type, default), linear (SGD) or none",
    )
    parser.add_argument(
        "--lr-grid", type=_floats, default=[1.0], help="LR multipliers per batch size, e.g. 0.5,1,2"
    )
    parser.add_argument("--budget-steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--budget-samples", type=int, default=None, help="training samples per run")
    parser.add_argument("--budget-seconds", type=float, default=None, help="seconds of training per run")
    add_target_arguments(parser, "")
    parser.add_argument(
        "--stop-at-target", action="store_true", help="end each run when it reaches the target"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per (batch size, LR) (default 1)")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every N steps (default: budget/50)"
    )
    parser.add_argument(
        "--backend", default="local", choices=("local", "ray"), help="local (default) or ray (Ray Tune)"
    )
    parser.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: start a local Ray)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI (default: sqlite:///{DEFAULT_DIRECTORY}/mlflow.db under --dir)",
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument(
        "--name", default=None, help="sweep name (default: workload + a hash of the settings)"
    )
    parser.add_argument(
        "--dir", default=DEFAULT_DIRECTORY, help=f"where sweeps live (default ./{DEFAULT_DIRECTORY})"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (built-in tasks: CUDA if available; a file's runs stay where its factory puts them), cpu, "
        "cuda or cuda:N",
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=None,
        help="micro-batches per step (default: 1 for built-in tasks, a file's own for its runs)",
    )
    parser.add_argument(
        "--amp", default=None, help="fp32, bf16 or fp16 autocast (default: fp32 / the file's own)"
    )
    parser.add_argument(
        "--noise-every",
        type=int,
        default=None,
        help=f"measure the noise scale every N steps, 0 = never (default: {NOISE_EVERY} / the file's own)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (local: torch.set_num_threads; ray: CPUs per trial, which Ray sets as "
        "each worker's thread count)",
    )
    ramp = parser.add_argument_group(
        "batch ramp",
        "grow each run's batch during training toward the noise scale its accumulation micro-batches measure, "
        "the LR, Adam's betas and eps carried at each change (batchlab.training.BatchRamp); built-in tasks",
    )
    ramp.add_argument(
        "--ramp-to",
        type=int,
        default=None,
        metavar="MAX_BATCH",
        help="ramp from each --batch-sizes value (the start) up to this global batch; batch and LR per step "
        "go to MLflow",
    )
    ramp.add_argument(
        "--ramp-target",
        type=float,
        default=None,
        help="grow toward this x B_simple (default 1; what paid off differed tenfold between data sets: "
        "benchmarks/RESULTS.md)",
    )
    ramp.add_argument(
        "--ramp-micro-batch",
        type=int,
        default=None,
        help="the largest micro-batch that fits, e.g. batchlab fit's answer (default: no cap but the split)",
    )
    ramp.add_argument(
        "--ramp-min-accumulation",
        type=int,
        default=None,
        help=f"micro-batches per step the noise scale is read from (default {MIN_ACCUMULATION})",
    )
    parser.add_argument("--no-report", action="store_true", help="do not write the HTML/PNG report")
    parser.add_argument("--json", action="store_true", help="print only a JSON summary on stdout")
    parser.set_defaults(run=run)


def _budget(args: argparse.Namespace) -> Budget:
    if args.budget_steps is None and args.budget_samples is None and args.budget_seconds is None:
        raise ValueError("give a budget per run: --budget-steps N, --budget-samples N or --budget-seconds S")
    return Budget(args.budget_steps, args.budget_samples, args.budget_seconds)


RAMP_FLAGS = ("ramp_target", "ramp_micro_batch", "ramp_min_accumulation")


def _ramped(factory, args: argparse.Namespace, batch_sizes) -> object:
    """``factory`` under a :class:`~batchlab.sweeps.RampFactory` when ``--ramp-to`` is given; every ramp flag
    and every combination the ramp cannot honour is refused here, before a model is built or MLflow starts."""
    if args.ramp_to is None:
        given = [f"--{name.replace('_', '-')}" for name in RAMP_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} needs --ramp-to MAX_BATCH")
        return factory
    max_batch = checks.integer("--ramp-to", args.ramp_to)
    if not isinstance(factory, Task):
        raise ValueError(
            f"--ramp-to ramps a built-in task ({', '.join(describe_tasks())}), not {args.workload}: for your own "
            "model, sweep batchlab.sweeps.RampFactory over a factory of batchlab.sweeps.SupervisedRun"
        )
    if batch_sizes == "auto":
        raise ValueError('--ramp-to needs the starting batches in --batch-sizes, not "auto"')
    if max_batch < max(batch_sizes):
        raise ValueError(
            f"invalid --ramp-to {max_batch}: below the starting batch {max(batch_sizes)} (--batch-sizes)"
        )
    for flag, value in (("--accumulation", args.accumulation), ("--noise-every", args.noise_every)):
        if value is not None:
            raise ValueError(
                f"{flag} {value} with --ramp-to: the ramp sets the accumulation and measures the noise scale on "
                "every step itself (--ramp-min-accumulation)"
            )
    micro = args.ramp_micro_batch if args.ramp_micro_batch is not None else max_batch
    given = {"target": args.ramp_target, "min_accumulation": args.ramp_min_accumulation}  # else RampFactory's
    return RampFactory(
        factory,
        max_batch=max_batch,
        max_micro_batch=checks.integer("--ramp-micro-batch", micro),
        **{name: value for name, value in given.items() if value is not None},
    )


def run(args: argparse.Namespace) -> int:
    # Validate everything before building a model or starting MLflow/Ray.
    budget, target = _budget(args), target_from(args)
    batch_sizes = (
        "auto"
        if args.batch_sizes.strip().lower() == "auto"
        else comma_ints("--batch-sizes", args.batch_sizes, example="16,64,256")
    )
    if args.no_tracking and args.tracking_uri:
        raise ValueError("give --tracking-uri or --no-tracking, not both")
    if args.ray_address is not None and args.backend != "ray":
        raise ValueError(f"--ray-address {args.ray_address} needs --backend ray")
    checks.integer("--threads", args.threads, none=True)
    factory = load_task(
        args.workload,
        device=args.device,
        accumulation=args.accumulation,
        amp=args.amp,
        noise_every=args.noise_every,
    )
    if isinstance(factory, ConfiguredFactory):  # a flag the file's runs cannot take fails before MLflow/Ray
        factory.check(AUTO_MIN_BATCH if batch_sizes == "auto" else min(batch_sizes), args.lr)
    factory = _ramped(factory, args, batch_sizes)
    if args.threads is not None and args.backend == "local":
        import torch

        torch.set_num_threads(args.threads)
    kwargs = dict(
        lr=args.lr,
        base_batch=args.base_batch,
        rule=args.rule,
        budget=budget,
        target=target,
        seeds=args.seeds,
        lr_multipliers=args.lr_grid,
        eval_every=args.eval_every,
        stop_at_target=args.stop_at_target,
        name=args.name,
        directory=args.dir,
        tracking_uri=False if args.no_tracking else args.tracking_uri,
        backend=args.backend,
        ray_address=args.ray_address,
        ray_cpus_per_trial=float(args.threads or 1),
        report=not args.no_report,
    )
    if args.json:
        result = sweep(factory, batch_sizes, **kwargs)
        print(json.dumps(_compact(result), indent=2))
        return 0
    console = Console()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        overall = progress.add_task("all runs", total=None)
        per_run: dict[str, int] = {}

        def show(event: SweepEvent) -> None:
            progress.update(overall, total=event.total)
            if event.kind == "skip":
                progress.advance(overall)
                return
            if event.kind == "start":
                per_run[event.key] = progress.add_task(f"  {event.key}", total=None)
            task = per_run.get(event.key)
            if task is None:
                per_run[event.key] = task = progress.add_task(f"  {event.key}", total=None)
            if event.kind == "step":
                progress.update(task, completed=event.step, total=event.max_steps)
            elif event.kind == "done":
                run = event.run
                note = f"{run.status}, val loss {run.final_val.get('loss', float('nan')):.4g}"
                if run.steps_to_target is not None:
                    note += f", target at step {run.steps_to_target:.0f}"
                progress.update(
                    task, completed=run.steps, total=run.steps, description=f"  {event.key}: {note}"
                )
                progress.advance(overall)

        result = sweep(factory, batch_sizes, on_event=show, **kwargs)
    print_summary(console, result)
    return 0


def _compact(result: SweepResult) -> dict:
    data = result.to_dict()
    data["runs"] = [
        {k: v for k, v in run.items() if k not in ("train", "val", "noise_updates")} for run in data["runs"]
    ]
    return data


def print_summary(console: Console, result: SweepResult) -> None:
    table = Table(title=f"sweep {result.name}: best LR per batch size", show_header=True)
    for column in (
        "batch",
        "lr",
        "steps",
        "steps to target",
        "s to target",
        "samples/s",
        "peak",
        "val loss",
        "noise",
    ):
        table.add_column(column, justify="right")
    for s in result.by_batch_size():
        table.add_row(
            str(s.batch_size),
            f"{s.lr:.3g}",
            str(s.steps),
            "–" if s.steps_to_target is None else f"{s.steps_to_target:.0f}",
            "–" if s.seconds_to_target is None else f"{s.seconds_to_target:.2f}",
            "–" if s.throughput is None else f"{s.throughput:,.0f}",
            format_bytes(s.peak_bytes) if s.peak_bytes else "–",
            "–" if s.final_val_loss is None else f"{s.final_val_loss:.4g}",
            "–" if s.noise_scale is None else f"{s.noise_scale:.3g}",
        )
    console.print(table)
    ends = result.ramp_ends()
    if ends:
        where = "each run's record" + (" and MLflow" if result.tracking_uri else "")
        console.print(
            f"batch ramp: each row's batch is its runs' start; they ended {ends} (per step in {where})"
        )
    console.print(result.summary())
    console.print(f"sweep directory: {result.directory}")
    if result.report:
        console.print(f"report: {result.report}")
    if result.tracking_uri:
        console.print(f"MLflow: mlflow ui --backend-store-uri {result.tracking_uri}")
    sys.stdout.flush()
