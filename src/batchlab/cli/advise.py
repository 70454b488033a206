"""``batchlab advise``: fit + throughput + noise scale + schedule -> one batch size, its learning rate and why.

Four measurements, each restoring the workload's state afterwards:

1. the largest batch that fits (:func:`~batchlab.find_batch_size`) -- the largest micro batch;
2. throughput over batch sizes: :func:`batchlab.profile.profile` when it is importable (its own fit search is
   step 1), else the fit search's probes (two steps each, the first creating optimizer state: rough);
3. the gradient noise scale (:func:`~batchlab.measure_noise_scale`);
4. :func:`~batchlab.advise` combines them with the learning-rate rule and the epoch arithmetic.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from batchlab.advise import DEFAULT_GAIN_THRESHOLD, Recommendation, advise
from batchlab.cli.common import Display, add_workload_options, build_workload
from batchlab.cli.noise import (
    add_noise_options,
    check_noise_args,
    describe_noise,
    noise_batch_for,
    noise_dict,
    require_workload,
)
from batchlab.errors import DoesNotFitError
from batchlab.noise import measure_noise_scale, noise_collector
from batchlab.scaling import RULES
from batchlab.search import FitResult, find_batch_size
from batchlab.units import parse_bytes

# 32: the batch most example scripts and tutorials start from (PyTorch examples, Keras' fit default), used
# when neither --batch nor --base-batch says what the run uses now.
DEFAULT_CURRENT_BATCH = 32
# advise needs the curve's shape, not 1% precision: 0.2 timed seconds per size (profile's default is 1.0)
# keeps the mlp-digits run well under half a minute on two CPU cores.
ADVISE_SECONDS_PER_POINT = 0.2
THROUGHPUT_SOURCES = ("auto", "profile", "probes")
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
        default=DEFAULT_GAIN_THRESHOLD,
        help=f"goodput gain needed to switch from --batch (default {DEFAULT_GAIN_THRESHOLD}, as Pollux)",
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
        "--memory-budget", default=None, help='treat the device as having this much memory, e.g. "4GiB"'
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="never consider a micro batch above this"
    )
    add_noise_options(parser, prefix="noise-")
    parser.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    """Fail on bad values before any model is built: a typo must not cost minutes of measuring."""
    for name in ("batch", "base_batch", "epochs", "dataset_size", "max_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"invalid --{name.replace('_', '-')} {value!r}: expected an integer >= 1")
    if args.world_size < 1:
        raise ValueError(f"invalid --world-size {args.world_size!r}: expected an integer >= 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"invalid --lr {args.lr!r}: expected a number > 0")
    if not (math.isfinite(args.gain_threshold) and args.gain_threshold >= 0):
        raise ValueError(
            f"invalid --gain-threshold {args.gain_threshold!r}: expected a number >= 0 (0.05 = 5%)"
        )
    if args.seconds_per_point is not None:
        if args.throughput == "probes":
            raise ValueError(
                f"--seconds-per-point {args.seconds_per_point:g} times batch sizes for --throughput profile; "
                "--throughput probes reads the fit search's probes and times nothing: drop one of them"
            )
        if not (math.isfinite(args.seconds_per_point) and args.seconds_per_point >= 0):
            raise ValueError(
                f"invalid --seconds-per-point {args.seconds_per_point!r}: expected a number >= 0"
            )
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    check_noise_args(args.noise_steps, args.noise_batch, args.noise_beta)


def rule_for(optimizer: Any) -> tuple[str, str]:
    """(rule, reason) for ``--rule auto``: linear for SGD (Goyal et al. 2017), sqrt for adaptive optimizers."""
    name = type(optimizer).__name__
    defaults = getattr(optimizer, "defaults", {}) or {}
    if name == "SGD":
        return "linear", "SGD, Goyal et al. 2017"
    if "betas" in defaults or name in ("RMSprop", "Adagrad", "Adadelta"):
        return "sqrt", f"{name} is adaptive, Malladi et al. 2022"
    return "sqrt", f"{name} is neither SGD nor Adam-type; sqrt is the cautious choice"


def _optimizer_hyper(optimizer: Any) -> tuple[float | None, tuple[float, float] | None, float | None]:
    """(lr, betas, eps) of the first parameter group, where present."""
    group = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
    lr = group.get("lr")
    betas = group.get("betas")
    eps = group.get("eps")
    return (
        float(lr) if lr is not None else None,
        (float(betas[0]), float(betas[1])) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None,
        float(eps) if isinstance(eps, (int, float)) else None,
    )


def measure_throughput(args: argparse.Namespace, workload: Any, cap: int | None, display: Display):
    """(fit, {batch: samples/s}, source, detail): profile when importable (and asked), else the fit probes.

    ``display`` shows each phase (the fit search, the timed sizes) and each probe and point as it ends.
    """
    profile = None
    if args.throughput in ("auto", "profile"):
        try:
            from batchlab.profile import profile
        except ImportError as exc:
            if args.throughput == "profile":
                raise ImportError(
                    f"--throughput profile: batchlab.profile is not available ({exc})"
                ) from None
    if profile is not None:
        display.phase("what fits (fit search)")
        result = profile(
            workload,
            device=args.device,
            memory_budget=args.memory_budget,
            max_batch_size=cap,
            seconds_per_point=ADVISE_SECONDS_PER_POINT
            if args.seconds_per_point is None
            else args.seconds_per_point,
            on_point=display.point,
            on_probe=display.variant_probe,
        )
        fits = [(name, fit) for name, fit in result.fits.items() if fit is not None]
        if not fits:
            raise DoesNotFitError(
                f"nothing fits: {'; '.join(result.findings) or 'no batch size fits the budget'}",
                batch_size=1,
                needed_bytes=None,
                budget_bytes=result.budget_bytes,
            )
        variant, fit = fits[0]
        curve = {
            p.batch_size: p.samples_per_second
            for p in result.points
            if p.variant == variant and p.fits and p.samples_per_second
        }
        detail = (
            f"batchlab.profile ({variant}): median of timed steps after warm-up at {len(curve)} sizes, "
            f"{result.seconds:.1f} s"
        )
        return fit, curve, "profile", detail
    display.phase("what fits and throughput (fit search probes)")
    fit = find_batch_size(
        workload,
        device=args.device,
        memory_budget=args.memory_budget,
        max_batch_size=cap,
        on_probe=display.probe,
    )
    per_step = getattr(workload, "grad_accum", 1)
    curve = {
        p.batch_size: p.batch_size * per_step * p.steps / p.seconds
        for p in fit.probes
        if p.fits and p.steps and p.seconds > 0
    }
    detail = (
        f"the fit search's {len(curve)} probes: {fit.probes[0].steps} steps each including the first (which "
        f"creates optimizer state) -- rough, small sizes look slow; install/enable batchlab.profile for "
        f"steady-state timing"
    )
    return fit, curve, "fit probes", detail


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    started = time.perf_counter()
    workload = require_workload(build_workload(args))
    opt_lr, betas, eps = _optimizer_hyper(workload.optimizer)
    lr = args.lr if args.lr is not None else opt_lr
    if lr is None:
        raise ValueError("the workload's optimizer has no lr; pass --lr")
    lr_from = "--lr" if args.lr is not None else f"the workload's {type(workload.optimizer).__name__}"
    if args.rule == "auto":
        rule, rule_reason = rule_for(workload.optimizer)
    else:
        rule, rule_reason = args.rule, "--rule"
    current = args.batch or args.base_batch or DEFAULT_CURRENT_BATCH
    base = args.base_batch or current
    dataset_size = args.dataset_size or workload.dataset_size
    # the workload's own dataset size already caps fit and profile; the flags cap them further
    caps = [c for c in (args.max_batch_size, args.dataset_size) if c]
    cap = min(caps) if caps else None
    if dataset_size and current > dataset_size:
        raise ValueError(f"--batch {current} is larger than the dataset ({dataset_size} samples)")
    kind = noise_collector(workload, args.noise_collector)  # fails now for an impossible collector

    with Display(f"advise {args.workload}", enabled=not args.json) as display:
        fit, curve, source, detail = measure_throughput(args, workload, cap, display)
        noise_batch = noise_batch_for(workload, args.noise_batch, fit.batch_size)
        display.phase(f"noise scale, {args.noise_steps} steps at batch {noise_batch} ({kind} collector)")
        noise_started = time.perf_counter()
        estimate = measure_noise_scale(
            workload,
            noise_batch,
            steps=args.noise_steps,
            collector=kind,
            beta=args.noise_beta,
            on_step=lambda index, _pair: display.count("step", index + 1, args.noise_steps),
        )
    noise_seconds = time.perf_counter() - noise_started
    if estimate.b_simple is None:
        raise ValueError(
            f"no noise scale to advise with ({estimate.note}); try more --noise-steps or a larger --noise-batch"
        )
    rec = advise(
        curve,
        estimate,
        current_batch=current,
        lr=lr,
        base_batch=base,
        rule=rule,
        max_micro_batch=fit.batch_size,
        world_size=args.world_size,
        dataset_size=dataset_size,
        epochs=args.epochs,
        gain_threshold=args.gain_threshold,
        betas=betas,
        eps=eps,
    )
    seconds = time.perf_counter() - started
    if args.json:
        data = {
            "workload": args.workload,
            "device": fit.device,
            "recommendation": rec.to_dict(),
            "throughput_source": source,
            "throughput_detail": detail,
            "throughput": {str(b): s for b, s in sorted(curve.items())},
            "fit": {
                "batch_size": fit.batch_size,
                "limited_by": fit.limited_by,
                "budget_bytes": fit.budget_bytes,
                "peak_bytes": fit.peak_bytes,
            },
            "noise": noise_dict(estimate, kind, noise_batch, args.noise_steps, noise_seconds),
            "lr_from": lr_from,
            "rule_reason": rule_reason,
            "seconds": seconds,
        }
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        print_advice(
            console,
            args.workload,
            rec,
            fit,
            source,
            detail,
            estimate,
            noise_batch,
            kind,
            lr_from,
            rule_reason,
        )
        console.print(
            f"[dim]took {seconds:.1f} s; the workload's state was restored after every measurement[/]"
        )
    return 0


def print_advice(
    console: Console,
    workload: str,
    rec: Recommendation,
    fit: FitResult,
    source: str,
    detail: str,
    estimate: Any,
    noise_batch: int,
    kind: str,
    lr_from: str,
    rule_reason: str,
) -> None:
    console.print()
    console.print(
        f"[dim]fit: largest micro batch {fit.batch_size} (limited by {fit.limited_by}) on {fit.device}\n"
        f"throughput from {source}: {detail}\n"
        f"noise: {describe_noise(estimate)}, {kind} collector at batch {noise_batch}, "
        f"{estimate.updates} steps\n"
        f"learning rate {rec.lr.base_lr:g} from {lr_from}; rule {rec.lr.rule} ({rule_reason})[/]"
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
