"""The batch ramp on real data: does growing the batch with the noise scale beat every fixed batch? (issue 13, item 3)

For each data set -- sklearn's digits, MNIST-1D (generated offline), and a byte-level language model of the
Python standard library's own source (``char-lm``) -- two sweeps through :func:`batchlab.sweep`, the same LR grid
and seeds, every run stopping at the target validation loss:

1. **Fixed**: every batch size of ``BATCH_SIZES`` (``--batches`` adds sizes, up to a ramp maximum above 256), the LR scaled
   from ``base_batch`` by the square-root rule times each multiplier of ``GRID`` (the built-in tasks: MLPs with
   Adam).
2. **Ramp**: :class:`batchlab.sweeps.RampFactory` from the smallest batch, up to the largest, micro-batches of at
   most ``MAX_MICRO`` (standing in for the fitted maximum): the noise scale is measured from the accumulation
   micro-batches and each change carries the LR (and Adam's betas and eps) by the same square-root rule. One
   ramp per ``--targets`` value: 1 grows toward B_simple (the default), 2 toward 2 x B_simple.
   ``--min-accumulation`` sets the micro-batches per step, the pairs the ramp reads the noise scale from.
   ``--ramp-rule none`` keeps the LR (and betas, eps) at each change instead: Smith et al. 2018, "Don't decay
   the learning rate, increase the batch size", where a growing batch at a fixed LR anneals the gradient noise
   as an LR decay would.

Per batch size (and for the ramp) the best multiplier's mean steps and samples to the target over the seeds
(:meth:`batchlab.sweeps.SweepResult.by_batch_size`). The issue's goals: no fixed batch reaches the target with
both fewer steps and fewer samples than the ramp; against the most sample-efficient fixed batch, the ramp takes
>= 30% fewer steps at <= 1.1x its samples. The verdict is the step-optimal multiplier's; each ramp line also
marks every multiplier that meets both goals by itself (a ramp's steps and samples are not proportional, so the
step-optimal multiplier need not be the one that meets them). ``--seeds 3,4,5`` runs seeds held out from a
choice made on 0 and 1. ``--target-loss`` moves one data set's target: whether a ramp can win depends on whether
the critical batch grows before the target, and it grows as the loss nears its floor (McCandlish et al. 2018).

**The fixed curve.** S = S_min (1 + B_crit/B) fitted to the fixed rows (McCandlish et al. 2018) stands for
every fixed batch, between the swept ones too. Each row's samples over the curve's at its steps say whether the
ramp beats the fixed batches or only slips between the swept ones: while the critical batch stays constant no
schedule gets under 1, so a ramp under 1 (beyond the fixed rows' own scatter about the curve) is one a growing
critical batch paid for. ``--curve results/*.json`` scores stored results this way without training.

Every run is logged to MLflow in a SQLite store under ``--directory`` (a temporary directory by default; never
committed). Writes benchmarks/results/batch_ramp.json and prints a Markdown section for RESULTS.md. One torch
thread (tiny models; more only contend on a shared 2-core machine); run with ``nice -n 5``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchlab.advice.ramp import MIN_ACCUMULATION
from batchlab.advice.scaling import RULES
from batchlab.noise.critical import CriticalBatchFit, fit_critical_batch
from batchlab.sweeps import Budget, RampFactory, SweepResult, sweep
from batchlab.workloads.tasks import Task
from provenance import machine_line, provenance

HERE = Path(__file__).resolve().parent
BATCH_SIZES = [16, 32, 64, 128, 256]
GRID = [0.5, 1.0, 2.0]
SEEDS = 2  # data orders per row, the minimum
MAX_MICRO = 64  # the micro-batch cap: 256 runs as 4 x 64
# Per data set: the LR at batch 16 (critical_batch.py's calibrated LRs at batch 8, x sqrt(2)), the target
# validation loss (reached by every batch size before it overfits: digits bottoms out near 0.07, MNIST-1D's MLP
# near 1.0, the char-LM keeps improving past 2.1 in 50k samples) and a sample cap per run.
EXPERIMENTS = {
    "mlp-digits": {"lr": 5.6e-3, "target": 0.12, "samples": 40_000, "eval_every": 2},
    "mnist1d": {"lr": 2.8e-3, "target": 1.2, "samples": 60_000, "eval_every": 2},
    "char-lm": {"lr": 3e-3, "target": 2.4, "samples": 60_000, "eval_every": 4, "grid": [0.5, 1.0]},
}
# char-lm's grid drops x2: at batch 16 it had not reached the target after the whole 60000-sample cap (6 min a run
# on the loaded machine, where x0.5 and x1 got there in 17-21k), and the run must fit the ~25 min this CPU allows.
# Evaluate every 2 steps (char-lm: 4, its 8000 validation windows cost more and its small batches take >1000
# steps); steps and samples to the target are interpolated between evaluations.


def _sweep(factory, sizes, settings, seeds, directory, uri, name) -> SweepResult:
    return sweep(
        factory,
        sizes,
        lr=settings["lr"],
        base_batch=BATCH_SIZES[0],
        rule="sqrt",
        lr_multipliers=settings.get("grid", GRID),
        seeds=seeds,
        budget=Budget(samples=settings["samples"]),
        target=settings["target"],
        stop_at_target=True,
        eval_every=settings["eval_every"],
        name=name,
        directory=directory,
        tracking_uri=uri,
        report=False,
    )


def _trajectory(result: SweepResult, multiplier: float) -> list[list[list[int]]]:
    """Per seed at the best multiplier: the (step, batch) where the ramp's batch changed."""
    out = []
    for run in result.runs:
        if run.lr_multiplier != multiplier:
            continue
        points, last = [], None
        for step, batch in zip(run.train.step, run.train["batch_size"]):
            if batch != last:
                points.append([step, int(batch)])
                last = batch
        out.append(points)
    return out


# "Fewer" for the domination check means fewer by more than this relative margin. A ramp that never grows trains
# the fixed start batch in min_accumulation micro-batches, whose gradient sums round differently: at acc4 on
# digits it read 178.039028 steps against fixed 16's 178.039027 (5e-9 relative), which is the same run.
SAME_RUN_RTOL = 1e-6


def _fewer(a: float, b: float) -> bool:
    return a < b * (1 - SAME_RUN_RTOL)


def _goals(ramp_row: dict, reached: list[dict], seeds: int) -> dict:
    """The issue's two goals for one ramp row against the fixed rows that reached the target on every seed."""
    if ramp_row["steps_to_target"] is None or ramp_row["reached"] < seeds or not reached:
        return {"dominated_by": None, "steps_ratio": None, "samples_ratio": None, "goal_not_dominated": False,
                "goal_steps_samples": False}  # fmt: skip
    rs, rn = ramp_row["steps_to_target"], ramp_row["samples_to_target"]
    dominated = [
        r["batch_size"]
        for r in reached
        if _fewer(r["steps_to_target"], rs) and _fewer(r["samples_to_target"], rn)
    ]
    efficient = min(reached, key=lambda r: r["samples_to_target"])
    steps_ratio, samples_ratio = rs / efficient["steps_to_target"], rn / efficient["samples_to_target"]
    return {"dominated_by": dominated, "steps_ratio": steps_ratio, "samples_ratio": samples_ratio,
            "goal_not_dominated": not dominated, "goal_steps_samples": steps_ratio <= 0.7 and samples_ratio <= 1.1}  # fmt: skip


def per_multiplier(result: SweepResult) -> list[dict]:
    """A ramp's mean steps and samples to the target at every multiplier, smallest first (None where a seed
    missed): the table keeps only the step-optimal one, and a ramp's multipliers can straddle the goals."""
    (start,) = result.batch_sizes  # a ramp sweep has one starting batch
    every = sorted(result.by_multiplier(start), key=lambda s: s.lr_multiplier)
    return [
        {key: getattr(s, key) for key in ("lr_multiplier", "steps_to_target", "samples_to_target")}
        for s in every
    ]


def _reached(rows: list[dict], seeds: int) -> list[dict]:
    """The rows (fixed or ramp) whose every seed reached the target."""
    return [r for r in rows if r["samples_to_target"] is not None and r["reached"] == seeds]


def fixed_curve(reached: list[dict]) -> CriticalBatchFit | None:
    """S = S_min (1 + B_crit/B) fitted to the fixed rows that reached the target (None under 3 of them)."""
    if len(reached) < 3:
        return None
    return fit_critical_batch([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached])


def over_curve(curve: CriticalBatchFit | None, row: dict) -> float | None:
    """A row's samples over the fixed curve's samples at the row's steps (None without a curve or a mean).

    Under 1 the row beats every fixed batch, between the swept ones too; at or over 1 some fixed batch reaches
    the target in as many steps for no more samples. No schedule gets under 1 while the critical batch stays
    constant (:meth:`CriticalBatchFit.samples_at_steps`), so a ramp under 1 is one the critical batch's growth
    paid for; 0 where the ramp needs fewer steps than any fixed batch can (S_min)."""
    if curve is None or row["steps_to_target"] is None:
        return None
    return row["samples_to_target"] / curve.samples_at_steps(row["steps_to_target"])


def compare(
    name: str, settings: dict, fixed: SweepResult, ramps: dict[float, SweepResult], seeds: int
) -> dict:
    rows = [s.to_dict() for s in fixed.by_batch_size()]
    reached = _reached(rows, seeds)
    efficient = min(reached, key=lambda r: r["samples_to_target"])["batch_size"] if reached else None
    out = {"dataset": name, "settings": settings, "seeds": seeds, "fixed": rows, "efficient": efficient,
           "ramps": []}  # fmt: skip
    for target, result in ramps.items():
        row = result.by_batch_size()[0].to_dict()
        every = [m | {"both_goals": _both_goals(m, reached, seeds)} for m in per_multiplier(result)]
        out["ramps"].append({"target": target, **row, "batches": _trajectory(result, row["lr_multiplier"]),
                             "per_multiplier": every, **_goals(row, reached, seeds)})  # fmt: skip
    return rescore(out)


def _both_goals(multiplier_row: dict, reached: list[dict], seeds: int) -> bool:
    """Both goals for the ramp at one multiplier (a row of :func:`per_multiplier`; None steps: a seed missed). The
    verdict of the table is the step-optimal multiplier's; a ramp's steps and samples are not proportional, so
    another multiplier can meet both where that one does not."""
    reached_all = seeds if multiplier_row["steps_to_target"] is not None else 0
    goals = _goals(multiplier_row | {"reached": reached_all}, reached, seeds)
    return goals["goal_not_dominated"] and goals["goal_steps_samples"]


def _cell(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def markdown(
    results: list[dict],
    command: str,
    seconds: float,
    out: str,
    min_accumulation: int,
    batches: list[int],
    ramp_rule: str | None = None,
) -> str:
    carried = "by the optimizer's rule" if ramp_rule is None else f"by rule {ramp_rule!r}"
    lines = [
        f"## Batch ramp against every fixed batch ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)",
        "",
        f"Issue 13 item 3. Machine: {machine_line()}. Command: `{command}` ({seconds / 60:.1f} min).",
        f"Fixed batches {batches}; each data set's LR grid (below) on the sqrt rule from batch {BATCH_SIZES[0]}; "
        f"the ramp from {BATCH_SIZES[0]} to {batches[-1]}, micro-batches of at most {MAX_MICRO} "
        f"samples and at least {min_accumulation} per step, growing toward target x B_simple, each change "
        f"carrying the LR {carried}; "
        f"means over seeds at each row's best multiplier (fewest steps). Raw: {out}; the runs in MLflow "
        "(SQLite in the sweeps' directory, not committed).",
        "",
    ]
    for r in results:
        settings = r["settings"]
        grid = settings.get("grid", GRID)
        lines += [f"**{r['dataset']}** (target val loss {settings['target']}, LR grid x{grid})", "",
                  "| run | best lr x | steps to target | samples to target | seeds reached |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for row in r["fixed"]:
            lines.append(f"| fixed {row['batch_size']} | {row['lr_multiplier']:g} | {_cell(row['steps_to_target'])} | "
                         f"{_cell(row['samples_to_target'])} | {row['reached']}/{r['seeds']} |")  # fmt: skip
        for row in r["ramps"]:
            lines.append(f"| ramp, target {row['target']:g} x B_simple | {row['lr_multiplier']:g} | "
                         f"{_cell(row['steps_to_target'])} | {_cell(row['samples_to_target'])} | "
                         f"{row['reached']}/{r['seeds']} |")  # fmt: skip
        lines += ["", _curve_line(r), ""]
        for row in r["ramps"]:
            if row["steps_ratio"] is None:
                lines.append(
                    f"- target {row['target']:g}: the ramp or every fixed batch missed the target: **MISSED**."
                )
                continue
            dominated = (
                "met" if row["goal_not_dominated"] else f"MISSED (fixed {row['dominated_by']} has both fewer)"
            )
            every = ", ".join(f"x{m['lr_multiplier']:g} {_cell(m['steps_to_target'])} / "
                              f"{_cell(m['samples_to_target'])}{' (both goals)' if m['both_goals'] else ''}"
                              for m in row["per_multiplier"])  # fmt: skip
            lines.append(
                f"- target {row['target']:g}: steps / samples at each multiplier: {every}; batches per seed (step, "
                f"batch) {row['batches']}; against fixed "
                f"{r['efficient']} (the most sample-efficient): steps x{row['steps_ratio']:.2f}, samples "
                f"x{row['samples_ratio']:.2f}. Not dominated: **{dominated}**; >= 30% fewer steps at <= 1.1x "
                f"samples: **{'met' if row['goal_steps_samples'] else 'MISSED'}**. Samples over the fixed curve "
                f"at its steps: {_ratio(row.get('over_curve'))}."
            )
        lines.append("")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return f"x{value:.2f}" if value is not None else "-"


def _curve_line(result: dict) -> str:
    """One line on the fixed rows' curve: its fit and how far each fixed row lies from it (its own scatter)."""
    curve = result.get("curve")
    if curve is None:
        return "- Fixed curve: fewer than 3 fixed batches reached the target on every seed; no curve."
    scatter = ", ".join(f"{row['batch_size']} {_ratio(row.get('over_curve'))}" for row in result["fixed"])
    return (f"- Fixed curve S = S_min (1 + B_crit/B): B_crit {curve['b_crit']:.0f}, S_min {curve['s_min']:.0f}, "
            f"rms log error {curve['rms_log_error']:.3f}{'' if curve['bounded'] else ' (' + curve['note'] + ')'}; "
            f"each fixed row's samples over it: {scatter}.")  # fmt: skip


def rescore(result: dict) -> dict:
    """A result (one data set of a results JSON, any version) with its fixed curve and every row's samples over
    it computed by the current code: :func:`compare` ends with it, ``--curve`` applies it to stored runs."""
    seeds = result["seeds"]
    reached = _reached(result["fixed"], seeds)
    curve = fixed_curve(reached)
    fixed = [
        row | {"over_curve": over_curve(curve, row) if row in reached else None} for row in result["fixed"]
    ]
    ramps = [row | {"over_curve": over_curve(curve, row) if _reached([row], seeds) else None}
             for row in result["ramps"]]  # fmt: skip
    return result | {"curve": curve.to_dict() if curve else None, "fixed": fixed, "ramps": ramps}


_STORED_KEYS = ("dataset", "seeds", "fixed", "ramps")


def _stored(path: str) -> dict:
    """A results JSON this script wrote, read and checked: ValueError naming the file otherwise."""
    expected = f"invalid --curve {path}: expected a results JSON of benchmarks/batch_ramp.py"
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{expected} ({error})") from None
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and all(key in r for key in _STORED_KEYS) for r in results
    ):
        raise ValueError(f"{expected} (a 'results' list of data sets with {', '.join(_STORED_KEYS)})")
    return payload


def curve_table(paths: list[str]) -> str:
    """Markdown: per results file and data set, the fixed curve and each ramp target's samples over it."""
    lines = ["| results | data set | seeds | min acc | B_crit (rms) | fixed rows over the curve "
             "| ramp target: over the curve |", "|---|---|---:|---:|---:|---|---|"]  # fmt: skip
    payloads = {path: _stored(path) for path in paths}  # every file checked before a line is printed
    for path, payload in payloads.items():
        for result in map(rescore, payload["results"]):
            curve = result["curve"]
            fit = f"{curve['b_crit']:.0f} ({curve['rms_log_error']:.3f})" if curve else "-"
            fixed = " / ".join(_ratio(row["over_curve"]) for row in result["fixed"])
            ramps = ", ".join(f"{row['target']:g}: {_ratio(row['over_curve'])}" for row in result["ramps"])
            accumulation = payload.get("min_accumulation", MIN_ACCUMULATION)
            lines.append(f"| {Path(path).stem} | {result['dataset']} | {result['seeds']} | {accumulation} | "
                         f"{fit} | {fixed} | {ramps} |")  # fmt: skip
    return "\n".join(lines)


def _batch_list(text: str) -> list[int]:
    """``--batches``: the fixed batch sizes, distinct ints from BATCH_SIZES's first (the ramp's start and the batch
    the LRs are given at) to the ramp's maximum, BATCH_SIZES's last or more (a critical batch above 256 needs
    ramps that can cross it)."""
    try:
        sizes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --batches {text!r}: expected a comma list of ints"
        ) from None
    if sizes[0] != BATCH_SIZES[0] or sizes[-1] < BATCH_SIZES[-1]:
        raise argparse.ArgumentTypeError(
            f"invalid --batches {text!r}: expected ints from {BATCH_SIZES[0]} to {BATCH_SIZES[-1]} or more, "
            "with both ends (the last is the ramp's maximum)"
        )
    return sizes


def _seed_list(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma list of distinct seeds."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --seeds {text!r}: expected a count or a comma list of ints"
        ) from None
    seeds = list(range(values[0])) if len(values) == 1 else values
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(
            f"invalid --seeds {text!r}: expected a count >= 1 or distinct seeds >= 0"
        )
    return seeds


def _seeds_tag(seeds: list[int]) -> str:
    """The sweep-name part for the seeds (another seed set is another sweep: the store refuses a changed config)."""
    if seeds == list(range(SEEDS)):
        return ""
    return f"-{len(seeds)}seeds" if seeds == list(range(len(seeds))) else "-seeds" + "-".join(map(str, seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(EXPERIMENTS))
    parser.add_argument(
        "--seeds", type=_seed_list, default=list(range(SEEDS)),
        help=f"a count N (seeds 0..N-1, default {SEEDS}) or a comma list, e.g. 3,4,5 for seeds held out",
    )  # fmt: skip
    parser.add_argument("--directory", default=None, help="sweeps and the MLflow store (default: a temp dir)")
    parser.add_argument("--targets", default="1,2", help="ramps toward target x B_simple, one per value")
    parser.add_argument(
        "--grid", default=None, help="LR multipliers for every data set (default: each one's)"
    )
    parser.add_argument(
        "--min-accumulation", type=int, default=MIN_ACCUMULATION,
        help="the ramp's micro-batches per step, the pairs its noise scale is read from (default: the library's)",
    )  # fmt: skip
    parser.add_argument(
        "--ramp-rule", choices=RULES, default=None,
        help="the LR rule at each of the ramp's changes (default: the optimizer's, sqrt for Adam; none keeps it)",
    )  # fmt: skip
    parser.add_argument(
        "--target-loss", type=float, default=None,
        help="the validation loss every run stops at, for one data set in --datasets (default: EXPERIMENTS')",
    )  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results" / "batch_ramp.json"))
    parser.add_argument("--batches", type=_batch_list, default=BATCH_SIZES,
                        help=f"fixed batch sizes, a comma list from {BATCH_SIZES[0]} to {BATCH_SIZES[-1]} or more; "
                             "the last is the ramps' maximum")  # fmt: skip
    parser.add_argument("--max-samples", type=int, default=None,
                        help="the sample cap of every run (default: each data set's); a larger --batches needs more")  # fmt: skip
    parser.add_argument("--curve", nargs="+", metavar="JSON", default=None,
                        help="train nothing: score stored results against each data set's fixed curve")  # fmt: skip
    args = parser.parse_args()
    if args.curve:
        try:
            print(curve_table(args.curve))
        except ValueError as error:
            parser.error(str(error))
        return
    torch.set_num_threads(1)
    targets = [float(t) for t in args.targets.split(",")]
    directory = Path(args.directory or tempfile.mkdtemp(prefix="batchlab-batch-ramp-"))
    uri = f"sqlite:///{(directory / 'mlflow.db').resolve()}"
    names = args.datasets.split(",")
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        parser.error(
            f"invalid --datasets {','.join(unknown)}: expected a comma list of {', '.join(EXPERIMENTS)}"
        )
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"invalid --max-samples {args.max_samples}: expected a positive sample count")
    if args.target_loss is not None and (len(names) != 1 or not args.target_loss > 0):
        parser.error(
            f"invalid --target-loss {args.target_loss:g} for --datasets {args.datasets}: expected a loss > 0 "
            "for one data set (each has its own scale)"
        )
    try:  # every ramp's settings are checked here, before the first sweep trains
        factories = {
            name: {target: RampFactory(Task(name, noise_every=0), max_batch=args.batches[-1], max_micro_batch=MAX_MICRO,
                                       target=target, min_accumulation=args.min_accumulation,
                                       rule=args.ramp_rule)
                   for target in targets}
            for name in names
        }  # fmt: skip
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    started = time.time()
    run_by = provenance(("numpy", "scikit-learn", "scipy", "mnist1d", "mlflow"))  # what made the numbers
    results = []
    for name, ramp_factories in factories.items():
        settings = dict(EXPERIMENTS[name])
        if args.grid:
            settings["grid"] = [float(m) for m in args.grid.split(",")]
        if args.target_loss is not None:
            settings["target"] = args.target_loss
        if args.max_samples is not None:
            settings["samples"] = args.max_samples
        t0 = time.time()
        task = Task(name, noise_every=0)
        grid = settings.get("grid", GRID)
        # another grid or seed count is another sweep, so another name (the store refuses a changed config)
        tag = "" if grid == GRID else "-grid" + "-".join(f"{m:g}" for m in grid)
        tag += _seeds_tag(args.seeds)
        tag += "" if args.target_loss is None else f"-loss{args.target_loss:g}"
        tag += "" if args.max_samples is None else f"-samples{args.max_samples}"
        batches = "" if args.batches == BATCH_SIZES else "-b" + "-".join(map(str, args.batches))
        fixed = _sweep(
            task, args.batches, settings, args.seeds, directory, uri, f"{name}-fixed{batches}{tag}"
        )
        ramps = {}
        for target, factory in ramp_factories.items():
            accumulation = "" if args.min_accumulation == MIN_ACCUMULATION else f"-acc{args.min_accumulation}"
            accumulation += "" if args.ramp_rule is None else f"-lr{args.ramp_rule}"
            accumulation += "" if args.batches[-1] == BATCH_SIZES[-1] else f"-max{args.batches[-1]}"
            ramps[target] = _sweep(factory, [BATCH_SIZES[0]], settings, args.seeds, directory, uri,
                                   f"{name}-ramp-t{target:g}{accumulation}{tag}")  # fmt: skip
        result = compare(name, settings, fixed, ramps, len(args.seeds))
        result["seconds"] = time.time() - t0
        results.append(result)
        print(json.dumps({"dataset": name, "seconds": result["seconds"], "efficient": result["efficient"],
                          "ramps": [{k: row[k] for k in ("target", "steps_to_target", "samples_to_target",
                                                          "steps_ratio", "samples_ratio", "dominated_by")}
                                    for row in result["ramps"]]}), flush=True)  # fmt: skip
    seconds = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "batch_sizes": args.batches, "grid": GRID,
               "ramp_max": args.batches[-1], "max_micro": MAX_MICRO, "min_accumulation": args.min_accumulation, "ramp_rule": args.ramp_rule,
               "ramp_targets": targets,
               "seeds": args.seeds, "seconds": seconds, "mlflow": uri, "provenance": run_by}  # fmt: skip
    Path(args.out).write_text(json.dumps(payload, indent=2))
    command = " ".join(["nice -n 5 python benchmarks/batch_ramp.py", *sys.argv[1:]])
    print(markdown(results, command, seconds, args.out, args.min_accumulation, args.batches, args.ramp_rule))


if __name__ == "__main__":
    main()
