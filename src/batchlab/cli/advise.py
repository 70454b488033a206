"""``batchlab advise``: parse the flags, call :func:`batchlab.advise`, print its recommendation and why.

The pipeline (fit, throughput, noise scale, recommendation) is :mod:`batchlab.advice.pipeline`; ``--json``
prints :meth:`~batchlab.advice.Advice.to_dict` with the workload's name first.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from batchlab import checks
from batchlab.advice.pipeline import (
    ADVISE_SECONDS_PER_POINT,
    DEFAULT_CURRENT_BATCH,
    THROUGHPUT_SOURCES,
    Advice,
    advise,
    check_critical_batch,
)
from batchlab.advice.records import Recommendation
from batchlab.advice.scaling import RULES
from batchlab.cli.common import Display, add_workload_options, build_workload
from batchlab.cli.noise import (
    add_noise_options,
    b_simple_over_b_crit,
    check_branch_values,
    check_noise_args,
    describe_noise,
    parse_branch,
    print_branched,
    trial_line,
)
from batchlab.defaults import GAIN_THRESHOLD, MEASURED_MAX_BATCH
from batchlab.errors import NoNoiseScaleError, WorkloadError
from batchlab.fit.records import Limit
from batchlab.profiling.analysis import check_rounds
from batchlab.sweeps.branched import DEFAULT_REFERENCE_STEPS, branch_advice
from batchlab.sweeps.branched import RULES as BRANCH_RULES
from batchlab.sweeps.workload_run import missing_validation
from batchlab.units import parse_bytes

_SOURCE = {
    "measured": "meas.",
    "interpolated": "interp.",
    "accumulation": "accum.",
}  # short, to fit 80 columns


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "advise",
        help="the batch size and learning rate that reach a result soonest (goodput), with the reasoning",
        description="Measure what fits, throughput over batch sizes and the gradient noise scale, then "
        "recommend the batch with the most goodput (samples/s x statistical efficiency, Pollux), its "
        "learning rate, accumulation plan and epoch arithmetic. Switches from --batch only for > 5%.",
    )
    add_workload_options(parser)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"the global batch you train with now (default: --base-batch, else {DEFAULT_CURRENT_BATCH})",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="the learning rate (default: the workload optimizer's)"
    )
    parser.add_argument(
        "--base-batch", type=int, default=None, help="the batch --lr was tuned at (default: --batch)"
    )
    parser.add_argument(
        "--rule",
        default="auto",
        choices=("auto", *RULES),
        help="LR scaling: linear (SGD, Goyal et al.), sqrt (Adam-type, Malladi et al.), adascale, none; "
        "auto picks linear for SGD and sqrt otherwise",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs to plan for (default: per epoch)")
    parser.add_argument(
        "--dataset-size", type=int, default=None, help="samples per epoch (default: the workload's)"
    )
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    parser.add_argument(
        "--gain-threshold",
        type=float,
        default=GAIN_THRESHOLD,
        help=f"goodput gain needed to switch from --batch (default {GAIN_THRESHOLD}, as Pollux)",
    )
    parser.add_argument(
        "--throughput",
        default="auto",
        choices=THROUGHPUT_SOURCES,
        help="where samples/s come from: profile (steady-state timing), probes (the fit search's, rough) "
        "or auto (profile when available)",
    )
    parser.add_argument(
        "--seconds-per-point",
        type=float,
        default=None,
        help=f"profile: timed seconds per batch size (default {ADVISE_SECONDS_PER_POINT}; not with "
        "--throughput probes, which times nothing apart)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="profile: time the batch sizes in this many interleaved rounds, steps pooled per size (default 1; "
        "more for a machine whose load comes in bursts that cover one size's window); not with --throughput probes",
    )
    parser.add_argument(
        "--memory-budget", default=None, help='treat the device as having this much memory, e.g. "4GiB"'
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help=f"never consider a micro batch above this (default {MEASURED_MAX_BATCH:,}: larger ones cannot win on "
        "goodput, and a small model with no dataset size fits millions)",
    )
    add_noise_options(parser, prefix="noise-")
    critical = parser.add_argument_group(
        "a critical batch in place of B_simple (B_simple read 0.3-0.9x the swept critical batch: issue 13 item 4)"
    )
    critical.add_argument(
        "--critical-batch",
        type=float,
        default=None,
        help="a critical batch measured apart: the efficiency uses it instead of the measured B_simple",
    )
    critical.add_argument(
        "--branch",
        metavar="SIZES",
        default=None,
        help="measure the critical batch by branching short runs at these batch sizes (comma-separated, >= 3) "
        "from the current state (batchlab.branch_critical_batch; needs workload.validation), each LR moved from "
        "--base-batch by --rule, then advise with it",
    )
    critical.add_argument(
        "--branch-reference-steps",
        type=int,
        default=None,
        help=f"the branches' target is the validation loss this many steps at --base-batch reach (default "
        f"{DEFAULT_REFERENCE_STEPS})",
    )
    critical.add_argument(
        "--branch-target-loss",
        type=float,
        default=None,
        help="the validation loss to branch towards, instead",
    )
    parser.set_defaults(run=run)


_BRANCH_ONLY = ("branch_reference_steps", "branch_target_loss")  # what only --branch reads


def _check_args(args: argparse.Namespace) -> list[int] | None:
    """Fail on bad flag values before any model is built: a typo must not cost minutes of measuring. Returns the
    ``--branch`` sizes (None without it)."""
    for name in ("batch", "base_batch", "epochs", "dataset_size", "max_batch_size", "world_size"):
        value = getattr(args, name)
        if value is not None:
            checks.integer(f"--{name.replace('_', '-')}", value)
    if args.lr is not None:
        checks.number("--lr", args.lr)
    checks.number("--gain-threshold", args.gain_threshold, inclusive=True, what="0.05 = 5%")
    if args.seconds_per_point is not None:
        checks.number("--seconds-per-point", args.seconds_per_point, inclusive=True)
    check_rounds(args.rounds, "--rounds")
    if args.rounds is not None and args.throughput == "probes":
        raise ValueError("--rounds times batch sizes for --throughput profile; probes time nothing: drop one")
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    check_noise_args(args.noise_steps, args.noise_batch, args.noise_beta)
    if args.critical_batch is not None:
        check_critical_batch(args.critical_batch)
        if args.branch is not None:
            raise ValueError("--critical-batch gives the critical batch and --branch measures it: drop one")
    sizes = parse_branch(args, _BRANCH_ONLY)
    if sizes is not None:
        check_branch_values(args.branch_reference_steps, args.branch_target_loss)
        if args.rule not in ("auto", *BRANCH_RULES):
            raise ValueError(
                f"--branch moves each branch's LR by the {', '.join(BRANCH_RULES)} rule; --rule {args.rule} is "
                "not one of them: pick one, or measure the critical batch apart and pass --critical-batch"
            )
    return sizes


def run(args: argparse.Namespace) -> int:
    sizes = _check_args(args)
    workload = build_workload(args)
    if sizes is not None and getattr(workload, "validation", None) is None:
        raise WorkloadError(missing_validation(f"--branch: {args.workload}"))
    branched = None
    with Display(f"advise {args.workload}", enabled=not args.json) as display:
        b_simple_advice: Advice | None
        try:
            advice: Advice | NoNoiseScaleError = _advise(args, workload, display)
            b_simple_advice = advice
        except NoNoiseScaleError as failed:
            if sizes is None:
                raise
            display.line(f"no B_simple ({failed.note}): the branched critical batch stands alone")
            advice, b_simple_advice = failed, None
        if sizes is not None:
            display.phase(
                f"branching at batches {', '.join(map(str, sizes))} from the current state "
                f"(base {advice.options['base_batch']})"
            )
            branched, advice = branch_advice(
                workload,
                advice,
                sizes,
                reference_steps=DEFAULT_REFERENCE_STEPS
                if args.branch_reference_steps is None
                else args.branch_reference_steps,
                target_loss=args.branch_target_loss,
                on_trial=lambda trial: display.line(trial_line(trial)),
            )
    if isinstance(advice, NoNoiseScaleError):  # neither B_simple nor the branches: nothing to advise with
        if not args.json:
            print_branched(Console(), branched, None)
        raise ValueError(
            f"no noise scale to advise with ({advice.note}), and the branches gave no critical batch either "
            "(above): branch at other sizes, or set --branch-target-loss nearer the loss now"
        )
    seconds = advice.seconds + (branched.seconds if branched is not None else 0.0)
    if args.json:
        data = {"workload": args.workload, **advice.to_dict()}
        if branched is not None:
            data["branched"] = branched.to_dict()
            data["b_simple_recommendation"] = (
                b_simple_advice.recommendation.to_dict() if b_simple_advice else None
            )
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        if branched is not None:
            print_branched(console, branched, b_simple_over_b_crit(advice.noise, branched))
        print_advice(console, advice, cap_given=args.max_batch_size is not None)
        if branched is not None:
            _print_b_simple_advice(console, b_simple_advice, advice.noise.note, branched.b_crit)
        console.print(
            f"[dim]took {seconds:.1f} s; the workload's state was restored after every measurement[/]"
        )
    return 1 if branched is not None and branched.b_crit is None else 0


def _advise(args: argparse.Namespace, workload: Any, display: Display) -> Advice:
    """:func:`batchlab.advise` with the command's flags."""
    return advise(
        workload,
        current_batch=args.batch,
        lr=args.lr,
        base_batch=args.base_batch,
        rule=args.rule,
        epochs=args.epochs,
        dataset_size=args.dataset_size,
        world_size=args.world_size,
        gain_threshold=args.gain_threshold,
        throughput=args.throughput,
        seconds_per_point=args.seconds_per_point,
        rounds=args.rounds,
        device=args.device,
        memory_budget=args.memory_budget,
        max_batch_size=args.max_batch_size,
        noise_steps=args.noise_steps,
        noise_batch=args.noise_batch,
        noise_collector=args.noise_collector,
        noise_beta=args.noise_beta,
        critical_batch=args.critical_batch,
        progress=display,
    )


def _print_b_simple_advice(
    console: Console, from_b_simple: Advice | None, note: str, b_crit: float | None
) -> None:
    """What the measured B_simple alone advises, beside the branched advice: the recommendation when the
    branches gave no fit, a line beside it when both stand, and why not when B_simple could not be measured."""
    if from_b_simple is None:
        console.print(f"[yellow]no B_simple ({note}): the advice above uses the branched B_crit alone[/]")
        return
    rec = from_b_simple.recommendation
    if b_crit is None:
        console.print(
            "[bold red]the branches gave no critical batch (above): the advice above uses the measured "
            "B_simple[/]"
        )
        return
    console.print(
        f"[dim]with the measured B_simple ({rec.noise_scale:,.0f}) instead, advise would recommend batch "
        f"{rec.batch_size} at learning rate {rec.lr.lr:.3g}[/]"
    )


def print_advice(console: Console, advice: Advice, *, cap_given: bool = True) -> None:
    """Where each input came from, the recommendation, the reasoning, the goodput table and the notes.

    ``cap_given`` False: no ``--max-batch-size`` was given, so a fit limited by it met advise's own cap."""
    rec, fit, estimate = advice.recommendation, advice.fit, advice.noise
    limited_by = (
        f"advise's cap of {MEASURED_MAX_BATCH:,}: no larger micro-batch can win on goodput; "
        "--max-batch-size to raise it"
        if fit.limited_by == Limit.MAX_BATCH_SIZE and not cap_given
        else f"limited by {fit.limited_by}"
    )
    console.print()
    console.print(
        f"[dim]fit: largest micro batch {fit.batch_size} ({limited_by}) on {fit.device}\n"
        f"throughput from {advice.throughput_source}: {advice.throughput_detail}\n"
        f"noise: {describe_noise(estimate)}, {advice.noise_collector} collector at batch {advice.noise_batch}, "
        f"{estimate.updates} steps\n"
        + (
            f"efficiency from B_noise {rec.noise_scale:,.0f}, {rec.noise_from}, not from B_simple\n"
            if rec.noise_from
            else ""
        )
        + f"learning rate {rec.lr.base_lr:g} from {advice.lr_from}; rule {rec.lr.rule} ({advice.rule_reason})[/]"
    )
    console.print()
    how = (
        f"{rec.micro_batch} x {rec.accumulation_steps} accumulation steps"
        if rec.accumulation_steps > 1
        else f"{rec.micro_batch} per step"
    )
    if rec.world_size > 1:
        how += f" x {rec.world_size} ranks"
    verb = f"switch from {rec.current_batch}" if rec.switched else "keep it"
    console.print(
        f"[bold green]recommended batch {rec.batch_size}[/] ({how}), learning rate {rec.lr.lr:.3g} -- {verb}"
    )
    for line in rec.explanation:
        console.print(f"- {line}")
    console.print(goodput_table(rec))
    for note in rec.notes:
        console.print(f"[yellow]note: {note}[/]")
    for note in rec.lr.notes:
        console.print(f"[dim]lr: {note}[/]")


def goodput_table(rec: Recommendation) -> Table:
    """The measured sizes, the current, best and recommended batches and the accumulation rows."""
    table = Table(title="goodput (every candidate is in --json)", show_header=True, box=box.SIMPLE_HEAD)
    for column in ("batch", "micro×acc", "samples/s", "eff.", "goodput", "vs now", "from", ""):
        table.add_column(column, justify="left" if column in ("from", "") else "right", no_wrap=column != "")
    keep = {rec.current_batch, rec.best_batch, rec.batch_size}
    for c in rec.candidates:
        if not (c.source in ("measured", "accumulation") or c.batch_size in keep):
            continue
        marks = []
        if c.batch_size == rec.batch_size:
            marks.append("[bold green]advised[/]")
        if c.batch_size == rec.best_batch and rec.best_batch != rec.batch_size:
            marks.append("best")
        if c.batch_size == rec.current_batch:
            marks.append("now")
        if c.batch_size == rec.knee_batch * rec.world_size and c.accumulation_steps == 1:
            marks.append("knee")
        table.add_row(
            str(c.batch_size),
            f"{c.micro_batch}×{c.accumulation_steps}",
            f"{c.samples_per_second:,.0f}",
            f"{c.efficiency:.3f}",
            f"{c.goodput:,.0f}",
            f"{c.relative_goodput:.2f}x",
            _SOURCE.get(c.source, c.source),
            " ".join(marks),
        )
    return table
