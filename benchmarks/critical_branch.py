"""B_crit swept directly from one checkpoint, against B_simple and the curvature-aware B_noise measured there.

Issue 13, item 4. Merrill et al. 2025 ("Critical batch size revisited") measure the critical batch *locally*:
branch short runs at several batch sizes from one checkpoint and see how the steps to a small further loss
drop scale with the batch. Here, per dataset:

1. Train a fresh model at batch 32 (Adam, the base LR) for ``warm`` steps: the checkpoint (weights and Adam
   state). The target is the validation loss the same run reaches ``ref`` steps later.
2. At the checkpoint measure B_simple = tr(Σ)/|G|² and B_noise = tr(HΣ)/GᵀHG from the same gradient samples
   (:func:`batchlab.noise.curvature.measure_curvature_noise_scale`: nested batches of 32 and 256, the Hessian
   on an independent batch of 512, 24 repeats), and B_P = tr(PΣ)/GᵀPG in Adam's metric, P = 1/(√v̂ + ε) from
   the checkpoint's optimizer state (the same gradients; the curvature module's docstring says why).
3. Branch from the checkpoint at every batch 8..512 (``--batches``) and each LR of base × sqrt(B/32) ×
   {0.5, 1, 2} (weights and Adam moments restored, the LR set), until the validation loss reaches the target
   (evaluated every ``ref/20`` steps, every step past batch 512; interpolated between evaluations) or
   ``6 ref`` steps. Steps-to-target per batch = the best LR's; S = S_min(1 + B_crit/B) fitted in log space
   (batchlab.noise.critical.fit_critical_batch). This step is the library's own call,
   :func:`batchlab.sweeps.branched.branch_critical_batch`, on a Workload of the checkpoint: what is measured
   here is what a user gets from it.
4. Which estimate lands nearer B_crit, as a ratio; goal: within 1.5x.

``--optimizer sgd`` runs the same protocol with plain SGD (no momentum) in place of Adam: the checkpoint, the
target and every branch. McCandlish et al. derive B_noise = tr(HΣ)/GᵀHG for SGD at its optimal step, so this is
the theory in its own setting; the LR is not rescaled with the batch but searched over base × ``--grid`` (SGD's
best LR grows linearly with B below B_crit and flattens above it, so a fixed wide grid brackets both ends), and
B_P is not measured (P = I makes it B_simple).

``--along K`` also reads the three estimates at K evenly spaced points of the batch-32 run from the checkpoint to
the target (its weights and Adam state there, fresh gradient samples at each). The noise scale changes as the loss
falls (McCandlish et al.: it grows), and the critical batch over a window is the noise scale averaged along it with the minimal steps as the
weight (batchlab.noise.critical.critical_batch_along, from S = S_min(1 + B_noise/B) applied to each piece), not its
value at the checkpoint alone; McCandlish et al.'s own comparisons read B_simple along the run (fig. 8), and
issue 5's sweeps read it near the target. Each estimate is scored at the checkpoint, at the target and over the
window.

``--from-init`` moves the checkpoint back to the first step (``from_init``): every branch is then a whole run
to the target, and the sweep is an exhaustive sweep of fixed batches, the kind of B_crit issue 5 compared
B_simple with; with ``--along`` the estimates are read along the whole batch-32 run.

``--noise-only FROM.json`` redoes steps 1-2 only and takes the branches of step 3 from an earlier run's JSON:
the checkpoint is deterministic (fixed seeds, one thread), which the run checks by requiring the recomputed
B_simple, B_noise and target loss to equal the stored ones; a new estimate is then compared without re-running the sweep.

``--lr-search walk --seeds 1`` is the cheap form of step 3: each batch's LR found by a walk on powers of two
from the rule's (batchlab.sweeps.branched.next_multiplier, about 3 LRs a batch) instead of a whole grid, one data order instead
of several. Every result records the steps and samples its branches spent (``cost``), so the cheap form is
priced against the exhaustive sweep of whole runs (``--from-init``) whose B_crit it stands in for; ``--first-seed
K`` reruns it on other data orders from the same checkpoint, to show its scatter.

Datasets: sklearn digits and MNIST-1D (MLPs as the sweep tasks), and a character-level LM on the Python
standard library's own source (batchlab.workloads.corpus: bytes; an MLP over a 32-byte context, embedding 16,
two hidden layers of 256). CPU, one torch thread.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from batchlab import Workload
from batchlab.noise.critical import critical_batch_along
from batchlab.noise.curvature import adam_preconditioner, measure_curvature_noise_scale
from batchlab.sweeps.branched import BranchedCriticalBatch, branch_critical_batch
from provenance import load_average, machine_line, provenance

HERE = Path(__file__).resolve().parent
BATCHES = [8, 16, 32, 64, 128, 256, 512]
GRID = [0.5, 1.0, 2.0]
BASE_BATCH = 32
CONTEXT = 32  # bytes of context of the char-level LM
PACKAGES = ("numpy", "scikit-learn", "scipy", "mnist1d")  # what made the data, recorded with the results


@dataclass
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    sample: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    val: tuple[torch.Tensor, torch.Tensor]
    lr: float  # Adam's, at BASE_BATCH
    sgd_lr: float  # plain SGD's centre of the grid
    warm: int
    ref: int


def _tabular(name: str, split, make_model, lr, sgd_lr, warm, ref) -> Problem:
    (x, y), val = split

    def sample(b, gen):
        index = torch.randint(0, len(y), (b,), generator=gen)
        return x[index], y[index]

    return Problem(name, make_model, sample, val, lr, sgd_lr, warm, ref)


def _charlm(max_files: int) -> Problem:
    from batchlab.workloads.corpus import VOCAB_SIZE, stdlib_corpus

    corpus = stdlib_corpus(max_files=max_files)
    train, val = corpus.stream("train"), corpus.stream("val")

    def windows(stream, index):
        ctx = torch.stack([stream[i : i + CONTEXT] for i in index.tolist()])
        return ctx, stream[index + CONTEXT]

    def sample(b, gen):
        return windows(train, torch.randint(0, len(train) - CONTEXT - 1, (b,), generator=gen))

    val_batch = windows(
        val, torch.randint(0, len(val) - CONTEXT - 1, (4096,), generator=torch.Generator().manual_seed(0))
    )

    def model():  # the char-lm task's model (batchlab.workloads.tasks) over a window of CONTEXT bytes
        return nn.Sequential(
            nn.Embedding(VOCAB_SIZE, 16),
            nn.Flatten(),
            nn.Linear(16 * CONTEXT, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, VOCAB_SIZE),
        )

    return Problem(f"char-lm (stdlib, {corpus.files} files)", model, sample, val_batch, 2e-3, 0.2, 200, 200)


def problems(names: list[str], max_files: int) -> list[Problem]:
    from batchlab.workloads.tasks import Task  # the sweep tasks' own splits and models

    def tabular(name: str, lr, sgd_lr, warm, ref) -> Problem:
        task = Task(name)  # model(0): the task's seed-0 weights; _run seeds 0 for the char-LM's model too
        return _tabular(name, task.data(), lambda: task.model(0), lr, sgd_lr, warm, ref)

    made = {
        "digits": lambda: tabular("mlp-digits", 2e-3, 0.4, 20, 80),
        "mnist1d": lambda: tabular("mnist1d", 2e-3, 0.2, 100, 150),
        "charlm": lambda: _charlm(max_files),
    }
    return [made[n]() for n in names]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def _val_loss(model, val) -> float:
    return float(_loss(model, val))


@dataclass
class Spent:
    """Optimizer steps and training samples a protocol spends, so a cheap measurement of B_crit can be priced
    against the exhaustive sweep it stands in for (issue 13 item 4: "where it is cheap")."""

    steps: int = 0
    samples: int = 0

    def __sub__(self, other: Spent) -> Spent:
        return Spent(self.steps - other.steps, self.samples - other.samples)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "samples": self.samples}


SPENT = Spent()  # every step _train takes (the setup); the branches count their own (BranchedCriticalBatch)


def _train(model, opt, problem, batch, steps, gen) -> float:
    """Train ``steps`` steps at ``batch`` (the checkpoint, the reference run); return the validation loss then."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, problem.sample(batch, gen))
        SPENT.steps, SPENT.samples = SPENT.steps + 1, SPENT.samples + batch
        loss.backward()
        opt.step()
    return _val_loss(model, problem.val)


def _optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr) if kind == "adam" else torch.optim.SGD(params, lr=lr)


def _base_lr(kind: str, problem: Problem) -> float:
    """The checkpoint's LR: Adam's at BASE_BATCH, or the centre of plain SGD's grid (module docstring)."""
    return problem.lr if kind == "adam" else problem.sgd_lr


def local_window(problem: Problem) -> Problem:
    """``--local``: the checkpoint moved to the old target and the window cut to a quarter, so the loss moves
    less inside it and the critical batch, which grows with training, stays nearer its value at the checkpoint
    (Merrill et al. measure it over a small local window for this reason)."""
    return replace(problem, warm=problem.warm + problem.ref, ref=max(problem.ref // 4, 10))


def from_init(problem: Problem) -> Problem:
    """``--from-init``: the checkpoint moved back to the first step, so every branch trains (almost) the whole run
    to the target, as an exhaustive sweep of fixed batches does (issue 5's B_crit is of that kind). One step at
    batch 32 rather than none, because B_P needs Adam's second moment; the window keeps its end step, so the
    target is the loss the batch-32 run reaches at the same step (its data order differs from the default's)."""
    return replace(problem, warm=1, ref=problem.warm + problem.ref - 1)


def _branches(model, opt, problem: Problem, target: float, optimizer: str, seeds: int, lr_search: str,
              first_seed: int, log) -> BranchedCriticalBatch:  # fmt: skip
    """Step 3: the library's branched measurement from the checkpoint (``model`` and ``opt`` are at it), the data
    drawn from torch's global RNG, which the library seeds per branch (batchlab.sweeps.branched.branch_seed)."""
    workload = Workload(model, lambda b: problem.sample(b, None), F.cross_entropy, opt, validation=problem.val,
                        name=problem.name)  # fmt: skip
    return branch_critical_batch(
        workload,
        BATCHES,
        base_batch=BASE_BATCH,
        reference_steps=problem.ref,
        target_loss=target,
        rule="sqrt" if optimizer == "adam" else "none",
        lr_grid=None if lr_search == "walk" else GRID,
        orders=seeds,
        first_order=first_seed,
        on_trial=lambda t: log(f"  b={t.batch_size} lr={t.lr:.3g}: {t.steps}"),
    )


def _estimates(model, opt, problem: Problem, optimizer: str, seed: int, repeats: int = 24):
    """B_simple, B_noise and (under Adam) B_P at the model's current weights: step 2 of the module docstring."""
    params = [p for p in model.parameters() if p.requires_grad]
    adam_metric = adam_preconditioner(opt, params) if optimizer == "adam" else None
    gen = torch.Generator().manual_seed(seed)
    return measure_curvature_noise_scale(
        model,
        _loss,
        lambda b: problem.sample(b, gen),
        b_small=32,
        b_big=256,
        hessian_batch=512,
        repeats=repeats,
        preconditioner=adam_metric,
    )


# --along reads with 4x the checkpoint's pairs: one reading's B_P had a standard error near 80% from 24 (digits).
ALONG_REPEATS = 96


def _reference_run(model, opt, problem: Problem, optimizer: str, points: int) -> tuple[float, list[dict]]:
    """Train ``ref`` steps at batch 32 from the checkpoint; return the validation loss it ends at (the target)
    and, for ``points`` >= 2, the estimates read at ``points`` evenly spaced steps from the checkpoint (step 0)
    to the target (``--along``; ALONG_REPEATS pairs each, fresh samples)."""
    gen = torch.Generator().manual_seed(2)
    marks = [round(problem.ref * i / (points - 1)) for i in range(points)] if points >= 2 else [problem.ref]
    done, readings, loss = 0, [], _val_loss(model, problem.val)
    for i, mark in enumerate(marks):
        if mark > done:
            loss = _train(model, opt, problem, BASE_BATCH, mark - done, gen)
            done = mark
        if points >= 2:
            noise = _estimates(model, opt, problem, optimizer, seed=4 + i, repeats=ALONG_REPEATS)
            readings.append({"step": mark, "val_loss": loss, "noise": noise.to_dict()})
    return loss, readings


ESTIMATES = {"b_simple": "B_simple", "b_noise": "B_noise", "b_preconditioned": "B_P"}  # key: name shown


def along_window(readings: list[dict]) -> dict:
    """Per estimate: its readings, its value at the target and its critical batch over the window
    (batchlab.noise.critical.critical_batch_along over the readings; None where any reading is undefined)."""
    out = {}
    for key in ESTIMATES:
        values = [r["noise"][key] for r in readings]
        steps = [r["step"] for r in readings]
        defined = all(v is not None and v > 0 for v in values)
        out[key] = {
            "at_target": values[-1],
            "window": critical_batch_along(steps, values, BASE_BATCH) if defined else None,
            "readings": values,
        }
    return out


def branch_experiment(
    problem: Problem,
    log=print,
    swept: dict | None = None,
    optimizer: str = "adam",
    seeds: int = 1,
    along: int = 0,
    lr_search: str = "grid",
    first_seed: int = 0,
) -> dict:
    """Steps 1-4 of the module docstring for one problem; with ``swept`` (an earlier result for the same
    problem) the branches and the fit are taken from it after checking the checkpoint reproduces it; with
    ``along`` >= 2 the estimates are also read at that many points from the checkpoint to the target.
    ``lr_search`` and ``first_seed``: batchlab.sweeps.branched.next_multiplier, and the branches' first data
    order."""
    torch.manual_seed(0)
    before = replace(SPENT)
    model = problem.make_model()
    opt = _optimizer(optimizer, model.parameters(), _base_lr(optimizer, problem))
    gen = torch.Generator().manual_seed(1)
    _train(model, opt, problem, BASE_BATCH, problem.warm, gen)
    ckpt_model, ckpt_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    start_loss = _val_loss(model, problem.val)
    t0 = time.time()
    noise = _estimates(model, opt, problem, optimizer, seed=3)
    log(
        f"{problem.name}: checkpoint val loss {start_loss:.4f}; "
        f"B_simple {noise.b_simple}, B_noise {noise.b_noise}, B_P {noise.b_preconditioned} "
        f"({time.time() - t0:.0f} s)"
    )
    target, readings = _reference_run(model, opt, problem, optimizer, along)
    model.load_state_dict(ckpt_model)
    log(
        f"  target {target:.4f}"
        + "".join(
            f"; step {r['step']}: val {r['val_loss']:.4f}, B_simple {r['noise']['b_simple']}, "
            f"B_P {r['noise']['b_preconditioned']}"
            for r in readings
        )
    )
    if swept is not None:
        return _with_swept(problem, noise, start_loss, target, swept, optimizer, readings)
    setup = SPENT - before  # the checkpoint and the target
    opt.load_state_dict(copy.deepcopy(ckpt_opt))  # the reference run moved Adam's state on
    found = _branches(model, opt, problem, target, optimizer, seeds, lr_search, first_seed, log)
    rows = [{"batch_size": r.batch_size, "steps": r.steps, "lr": r.lr, "lr_multiplier": r.lr_multiplier}
            for r in found.rows]  # fmt: skip
    fit = found.fit
    cost = {
        "setup": setup.to_dict(),
        "branches": {"steps": found.steps_spent, "samples": found.samples_spent},
    }
    result = _result(
        problem,
        noise,
        start_loss,
        target,
        rows,
        fit.to_dict() if fit else None,
        optimizer,
        seeds,
        readings,
        cost,
    )
    return {**result, "lr_search": lr_search, "first_seed": first_seed}


def _result(
    problem, noise, start_loss, target, rows, fit, optimizer="adam", seeds=1, readings=(), cost=None
) -> dict:
    """One problem's JSON record; ``cost`` is None where the branches were taken from a stored run."""
    b_crit = fit["b_crit"] if fit else None

    def ratio(estimate):
        return estimate / b_crit if b_crit and estimate else None

    return {
        "dataset": problem.name,
        "optimizer": optimizer,
        "seeds": seeds,
        "warm_steps": problem.warm,
        "ref_steps": problem.ref,
        "checkpoint_loss": start_loss,
        "target_loss": target,
        "rows": rows,
        "fit": fit,
        "cost": cost,
        "noise": noise.to_dict(),
        "ratio_simple": ratio(noise.b_simple),
        "ratio_noise": ratio(noise.b_noise),
        "ratio_preconditioned": ratio(noise.b_preconditioned),
        "along_readings": list(readings),
        "along": None
        if not readings
        else {
            key: {
                **w,
                "ratio_start": ratio(w["readings"][0]),
                "ratio_at_target": ratio(w["at_target"]),
                "ratio_window": ratio(w["window"]),
            }
            for key, w in along_window(readings).items()
        },
    }


def _reproduces(stored: float | None, measured: float | None) -> bool:
    """Equal to float rounding, or both undefined (B_noise is None where tr(HΣ) read negative)."""
    if stored is None or measured is None:
        return stored is None and measured is None
    return math.isclose(stored, measured, rel_tol=1e-6)


def _with_swept(problem, noise, start_loss, target, swept: dict, optimizer: str, readings=()) -> dict:
    """The result with ``swept``'s branches and fit, once the checkpoint is shown to be the same one."""
    if swept.get("optimizer", "adam") != optimizer:
        raise SystemExit(
            f"{problem.name}: the stored run used {swept.get('optimizer', 'adam')}, not {optimizer}"
        )
    stored = {
        "b_simple": swept["noise"]["b_simple"],
        "b_noise": swept["noise"]["b_noise"],
        "target loss": swept["target_loss"],
    }
    measured = {"b_simple": noise.b_simple, "b_noise": noise.b_noise, "target loss": target}
    for key, value in stored.items():
        if not _reproduces(value, measured[key]):
            raise SystemExit(
                f"{problem.name}: the checkpoint does not reproduce the stored run ({key} {measured[key]} here, "
                f"{value} stored): run the branches again instead of --noise-only"
            )
    rows, fit, seeds = swept["rows"], swept["fit"], swept.get("seeds", 1)
    return _result(
        problem, noise, start_loss, target, rows, fit, optimizer, seeds, readings, swept.get("cost")
    )


def _within(r):
    return r is not None and 1 / 1.5 <= r <= 1.5


def markdown(results: list[dict], command: str, seconds: float, load: str, optimizer: str = "adam") -> str:
    # The batches of the rows shown (under --noise-only the stored run's, whatever --batches says).
    sizes = [row["batch_size"] for row in results[0]["rows"]] if results else BATCHES
    lines = [
        f"## Critical batch from one checkpoint vs B_simple and the curvature-aware B_noise (issue 13 item 4, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- Machine: {machine_line()}; load average at start {load}",
        f"- Command: `{command}` ({seconds:.0f} s)",
        f"- Method: benchmarks/critical_branch.py's docstring, optimizer {optimizer}: a checkpoint after `warm` steps"
        " at batch 32; target = the validation loss batch 32 reaches `ref` steps later; branches at batches"
        f" {sizes[0]}..{sizes[-1]}"
        + (
            f" x LR grid {{{', '.join(f'{g:g}' for g in GRID)}}} x "
            if results and results[0].get("lr_search", "grid") == "grid"
            else " x the LR walked on powers of two from 1 (next_multiplier) x "
        )
        + (
            "sqrt(B/32) x base, weights and Adam state"
            if optimizer == "adam"
            else "base (not rescaled), weights"
        )
        + " from the checkpoint; B_simple and B_noise measured at the checkpoint from the same 24 nested pairs of"
        " batches 32/256 (Hessian on a batch of 512).",
        "",
        f"| dataset | checkpoint -> target loss | steps to target at {' / '.join(str(b) for b in sizes)} "
        "| best LR multiplier (* = grid edge) | swept B_crit | samples (steps) in the branches "
        "| B_simple (± s.e.) | B_simple / B_crit | B_noise (± s.e.) | B_noise / B_crit "
        "| B_P, Adam's metric (± s.e.) | B_P / B_crit |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fit, n = r["fit"], r["noise"]
        steps = " / ".join("–" if row["steps"] is None else f"{row['steps']:.0f}" for row in r["rows"])
        mults = " / ".join(
            "–"
            if row["lr_multiplier"] is None
            else f"{row['lr_multiplier']:g}"
            + (
                "*"
                if r.get("lr_search", "grid") == "grid" and row["lr_multiplier"] in (min(GRID), max(GRID))
                else ""
            )
            for row in r["rows"]
        )
        crit = "–" if fit is None else f"{fit['b_crit']:.0f}" + ("" if fit["bounded"] else " (bound)")
        spent = r.get("cost") and r["cost"]["branches"]
        spent = f"{spent['samples']} ({spent['steps']})" if spent else "– (stored run)"
        fmt = lambda v, se: "–" if v is None else f"{v:.0f}" + (f" ± {se:.0f}" if se else "")  # noqa: E731
        ratio = lambda v: "–" if v is None else f"{v:.2f}" + (" ✓" if _within(v) else " ✗")  # noqa: E731
        lines.append(
            f"| {r['dataset']}, steps {r['warm_steps']} + {r['ref_steps']}, {r.get('seeds', 1)} seed(s) "
            f"| {r['checkpoint_loss']:.3f} -> {r['target_loss']:.3f} | {steps} | {mults} | {crit} | {spent} | "
            f"{fmt(n['b_simple'], n['b_simple_stderr'])} | {ratio(r['ratio_simple'])} | "
            f"{fmt(n['b_noise'], n['b_noise_stderr'])} | {ratio(r['ratio_noise'])} | "
            f"{fmt(n.get('b_preconditioned'), n.get('b_preconditioned_stderr'))} | "
            f"{ratio(r.get('ratio_preconditioned'))} |"
        )
    if any(r.get("along") for r in results):
        lines += _along_table(results, ratio)
    return "\n".join(lines)


def _along_table(results: list[dict], ratio) -> list[str]:
    """``--along``: each estimate / B_crit at the checkpoint, at the target, and over the window."""
    lines = [
        "",
        "Read along the window (estimate / swept B_crit at the checkpoint, at the target, and over the window: "
        "the readings averaged with dS_min = dS/(1 + B/32), `critical_batch_along`):",
        "",
        "| dataset | swept B_crit | "
        + " | ".join(
            f"{n}: readings checkpoint -> target | {n} / B_crit (start / target / window)"
            for n in ESTIMATES.values()
        )
        + " |",
        "|---|---:|" + "---|---|" * len(ESTIMATES),
    ]
    for r in results:
        along = r.get("along")
        if not along:
            continue
        cells = []
        for key in ESTIMATES:
            a = along[key]
            cells.append(" / ".join("–" if v is None else f"{v:.0f}" for v in a["readings"]))
            cells.append(" / ".join(ratio(a[k]) for k in ("ratio_start", "ratio_at_target", "ratio_window")))
        crit = "–" if r["fit"] is None else f"{r['fit']['b_crit']:.0f}"
        lines.append(f"| {r['dataset']} | {crit} | " + " | ".join(cells) + " |")
    return lines


def stored_runs(path: str) -> list[dict]:
    """One dict per data set from a results JSON this script wrote: ``{"results": [...], "provenance": ...}``,
    or the bare list written before the provenance record (2026-12-07); anything else is refused by name."""
    data = json.loads(Path(path).read_text())
    runs = data.get("results") if isinstance(data, dict) else data
    if not isinstance(runs, list):
        raise ValueError(f"{path}: expected critical_branch.py's results (a list, or a dict with 'results')")
    return runs


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist1d,charlm")
    parser.add_argument("--max-files", type=int, default=400, help="stdlib files for the char-LM corpus")
    parser.add_argument("--out", default=str(HERE / "results" / "critical_branch.json"))
    parser.add_argument(
        "--grid",
        default=None,
        help=f"branch LR multipliers (the checkpoint is the same); default {','.join(f'{g:g}' for g in GRID)}",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="the optimizer of the checkpoint and the branches (module docstring)",
    )
    parser.add_argument(
        "--local", action="store_true", help="a later checkpoint and a quarter window (local_window)"
    )
    parser.add_argument(
        "--from-init",
        action="store_true",
        help="branch from the first step: whole runs to the target, an exhaustive sweep (from_init)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="data orders per branch, steps averaged")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the branches' first data order (the checkpoint is the same)",
    )
    parser.add_argument(
        "--lr-search",
        choices=("grid", "walk"),
        default="grid",
        help="each branch's LR: every multiplier of --grid, or a walk on powers of two (next_multiplier)",
    )
    parser.add_argument(
        "--batches",
        default=",".join(str(b) for b in BATCHES),
        help="the branches' batch sizes, ascending (to bound a critical batch beyond 512)",
    )
    parser.add_argument(
        "--noise-only",
        metavar="FROM_JSON",
        default=None,
        help="measure at the checkpoints only; take the branches from this earlier run (module docstring)",
    )
    parser.add_argument(
        "--along",
        type=int,
        default=0,
        metavar="K",
        help="also read the estimates at K evenly spaced points from the checkpoint to the target (module docstring)",
    )
    args = parser.parse_args(argv)
    if args.local and args.from_init:
        parser.error("--local and --from-init move the checkpoint opposite ways: give one")
    if args.along == 1 or args.along < 0:
        parser.error(
            f"--along {args.along}: expected 0 (off) or at least 2 points, the checkpoint and the target"
        )
    if args.seeds < 1:
        parser.error(f"--seeds must be a positive integer, got {args.seeds}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be 0 or more, got {args.first_seed}")
    if args.noise_only and (args.first_seed or args.lr_search != "grid"):
        parser.error("--first-seed and --lr-search choose how branches run: --noise-only runs none")
    if args.lr_search == "walk" and args.grid is not None:
        parser.error(f"--grid {args.grid}: --lr-search walk has no grid; give one or the other")
    if args.noise_only and args.seeds != 1:
        parser.error(
            f"--seeds {args.seeds}: --noise-only runs no branches; the stored run's seeds are reported"
        )
    if args.grid is not None:
        GRID[:] = [float(g) for g in args.grid.split(",")]
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: expected comma-separated integers, e.g. 8,16,32")
    if len(batches) < 3 or batches != sorted(set(batches)) or batches[0] < 1:
        parser.error(f"--batches {args.batches!r}: expected at least 3 distinct positive sizes, ascending")
    BATCHES[:] = batches
    try:
        earlier = {r["dataset"]: r for r in stored_runs(args.noise_only)} if args.noise_only else {}
    except (OSError, ValueError) as error:
        parser.error(f"--noise-only: {error}")
    torch.set_num_threads(1)
    load = load_average()
    started = time.time()
    run_by = provenance(PACKAGES)  # taken before training: the code and venv that made the numbers
    results = []
    for problem in problems(args.datasets.split(","), args.max_files):
        problem = local_window(problem) if args.local else from_init(problem) if args.from_init else problem
        if args.noise_only and problem.name not in earlier:
            parser.error(f"--noise-only: {args.noise_only} has no run of {problem.name!r}")
        swept = earlier.get(problem.name) if args.noise_only else None
        results.append(
            branch_experiment(
                problem,
                log=lambda m: print(m, flush=True),
                swept=swept,
                optimizer=args.optimizer,
                seeds=args.seeds,
                along=args.along,
                lr_search=args.lr_search,
                first_seed=args.first_seed,
            )
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"results": results, "provenance": run_by}, indent=2))
    command = "python benchmarks/critical_batch.py --branch " + " ".join(argv or [])
    print(f"LR grid {GRID}")
    print()
    print(markdown(results, command.strip(), time.time() - started, load, args.optimizer))


if __name__ == "__main__":
    main()
