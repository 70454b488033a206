"""The critical batch measured directly: short runs at several batch sizes, branched from the workload's state.

Merrill et al. 2025 ("Critical batch size revisited") measure the critical batch *locally*: from one
checkpoint, train short branches at several batch sizes until the validation loss falls to a target a little
below the checkpoint's, and see how the steps to it fall with the batch. McCandlish et al. 2018 (eq. 2.11)
give the shape, S = S_min (1 + B_crit / B), fitted here by :func:`~batchlab.noise.critical.fit_critical_batch`.
It answers what the gradient noise scale only estimates: on digits, MNIST-1D and a character-level LM this
measurement landed within 1.5x of the B_crit of an exhaustive sweep of whole runs on all three, at 1/5 to 1/17
of its samples, where no noise-scale reading did (benchmarks/RESULTS.md, "A cheap branched B_crit against
the exhaustive sweep"; issue 13 item 4)::

    from batchlab.sweeps import branch_critical_batch

    found = branch_critical_batch(workload, [8, 16, 32, 64, 128, 256], base_batch=32, reference_steps=100)
    print(found.summary())        # B_crit ≈ ..., with the steps to the target at every batch

How, for a :class:`~batchlab.Workload` with ``validation`` data, at its current state (the checkpoint):

1. **The target.** ``target_loss``, or else the validation loss the workload reaches after ``reference_steps``
   steps at ``base_batch`` (the batch its LR is set for) from the checkpoint.
2. **Each branch** starts from the checkpoint (weights, optimizer state, GradScaler: restored in place) at
   batch B and an LR of the optimizer's own (or ``lr``), moved from ``base_batch`` to B by ``rule`` and times a
   multiplier; only the LR changes between branches (every param group by the same factor), as in the
   protocol the benchmark checked. It trains until the validation loss reaches the target (evaluated every
   ``evaluate_every`` steps, the crossing interpolated between evaluations) or ``max_steps``.
3. **The LR of each batch** is searched: with ``lr_grid``, each multiplier of it once (the rule's own first,
   then outwards); without, a walk on powers of two (:func:`next_multiplier`: about 3 LRs a batch when the
   rule is right). A run that can no longer beat the best LR found for its batch is stopped early
   (:func:`step_cap`), which leaves the best unchanged.
4. **The fit** of S = S_min (1 + B_crit/B) to each batch's steps at its best LR (at least three batches that
   reach the target).

Each branch draws its data from torch's global RNG seeded by :func:`branch_seed`, a stream of its own per batch
and data order (``orders`` of them, steps averaged), inside ``torch.random.fork_rng``. On return -- or on an
error, which propagates -- the model, optimizer, GradScaler and every RNG are as they were, bitwise
(:class:`~batchlab.workload.state.StateSnapshot`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from batchlab import checks
from batchlab.advice.pipeline import Advice
from batchlab.advice.scaling import plan_batch, scale_lr
from batchlab.errors import NoNoiseScaleError, WorkloadError
from batchlab.fit.search import check_host_room
from batchlab.noise.critical import CriticalBatchFit, crossing, fit_critical_batch
from batchlab.sweeps.workload_run import WorkloadRun, missing_validation
from batchlab.workload.state import StateSnapshot
from batchlab.workload.workload import StepFunction, Workload

__all__ = [
    "BranchRow",
    "BranchTrial",
    "BranchedCriticalBatch",
    "DEFAULT_REFERENCE_STEPS",
    "MEASURED_BY",
    "RULES",
    "branch_advice",
    "branch_critical_batch",
    "branch_seed",
    "check_batch_sizes",
    "next_multiplier",
    "step_cap",
]

# The reference window: 100 steps at the base batch move the loss far enough for steps-to-target to be measured
# at 1/20-window resolution, and short enough to stay local (Merrill et al. branch over a small window).
DEFAULT_REFERENCE_STEPS = 100
# How advice names a critical batch from this module where it stands in for the noise scale (advise --branch).
MEASURED_BY = "the critical batch measured by short runs branched from the current state (batchlab.branch_critical_batch)"
RULES = ("sqrt", "linear", "none")  # how the LR moves from base_batch to a branch's batch (advice.scaling)
# A walked multiplier stays within 2^-6..2^6 of the rule's LR: a best beyond is a diverging rule, not tuning.
WALK_BOUND = 2.0**6
# A branch may run this many reference windows at most: the slowest batch measured (the smallest, at 1/4 of
# base_batch) needs about 4x the base batch's steps when B_crit is large, and the walk's worse LRs more.
MAX_WINDOWS = 6
# Evaluations per reference window: the crossing is interpolated between them, so 20 points place it to a few
# percent of the window without evaluating every step.
EVALUATIONS_PER_WINDOW = 20
# Past this many times the base batch a branch reaches the target within a handful of steps (below B_crit the
# steps fall in proportion to the batch), inside the first evaluation interval: it is evaluated every step.
EVERY_STEP_ABOVE = 16


def branch_seed(batch_size: int, order: int) -> int:
    """The seed of the data stream of the branch at ``batch_size`` in data order ``order``: one stream per pair.

    ``10 + B + 1000·order`` keeps every branch's stream apart from the others' and from the reference run's
    (seed 0 by default); the benchmark's stored runs (benchmarks/critical_branch.py) used the same seeds.
    """
    return 10 + batch_size + 1000 * order


def next_multiplier(
    tried: Sequence[tuple[float, float | None]], grid: Sequence[float] | None
) -> float | None:
    """The next LR multiplier a batch tries, given the (multiplier, steps) tried so far (steps None: the target
    was not reached within the cap); None when done.

    With a ``grid``: each of it once, the rule's own LR (1) first and then outwards. Without: a hill climb on
    powers of two from 1, a neighbour (x2 first, then /2) of the best so far until both are tried and slower, so
    the best is never at an edge, and a batch costs 3 LRs when the rule is right and about one more per doubling
    it is off. Bounded to 2^-6..2^6 (:data:`WALK_BOUND`).
    """
    if grid is not None:
        done = {m for m, _ in tried}
        return next((m for m in sorted(grid, key=lambda m: abs(math.log(m))) if m not in done), None)
    if not tried:
        return 1.0
    reached = [(steps, m) for m, steps in tried if steps is not None]
    centre = min(reached)[1] if reached else 1.0
    done = {m for m, _ in tried}
    return next(
        (m for m in (2 * centre, centre / 2) if m not in done and 1 / WALK_BOUND <= m <= WALK_BOUND), None
    )


def step_cap(max_steps: int, best_steps: float | None, orders: int, evaluate_every: int) -> int:
    """The most steps one run of a branch may take: ``max_steps``, or fewer once a best LR is known.

    A run past ``best_steps x orders`` steps makes its LR's mean over the orders exceed the best, so that LR
    cannot be the best and the run is stopped there (plus one evaluation interval, since the steps are
    interpolated between evaluations); the best found is the same as without the cap.
    """
    if best_steps is None:
        return max_steps
    return min(max_steps, math.ceil(best_steps * orders) + evaluate_every)


@dataclass(frozen=True)
class BranchTrial:
    """One LR tried at one batch: mean steps to the target over the data orders (None: not reached)."""

    batch_size: int
    lr_multiplier: float
    lr: float
    steps: float | None

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class BranchRow:
    """One batch: its best LR's steps to the target (None where no LR reached it), and every LR tried."""

    batch_size: int
    micro_batch: int
    accumulation: int
    steps: float | None
    lr: float | None
    lr_multiplier: float | None
    trials: tuple[BranchTrial, ...]

    @property
    def lr_at_edge(self) -> bool:
        """Whether the best LR is the largest or smallest of two or more tried: a faster one may lie beyond, so
        ``steps`` is then an upper bound. The walk stops at an edge only at its bound (2^±6 the rule's LR), the
        mark of a base LR far from tuned."""
        tried = [t.lr_multiplier for t in self.trials]
        return (
            self.lr_multiplier is not None
            and len(tried) > 1
            and self.lr_multiplier in (min(tried), max(tried))
        )

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field (the trials as dicts) and ``lr_at_edge``."""
        return {**asdict(self), "trials": [t.to_dict() for t in self.trials], "lr_at_edge": self.lr_at_edge}


@dataclass(frozen=True)
class BranchedCriticalBatch:
    """The critical batch fitted to steps-to-target of branches from one state (module docstring).

    ``fit`` is None when fewer than three batches reached the target; ``note`` then says so. ``steps_spent`` and
    ``samples_spent`` count every training step taken, the reference run's included, and ``seconds`` is the
    measurement's wall time: what it cost.
    """

    start_loss: float
    target_loss: float
    base_batch: int
    base_lr: float
    rule: str
    lr_search: str
    orders: int
    rows: tuple[BranchRow, ...]
    fit: CriticalBatchFit | None
    steps_spent: int
    samples_spent: int
    seconds: float
    note: str

    @property
    def b_crit(self) -> float | None:
        """The fitted critical batch (None without a fit)."""
        return self.fit.b_crit if self.fit is not None else None

    def summary(self) -> str:
        """A few lines: the answer, then each batch's steps to the target and the LR that got there."""
        lines = [
            f"critical batch (branched): {self.note}; validation loss {self.start_loss:.4g} -> target "
            f"{self.target_loss:.4g}, LR {self.lr_search} from the {self.rule} rule at batch {self.base_batch}, "
            f"{self.steps_spent} steps and {self.samples_spent} samples spent"
        ]
        for row in self.rows:
            reached = (
                f"{row.steps:.1f} steps at lr {row.lr:.3g} (x{row.lr_multiplier:g})"
                if row.steps is not None
                else "target not reached"
            )
            edge = (
                "; the best LR is at the edge of those tried: at most this many steps"
                if row.lr_at_edge
                else ""
            )
            lines.append(f"  batch {row.batch_size}: {reached}; {len(row.trials)} LR(s) tried{edge}")
        edges = [row.batch_size for row in self.rows if row.lr_at_edge]
        if edges:
            lines.append(
                f"  warning: at batch {', '.join(map(str, edges))} the best LR lies at the edge of those tried, so "
                f"the fit leans on upper bounds; the optimizer's lr {self.base_lr:g} at batch {self.base_batch} "
                "may be far from tuned: set it nearer and branch again"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict: every field, the rows and the fit as dicts, and ``b_crit``."""
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("rows", "fit")},
            "rows": [row.to_dict() for row in self.rows],
            "fit": self.fit.to_dict() if self.fit is not None else None,
            "b_crit": self.b_crit,
        }


def check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """``batch_sizes`` sorted, or a one-line error: at least 3 distinct positive integers (a fit needs 3)."""
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise TypeError(
            f"batch_sizes must be a sequence of integers, e.g. [8, 16, 32, 64], got {batch_sizes!r}"
        )
    sizes = [checks.integer("batch size", b) for b in batch_sizes]
    if len(sizes) < 3 or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"batch_sizes {list(batch_sizes)!r}: fitting B_crit needs at least 3 distinct batch sizes"
        )
    return sorted(sizes)


def _check_grid(lr_grid: Sequence[float] | None) -> list[float] | None:
    if lr_grid is None:
        return None
    grid = [checks.number("LR multiplier", m) for m in lr_grid]
    if not grid:
        raise ValueError(f"lr_grid {list(lr_grid)!r}: expected one or more multipliers > 0, e.g. [0.5, 1, 2]")
    return grid


class _Brancher:
    """Runs branches from one snapshot and counts what they spend (one per call of branch_critical_batch)."""

    def __init__(
        self,
        workload: Workload,
        snapshot: StateSnapshot,
        evaluate_every: Callable[[int], int],
        max_micro_batch: int | None,
    ):
        self.workload = workload
        self.snapshot = snapshot
        self.evaluate_every = evaluate_every
        self.max_micro_batch = max_micro_batch
        self.steps = 0
        self.samples = 0
        # the validation loss at the snapshot, read once: every branch starts there
        self.start_loss = math.nan

    def split(self, batch_size: int) -> tuple[int, int]:
        """(micro-batch, accumulation) of ``batch_size``: whole, or within ``max_micro_batch`` (plan_batch)."""
        if self.max_micro_batch is None or batch_size <= self.max_micro_batch:
            return batch_size, 1
        plan = plan_batch(batch_size, self.max_micro_batch)
        return plan.micro_batch, plan.accumulation_steps

    def run(self, batch_size: int, lr: float, seed: int, steps: int, target: float | None) -> float | None:
        """Train from the snapshot at ``batch_size`` and ``lr`` for at most ``steps`` steps.

        With ``target``: the steps to it, interpolated between evaluations, or None if it is not reached (or the
        loss turns non-finite). Without: the validation loss after ``steps`` steps (None if the loss turned
        non-finite on the way).
        """
        self.snapshot.restore()
        _, accumulation = self.split(batch_size)
        run = WorkloadRun(
            self.workload, batch_size=batch_size, seed=seed, lr=lr, accumulation=accumulation, noise_every=0
        )
        every = self.evaluate_every(batch_size)
        xs, losses = [0], [self.start_loss]
        for step in range(1, steps + 1):
            loss = run.train_step()
            self.steps, self.samples = self.steps + 1, self.samples + batch_size
            if not math.isfinite(loss):
                return None
            if target is not None and step % every == 0:
                xs.append(step)
                losses.append(_validation_loss(run))
                if losses[-1] <= target:
                    return crossing(xs, losses, target)[0]
        return None if target is not None else _validation_loss(run)


def _validation_loss(run: WorkloadRun) -> float:
    return float(run.evaluate()["loss"])


def branch_critical_batch(
    workload: Workload,
    batch_sizes: Sequence[int],
    *,
    base_batch: int,
    lr: float | None = None,
    reference_steps: int = DEFAULT_REFERENCE_STEPS,
    target_loss: float | None = None,
    rule: str = "sqrt",
    lr_grid: Sequence[float] | None = None,
    orders: int = 1,
    first_order: int = 0,
    max_steps: int | None = None,
    evaluate_every: int | None = None,
    max_micro_batch: int | None = None,
    seed: int = 0,
    on_trial: Callable[[BranchTrial], None] | None = None,
) -> BranchedCriticalBatch:
    """Measure the critical batch from the workload's current state by branching short runs (module docstring).

    Args:
        workload: a :class:`~batchlab.Workload` with ``validation`` data, at the state to branch from.
        batch_sizes: the branches' batch sizes (samples per optimizer step), at least 3 distinct.
        base_batch: the batch the optimizer's current LR is set for; the rule moves the LR from it.
        lr: the LR at ``base_batch`` (default: the optimizer's first parameter group's); every group is moved by
            the same factor, and the optimizer's own LR is back as it was on return.
        reference_steps: the window: the target is the validation loss ``reference_steps`` steps at
            ``base_batch`` reach (unless ``target_loss`` is given); it also sets the default ``max_steps``
            (6 windows) and ``evaluate_every`` (1/20 of a window; every step above 16x the base batch).
        target_loss: the validation loss to reach, instead of the reference run's; below the start's.
        rule: ``"sqrt"`` (Adam-type, Malladi et al. 2022), ``"linear"`` (SGD, Goyal et al. 2017) or ``"none"``.
        lr_grid: LR multipliers to try at every batch (None: the walk, :func:`next_multiplier`).
        orders: data orders per LR (steps averaged); ``first_order``: the first one's index (:func:`branch_seed`).
        max_steps: the most steps a branch may run.
        evaluate_every: steps between validation evaluations, at every batch.
        max_micro_batch: split a batch above it into accumulation micro-batches (e.g. the largest that fits).
        seed: the seed of the reference run's data stream.
        on_trial: called after each LR tried (progress).

    Returns a :class:`BranchedCriticalBatch`. Raises ``ValueError``/``TypeError`` naming a bad argument before
    anything trains, and :class:`~batchlab.errors.WorkloadError` for a Workload without validation data.
    """
    started = time.perf_counter()
    if isinstance(workload, StepFunction) or not isinstance(workload, Workload):
        raise TypeError(
            f"branch_critical_batch trains a batchlab.Workload (with validation data), got {type(workload).__name__}"
        )
    if getattr(workload, "validation", None) is None:
        raise WorkloadError(missing_validation(f"the Workload {workload.name!r}"))
    sizes = check_batch_sizes(batch_sizes)
    base_batch = checks.integer("base_batch", base_batch)
    reference_steps = checks.integer("reference_steps", reference_steps)
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
    grid = _check_grid(lr_grid)
    orders = checks.integer("orders", orders)
    first_order = checks.integer("first_order", first_order, minimum=0)
    max_steps = checks.integer("max_steps", max_steps, none=True) or MAX_WINDOWS * reference_steps
    every = checks.integer("evaluate_every", evaluate_every, none=True)
    if max_micro_batch is not None:
        checks.integer("max_micro_batch", max_micro_batch)
    if target_loss is not None:
        target_loss = checks.number("target_loss", target_loss)
    if lr is not None:
        base_lr = checks.number("lr", lr)
    else:
        base_lr = float(workload.optimizer.param_groups[0]["lr"])
        if not base_lr > 0:
            raise ValueError(
                f"the workload's optimizer has lr {base_lr!r}; the branches scale it and need an lr > 0 (or pass lr)"
            )

    def interval(batch_size: int) -> int:
        if every is not None:
            return every
        if batch_size > EVERY_STEP_ABOVE * base_batch:
            return 1
        return max(1, reference_steps // EVALUATIONS_PER_WINDOW)

    largest = max(*sizes, base_batch)  # every micro-batch is at most this, and at most max_micro_batch
    check_host_room(workload, min(largest, max_micro_batch or largest), what="the branched runs")
    brancher = _Brancher(workload, workload.snapshot(), interval, max_micro_batch)
    try:
        start = _validation_loss(WorkloadRun(workload, batch_size=base_batch, accumulation=1, noise_every=0))
        brancher.start_loss = start
        if target_loss is None:
            target_loss = brancher.run(base_batch, base_lr, seed, reference_steps, None)
            if target_loss is None or not math.isfinite(target_loss):
                raise ValueError(
                    f"the reference run diverged: {reference_steps} steps at base_batch {base_batch} and the "
                    f"optimizer's lr {base_lr:g} gave a non-finite loss; lower the lr or give target_loss"
                )
        if not target_loss < start:
            raise ValueError(
                f"target loss {target_loss:.6g} is not below the validation loss at the start ({start:.6g}): "
                "nothing to branch towards; give a lower target_loss or more reference_steps"
            )
        rows = []
        for b in sizes:
            rule_lr = scale_lr(base_lr, base_batch, b, rule).lr
            micro, accumulation = brancher.split(b)
            best: BranchTrial | None = None
            trials: list[BranchTrial] = []
            while (
                multiplier := next_multiplier([(t.lr_multiplier, t.steps) for t in trials], grid)
            ) is not None:
                lr = rule_lr * multiplier
                cap = step_cap(max_steps, best.steps if best else None, orders, interval(b))
                runs = []
                for order in range(first_order, first_order + orders):
                    steps = brancher.run(b, lr, branch_seed(b, order), cap, target_loss)
                    if steps is None:
                        break
                    runs.append(steps)
                trial = BranchTrial(b, multiplier, lr, sum(runs) / orders if len(runs) == orders else None)
                trials.append(trial)
                if on_trial is not None:
                    on_trial(trial)
                if trial.steps is not None and (best is None or trial.steps < best.steps):
                    best = trial
            rows.append(
                BranchRow(
                    b,
                    micro,
                    accumulation,
                    best.steps if best else None,
                    best.lr if best else None,
                    best.lr_multiplier if best else None,
                    tuple(trials),
                )
            )
    finally:
        brancher.snapshot.restore()
    reached = [row for row in rows if row.steps is not None]
    fit = (
        fit_critical_batch([r.batch_size for r in reached], [r.steps for r in reached])
        if len(reached) >= 3
        else None
    )
    note = fit.note if fit is not None else (
        f"only {len(reached)} of {len(rows)} batch sizes reached the target: no fit (give more max_steps, a "
        "nearer target or other batch sizes)"
    )  # fmt: skip
    return BranchedCriticalBatch(
        start_loss=start,
        target_loss=target_loss,
        base_batch=base_batch,
        base_lr=base_lr,
        rule=rule,
        lr_search="grid" if grid is not None else "walk",
        orders=orders,
        rows=tuple(rows),
        fit=fit,
        steps_spent=brancher.steps,
        samples_spent=brancher.samples,
        seconds=time.perf_counter() - started,
        note=note,
    )


def branch_advice(
    workload: Workload,
    advice: Advice | NoNoiseScaleError,
    batch_sizes: Sequence[int],
    *,
    reference_steps: int = DEFAULT_REFERENCE_STEPS,
    target_loss: float | None = None,
    on_trial: Callable[[BranchTrial], None] | None = None,
) -> tuple[BranchedCriticalBatch, Advice | NoNoiseScaleError]:
    """What ``batchlab advise --branch`` adds to :func:`batchlab.advise`: the critical batch branched from the
    workload at the advice's own LR, base batch and rule, each micro-batch within its fit, and the advice
    recommended again with it (:meth:`~batchlab.advice.Advice.with_critical_batch`, named :data:`MEASURED_BY`).

    ``advice`` is what :func:`~batchlab.advise` returned, or the :class:`~batchlab.errors.NoNoiseScaleError` it
    raised when the noise scale came out undefined: its kept measurements are advised on with the branched B_crit
    alone. Returns (the branched measurement, the advice with its B_crit); ``advice`` comes back unchanged when
    the branches give no fit (``b_crit`` None). ``workload`` is the one ``advice`` measured, at the same state.
    """
    settings = advice.options
    found = branch_critical_batch(
        workload,
        batch_sizes,
        base_batch=settings["base_batch"],
        lr=settings["lr"],
        rule=settings["rule"],
        reference_steps=reference_steps,
        target_loss=target_loss,
        max_micro_batch=settings["max_micro_batch"],
        on_trial=on_trial,
    )
    if found.b_crit is None:
        return found, advice
    return found, advice.with_critical_batch(found.b_crit, MEASURED_BY)
