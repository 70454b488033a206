"""``batchlab noise``: the gradient noise scale B_simple (the critical batch) from a short training run."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console

from batchlab import checks
from batchlab.cli.common import Display, add_workload_options, build_workload
from batchlab.errors import WorkloadError
from batchlab.noise import (
    COLLECTORS,
    DEFAULT_BETA,
    DEFAULT_NOISE_BATCH,
    DEFAULT_NOISE_STEPS,
    NoiseScaleEstimate,
    check_beta,
    measure_noise_scale,
    measurement_dict,
    noise_batch_for,
    noise_collector,
    require_workload,
)
from batchlab.sweeps.branched import (
    DEFAULT_REFERENCE_STEPS,
    BranchedCriticalBatch,
    BranchTrial,
    branch_critical_batch,
    check_batch_sizes,
)
from batchlab.sweeps.branched import RULES as BRANCH_RULES
from batchlab.sweeps.workload_run import missing_validation


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "noise",
        help="measure the gradient noise scale B_simple (the critical batch size)",
        description="Train the workload briefly with a noise-scale collector hooked in (McCandlish et al. "
        "2018, two batch sizes per step), report B_simple with its standard error, then restore the "
        "model, optimizer and RNG states bitwise.",
    )
    add_workload_options(parser)
    add_noise_options(parser, prefix="")
    branch = parser.add_argument_group(
        "the critical batch measured directly (batchlab.branch_critical_batch; needs workload.validation)"
    )
    branch.add_argument(
        "--branch",
        metavar="SIZES",
        default=None,
        help="also branch short runs at these batch sizes (comma-separated, >= 3) from the current state, fit "
        "B_crit to their steps to a target loss, and report B_simple / B_crit",
    )
    branch.add_argument(
        "--base-batch",
        type=int,
        default=None,
        help="the batch the optimizer's LR is set for; the branches' LR moves from it by --rule "
        "(default: the noise measurement's batch)",
    )
    branch.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        help=f"the target is the validation loss this many steps at --base-batch reach (default {DEFAULT_REFERENCE_STEPS})",
    )
    branch.add_argument(
        "--target-loss", type=float, default=None, help="the validation loss to branch towards, instead"
    )
    branch.add_argument(
        "--rule", choices=BRANCH_RULES, default=None, help="how the LR moves with the batch (default sqrt)"
    )
    parser.set_defaults(run=run)


BRANCH_FLAGS = ("base_batch", "reference_steps", "target_loss", "rule")  # what only --branch reads


def parse_branch(args: argparse.Namespace, only_with: tuple[str, ...] = BRANCH_FLAGS) -> list[int] | None:
    """The ``--branch`` sizes, or None. A flag of ``only_with`` (argparse dests) given without ``--branch`` is
    refused: it would do nothing. Bad sizes are refused by the library's own check, before anything trains."""
    if args.branch is None:
        given = [f"--{name.replace('_', '-')}" for name in only_with if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --branch SIZES (e.g. --branch 8,16,32,64)")
        return None
    try:
        sizes = [int(size) for size in args.branch.split(",")]
    except ValueError:
        raise ValueError(
            f"--branch {args.branch!r}: expected comma-separated batch sizes, e.g. 8,16,32,64"
        ) from None
    return check_batch_sizes(sizes)


def check_branch_values(reference_steps: int | None, target_loss: float | None) -> None:
    """The branch window and target, by the library's own checks, before anything trains."""
    checks.integer("reference_steps", reference_steps, none=True)
    checks.number("target_loss", target_loss, none=True)


def add_noise_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    """``--steps``/``--batch``/``--collector``/``--beta`` (``noise``) or ``--noise-steps``/... (``advise``)."""
    parser.add_argument(
        f"--{prefix}steps",
        type=int,
        default=DEFAULT_NOISE_STEPS,
        help=f"training steps to measure over (default {DEFAULT_NOISE_STEPS}; each undone afterwards)",
    )
    parser.add_argument(
        f"--{prefix}batch",
        type=int,
        default=None,
        help=f"micro-batch to train at (default {DEFAULT_NOISE_BATCH}, capped by the dataset size); "
        "most precise near B_noise itself",
    )
    parser.add_argument(
        f"--{prefix}collector",
        default="auto",
        choices=COLLECTORS,
        help="accumulation (micro-batches vs their sum; needs grad_accum > 1), split (each batch as two "
        "halves) or auto (accumulation when the workload accumulates)",
    )
    parser.add_argument(
        f"--{prefix}beta",
        type=float,
        default=DEFAULT_BETA,
        help=f"EMA decay of the tracker (default {DEFAULT_BETA})",
    )


def check_noise_args(steps: int, batch: int | None, beta: float) -> None:
    """Fail on bad values before any model is built."""
    checks.integer("steps", steps)
    if batch is not None:
        checks.integer("noise batch", batch, minimum=2)
    check_beta(beta)


def run(args: argparse.Namespace) -> int:
    check_noise_args(args.steps, args.batch, args.beta)
    sizes = parse_branch(args)
    if sizes is not None:
        checks.integer("base_batch", args.base_batch, none=True)
        check_branch_values(args.reference_steps, args.target_loss)
    workload = require_workload(build_workload(args), "batchlab noise")
    batch = noise_batch_for(workload, args.batch)
    if sizes is not None and getattr(workload, "validation", None) is None:
        raise WorkloadError(missing_validation(f"--branch: {args.workload}"))
    kind = noise_collector(workload, args.collector)
    started = time.perf_counter()
    with Display(f"noise {args.workload}", enabled=not args.json) as display:
        display.phase(f"{args.steps} training steps at batch {batch} ({kind} collector)")
        estimate = measure_noise_scale(
            workload,
            batch,
            steps=args.steps,
            collector=args.collector,
            beta=args.beta,
            on_step=lambda index, _pair: display.count("step", index + 1, args.steps),
        )
        seconds = time.perf_counter() - started
        branched = None
        if sizes is not None:
            base = args.base_batch if args.base_batch is not None else batch
            display.phase(
                f"branching at batches {', '.join(map(str, sizes))} from the current state (base {base})"
            )
            branched = branch_critical_batch(
                workload,
                sizes,
                base_batch=base,
                reference_steps=DEFAULT_REFERENCE_STEPS
                if args.reference_steps is None
                else args.reference_steps,
                target_loss=args.target_loss,
                rule="sqrt" if args.rule is None else args.rule,
                on_trial=lambda trial: display.line(trial_line(trial)),
            )
    ratio = b_simple_over_b_crit(estimate, branched) if branched is not None else None
    if args.json:
        data = measurement_dict(estimate, kind, batch, args.steps, seconds)
        data["workload"] = args.workload
        if branched is not None:
            data["branched"] = branched.to_dict()
            data["b_simple_over_b_crit"] = ratio
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        print_noise(console, estimate, kind, batch, args.steps, seconds)
        if branched is not None:
            print_branched(console, branched, ratio)
    if branched is not None and branched.fit is None:
        return 1
    return 0 if estimate.b_simple is not None else 1


def trial_line(trial: BranchTrial) -> str:
    """One LR tried at one batch, as it finishes (the progress of ``--branch``)."""
    reached = f"{trial.steps:.1f} steps to the target" if trial.steps is not None else "target not reached"
    return f"batch {trial.batch_size}, lr {trial.lr:.3g}: {reached}"


def b_simple_over_b_crit(estimate: NoiseScaleEstimate, branched: BranchedCriticalBatch) -> float | None:
    """How near the noise scale lands to the branched critical batch (None where either is missing)."""
    return estimate.b_simple / branched.b_crit if branched.b_crit and estimate.b_simple else None


def print_branched(console: Console, branched: BranchedCriticalBatch, ratio: float | None) -> None:
    """The branched B_crit beside B_simple: which the noise scale estimates, and how near it lands."""
    console.print()
    console.print(branched.summary(), highlight=False)
    if ratio is not None:
        console.print(
            f"B_simple / B_crit = {ratio:.2f}: B_simple estimates the critical batch from the gradients' noise "
            "(McCandlish et al. 2018); the branched fit measures it from steps to a target (Merrill et al. 2025)"
        )


def _pm(value: float | None, stderr: float | None, fmt: str = ".3g") -> str:
    if value is None:
        return "n/a"
    return f"{value:{fmt}}" + (f" ± {stderr:{fmt}}" if stderr is not None else "")


def describe_noise(estimate: NoiseScaleEstimate) -> str:
    """One line: B_simple with its standard error, or why there is none."""
    if estimate.b_simple is None:
        return f"B_simple not measured: {estimate.note}"
    return f"B_simple ≈ {_pm(estimate.b_simple, estimate.b_simple_stderr, ',.0f')} (1 standard error)"


def print_noise(
    console: Console, estimate: NoiseScaleEstimate, kind: str, batch: int, steps: int, seconds: float
) -> None:
    console.print()
    style = "bold green" if estimate.b_simple is not None else "bold red"
    console.print(f"[{style}]{describe_noise(estimate)}[/]")
    if estimate.b_simple is not None:
        console.print(
            f"the critical batch: below ~{estimate.b_simple:,.0f} doubling the batch nearly halves the steps to a "
            f"result; above it, it buys less and less (McCandlish et al. 2018)"
        )
    console.print(
        f"|G|² = {_pm(estimate.g2, estimate.g2_stderr)}, tr(Σ) = {_pm(estimate.trace_sigma, estimate.trace_sigma_stderr)}"
        f"; {estimate.updates} updates ({estimate.effective_updates:.1f} effective), {estimate.samples:,.0f} "
        f"samples, {estimate.skipped} skipped"
    )
    console.print(
        f"[dim]{estimate.note}; {seconds:.1f} s. Measured over {steps} real training steps at batch {batch} "
        f"({kind} collector) from the current state -- the noise scale grows as training goes on -- then the "
        f"model, optimizer and RNG states were restored.[/]"
    )
