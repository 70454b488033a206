"""``batchlab noise``: the gradient noise scale B_simple (the critical batch) from a short training run."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console

from batchlab import checks
from batchlab.cli.common import Display, add_workload_options, build_workload
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
    parser.set_defaults(run=run)


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
    workload = require_workload(build_workload(args), "batchlab noise")
    batch = noise_batch_for(workload, args.batch)
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
    if args.json:
        data = measurement_dict(estimate, kind, batch, args.steps, seconds)
        data["workload"] = args.workload
        print(json.dumps(data, indent=2))
    else:
        print_noise(Console(), estimate, kind, batch, args.steps, seconds)
    return 0 if estimate.b_simple is not None else 1


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
