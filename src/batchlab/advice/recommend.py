"""The recommendation: the global batch with the most goodput, its learning rate, plan and schedule, and why.

:func:`recommend` is pure (no torch): a throughput curve ``{batch_size: samples/s}`` (from
:func:`batchlab.profile`, the fit search's probes or your own timings) and a measured B_noise
(:class:`~batchlab.noise.GradientNoiseScale`, B_simple) go in; a :class:`Recommendation` comes out. The
goodput math is :mod:`batchlab.advice.goodput`; :func:`batchlab.advise` measures both inputs on a workload
and calls this.

The steps, one function each: check the request; the largest single step; how the current batch runs;
the candidate sizes; the goodput table; the choice (Pollux's 5% rule); the range the choice spans within
B_noise's standard error; the learning rate, plan and schedules; notes on the curve. The records are
:mod:`batchlab.advice.records`, the explanation in words :mod:`batchlab.advice.explain`.

How it models throughput (the curve is per device, one optimizer step per micro-batch):

- Between measured sizes it interpolates linearly in log(batch) vs log(samples/s) (a power law between
  neighbours). It never extrapolates: no size below the smallest measured one, and no single step above
  ``min(max_micro_batch, largest measured)``.
- Larger global batches run as gradient accumulation of that largest micro-batch (:func:`plan_batch`), at its
  throughput: accumulation buys no speed (Google's Tuning Playbook), so with a finite B_noise it never raises
  goodput -- it appears when the current batch does not fit in one step.
- ``world_size`` ranks multiply the throughput (an upper bound: it ignores the all-reduce).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from batchlab import checks
from batchlab.advice.explain import explain
from batchlab.advice.goodput import (
    Curve,
    candidate_batch_sizes,
    goodput_ratio_range,
    interpolate_throughput,
    parse_curve,
    parse_spread,
    statistical_efficiency,
    steps_factor,
)
from batchlab.advice.records import Candidate, Recommendation
from batchlab.advice.scaling import (
    RULES,
    BatchPlan,
    LRScaling,
    Schedule,
    check_noise_scale,
    plan_batch,
    scale_lr,
    schedule,
)
from batchlab.defaults import GAIN_THRESHOLD
from batchlab.profiling.analysis import knee_batch_size

__all__ = ["recommend", "check_fits_dataset"]

# Accumulation candidates: the largest single step times 2, 4, 8 and 16 -- enough to show what accumulation
# costs in goodput; more steps per update only lower the efficiency further.
ACCUMULATION_FACTORS = (2, 4, 8, 16)
# Throughput rarely falls as the batch grows; a drop of more than 25% between neighbouring measured sizes is
# timing noise (a loaded machine) or a real cliff (memory pressure, a kernel switch), and either deserves a word.
THROUGHPUT_DROP = 0.25
_TIE = 1e-9  # relative goodput difference treated as a tie (the smaller batch wins a tie)


# ------------------------------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class _Request:
    """The checked arguments of :func:`recommend` (defaults filled in)."""

    curve: Curve
    spread: tuple[Curve, Curve] | None  # (low, high) samples/s at every measured size
    noise: float
    noise_se: float | None
    current: int
    lr: float
    base: int
    rule: str
    max_micro: int | None
    world: int
    dataset_size: int | None
    epochs: int | None
    gain_threshold: float
    betas: tuple[float, float] | None
    eps: float | None
    drop_last: bool
    noise_from: str | None

    @property
    def smallest(self) -> int:
        return self.curve[0][0]

    @property
    def largest(self) -> int:
        return self.curve[-1][0]


def _unwrap_noise(noise_scale: Any) -> tuple[float, float | None]:
    """``(B_noise, stderr or None)`` from a number or a :class:`~batchlab.noise.NoiseScaleEstimate`."""
    if hasattr(noise_scale, "b_simple") and hasattr(noise_scale, "note"):
        if noise_scale.b_simple is None:
            raise ValueError(f"the noise-scale estimate has no B_simple: {noise_scale.note}")
        return check_noise_scale(noise_scale.b_simple), getattr(noise_scale, "b_simple_stderr", None)
    if noise_scale is None:
        raise ValueError(
            "noise_scale is required: a measured B_noise (batchlab.measure_noise_scale or "
            "GradientNoiseScale.result().b_simple), or inf to let throughput alone decide"
        )
    return check_noise_scale(noise_scale), None


def _check_request(
    throughput: Any,
    noise_scale: Any,
    *,
    current_batch: Any,
    lr: Any,
    base_batch: Any,
    rule: Any,
    max_micro_batch: Any,
    world_size: Any,
    dataset_size: Any,
    epochs: Any,
    gain_threshold: Any,
    betas: Any,
    eps: Any,
    drop_last: bool,
    throughput_spread: Any = None,
    noise_from: Any = None,
) -> _Request:
    """Every argument of :func:`recommend` checked before any work (``drop_last`` by :func:`schedule`)."""
    curve = parse_curve(throughput)
    spread = parse_spread(throughput_spread, curve)
    noise, noise_se = _unwrap_noise(noise_scale)
    current = checks.integer("current_batch", current_batch)
    base = checks.integer("base_batch", base_batch, none=True) or current
    rule = checks.choice("rule", rule, RULES)
    world = checks.integer("world_size", world_size)
    max_micro = checks.integer("max_micro_batch", max_micro_batch, none=True)
    data = checks.integer("dataset_size", dataset_size, none=True)
    n_epochs = checks.integer("epochs", epochs, none=True)
    if n_epochs is not None and data is None:
        raise ValueError("epochs needs dataset_size (the epoch arithmetic counts samples per epoch)")
    threshold = checks.number("gain_threshold", gain_threshold, inclusive=True, what="0.05 = 5%")
    if noise_from is not None and not (isinstance(noise_from, str) and noise_from.strip()):
        raise ValueError(
            f"noise_from must be words saying where B_noise came from, or None; got {noise_from!r}"
        )
    # validates lr, betas and eps before any work; the real call follows with the chosen batch
    scale_lr(lr, base, base, rule, noise_scale=noise if rule == "adascale" else None, betas=betas, eps=eps)
    return _Request(
        curve=curve,
        spread=spread,
        noise=noise,
        noise_se=noise_se,
        current=current,
        lr=lr,
        base=base,
        rule=rule,
        max_micro=max_micro,
        world=world,
        dataset_size=data,
        epochs=n_epochs,
        gain_threshold=threshold,
        betas=betas,
        eps=eps,
        drop_last=drop_last,
        noise_from=noise_from,
    )


def _largest_step(req: _Request, notes: list[str]) -> int:
    """The largest single step: ``max_micro_batch`` within the measured curve (never extrapolated)."""
    if req.max_micro is None:
        return req.largest
    if req.max_micro < req.smallest:
        raise ValueError(
            f"max_micro_batch {req.max_micro} is below the smallest measured batch {req.smallest}: "
            "no measured size fits"
        )
    if req.max_micro > req.largest:
        notes.append(
            f"throughput was measured up to batch {req.largest}; single steps up to the {req.max_micro} that "
            f"fit are not considered (the curve is not extrapolated)"
        )
    return min(req.max_micro, req.largest)


def check_fits_dataset(current_batch: int, dataset_size: int | None) -> None:
    """A current batch larger than the dataset is an error (no epoch has that many samples)."""
    if dataset_size and current_batch > dataset_size:
        raise ValueError(f"current_batch {current_batch} is larger than the dataset ({dataset_size} samples)")


def _current_plan(req: _Request, max_step: int, notes: list[str]) -> BatchPlan:
    """How the current batch runs; it must fit the dataset and run on measured micro-batches."""
    cap = req.dataset_size
    if cap is not None and cap < req.smallest * req.world:
        raise ValueError(
            f"dataset_size {cap} is smaller than the smallest measured batch {req.smallest} x world size "
            f"{req.world}"
        )
    check_fits_dataset(req.current, cap)
    plan = plan_batch(req.current, max_step, req.world)
    if plan.micro_batch < req.smallest:
        raise ValueError(
            f"current_batch {req.current} runs as micro-batches of {plan.micro_batch} ({plan.note}), below "
            f"the smallest measured batch {req.smallest}; measure throughput there"
        )
    if not plan.exact:
        notes.append(f"the current batch {req.current} cannot run exactly: {plan.note}")
    return plan


def _candidate_sizes(req: _Request, max_step: int) -> list[int]:
    """Per-rank sizes over the measured range (geometric, plus every measured size), times the ranks; then
    accumulation of the largest single step; all capped by the dataset; then the current batch itself."""
    per_rank = candidate_batch_sizes(req.smallest, max_step) + [b for b, _ in req.curve if b <= max_step]
    sizes = [r * req.world for r in per_rank]
    sizes += [max_step * req.world * k for k in ACCUMULATION_FACTORS]
    if req.dataset_size is not None:
        sizes = [b for b in sizes if b <= req.dataset_size]
    return [*sizes, req.current]


_Table = dict[int, tuple[BatchPlan, float, str]]  # effective batch -> (plan, samples/s of all ranks, source)


def _table(curve: Curve, sizes: Iterable[int], max_step: int, world: int) -> _Table:
    """Plan and throughput of each size (keyed by the batch its plan achieves; the first plan wins)."""
    measured = dict(curve)
    out: _Table = {}
    for b in sorted(set(sizes)):
        plan = plan_batch(b, max_step, world)
        speed = world * interpolate_throughput(curve, plan.micro_batch)
        if plan.accumulation_steps > 1:
            source = "accumulation"
        else:
            source = "measured" if plan.micro_batch in measured else "interpolated"
        out.setdefault(plan.effective_batch, (plan, speed, source))
    return out


def _rows(table: _Table, noise: float, base: int, reference: float | None) -> list[Candidate]:
    """The goodput table at B_noise ``noise``; ``relative_goodput`` against ``reference`` (1.0 without)."""
    rows = []
    for b, (plan, speed, source) in sorted(table.items()):
        eff = statistical_efficiency(b, noise, base)
        rows.append(
            Candidate(
                batch_size=b,
                micro_batch=plan.micro_batch,
                accumulation_steps=plan.accumulation_steps,
                world_size=plan.world_size,
                samples_per_second=speed,
                efficiency=eff,
                goodput=speed * eff,
                relative_goodput=speed * eff / reference if reference else 1.0,
                steps_factor=steps_factor(b, noise),
                source=source,
            )
        )
    return rows


def _best(rows: list[Candidate]) -> Candidate:
    """The row with the most goodput; a tie (within ``_TIE``) goes to the smaller batch."""
    top = max(r.goodput for r in rows)
    return min((r for r in rows if r.goodput >= top * (1.0 - _TIE)), key=lambda r: r.batch_size)


def _goodput_rows(req: _Request, table: _Table, current_batch: int) -> tuple[list[Candidate], Candidate]:
    """The goodput table relative to the current batch's goodput, and the current batch's row."""
    raw = _rows(table, req.noise, req.base, None)
    reference = next(r.goodput for r in raw if r.batch_size == current_batch)
    rows = _rows(table, req.noise, req.base, reference)
    return rows, next(r for r in rows if r.batch_size == current_batch)


def _gain_range(req: _Request, best: Candidate, current: Candidate) -> tuple[float, float] | None:
    """The best batch's goodput gain over the current one at its extremes: across the throughput's spread
    (each size's reading's interval, interpolated between sizes) and B_noise ± 1 standard error.
    None when neither is known (a plain curve and a bare number)."""
    has_se = req.noise_se is not None and req.noise_se > 0 and math.isfinite(req.noise)
    if req.spread is None and not has_se:
        return None

    def speeds(row: Candidate) -> tuple[float, float]:
        if req.spread is None:
            return row.samples_per_second, row.samples_per_second
        low, high = req.spread
        micro = row.micro_batch
        return req.world * interpolate_throughput(low, micro), req.world * interpolate_throughput(high, micro)

    noise = (
        (max(0.0, req.noise - req.noise_se), req.noise + req.noise_se) if has_se else (req.noise, req.noise)
    )
    lo, hi = goodput_ratio_range(
        (speeds(best), speeds(current)), (best.batch_size, current.batch_size), noise, req.base
    )
    return lo - 1.0, hi - 1.0


def _choose(
    rows: list[Candidate], current: Candidate, req: _Request
) -> tuple[Candidate, Candidate, float, tuple[float, float] | None, bool]:
    """(best, chosen, gain, gain range, switched): Pollux's rule -- move only for more than the threshold's
    goodput gain -- made honest about the measurements: the gain must clear it across the whole range too."""
    best = _best(rows)
    gain = best.goodput / current.goodput - 1.0
    spread = _gain_range(req, best, current) if best.batch_size != current.batch_size else None
    holds = spread is None or spread[0] > req.gain_threshold
    switched = best.batch_size != current.batch_size and gain > req.gain_threshold and holds
    return best, best if switched else current, gain, spread, switched


def _best_batch_range(req: _Request, table: _Table) -> tuple[int, int] | None:
    """Where the goodput peak lies with B_noise one standard error lower and higher (None without one)."""
    if req.noise_se is None or not math.isfinite(req.noise) or req.noise_se <= 0:
        return None
    ends = [
        _best(_rows(table, noise, req.base, None)).batch_size
        for noise in (max(0.0, req.noise - req.noise_se), req.noise + req.noise_se)
    ]
    return min(ends), max(ends)


def _schedules(
    req: _Request, plan: BatchPlan, current_plan: BatchPlan, lr_scaling: LRScaling, notes: list[str]
) -> tuple[Schedule | None, Schedule | None, int | None]:
    """(schedule, current schedule, warmup steps) when the dataset size is known; one epoch without epochs."""
    if req.dataset_size is None:
        return None, None, None
    epochs = req.epochs or 1
    sched, current_sched = (
        schedule(req.dataset_size, p.micro_batch, epochs, p.accumulation_steps, req.world, req.drop_last)
        for p in (plan, current_plan)
    )
    warmup_steps = None
    if lr_scaling.warmup_epochs:
        warmup_steps = math.ceil(lr_scaling.warmup_epochs * sched.steps_per_epoch)
        if req.epochs is not None and lr_scaling.warmup_epochs > req.epochs:
            notes.append(
                f"the suggested warmup ({lr_scaling.warmup_epochs:g} epochs) is longer than the run "
                f"({req.epochs} epochs): shorten it or keep the smaller batch"
            )
    return sched, current_sched, warmup_steps


def _model_notes(req: _Request, notes: list[str]) -> None:
    """What the model of throughput assumes, and where the measured curve looks wrong."""
    if req.world > 1:
        notes.append(
            f"throughput at {req.world} ranks is {req.world} x one device's: an upper bound that ignores the "
            "all-reduce"
        )
    if math.isinf(req.noise):
        notes.append("B_noise is infinite (noise dominates): every sample counts fully, throughput decides")
    drops = [
        f"{b0} -> {b1} ({t1 / t0 - 1:+.0%})"
        for (b0, t0), (b1, t1) in zip(req.curve, req.curve[1:])
        if t1 < (1 - THROUGHPUT_DROP) * t0
    ]
    if drops:
        notes.append(
            f"throughput falls with the batch at {', '.join(drops)}: noisy timings (a loaded machine) or a real "
            f"cliff; the recommendation follows the measurements, so re-measure if the machine was busy"
        )


def recommend(
    throughput: Mapping[int, float] | Iterable[tuple[int, float]],
    noise_scale: Any,
    *,
    current_batch: int,
    lr: float,
    base_batch: int | None = None,
    rule: str = "sqrt",
    max_micro_batch: int | None = None,
    world_size: int = 1,
    dataset_size: int | None = None,
    epochs: int | None = None,
    gain_threshold: float = GAIN_THRESHOLD,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    drop_last: bool = False,
    throughput_spread: Mapping[int, tuple[float, float]] | None = None,
    noise_from: str | None = None,
) -> Recommendation:
    """Recommend the global batch size with the most goodput, its learning rate and how to run it.

    Args:
        throughput: samples/s per device at each measured micro-batch size, ``{b: samples_per_second}`` or
            ``(b, samples_per_second)`` pairs (e.g. from ``batchlab.profile``, or the fit search's probes).
        noise_scale: B_noise -- a number (``inf``: noise dominates, throughput alone decides) or a
            :class:`~batchlab.noise.NoiseScaleEstimate` (its ``b_simple``; its standard error gives
            ``best_batch_range``).
        current_batch: the global batch the run uses now; kept unless another wins by > ``gain_threshold``.
        lr: the learning rate tuned at ``base_batch``.
        base_batch: the batch ``lr`` was tuned at (default: ``current_batch``); also Pollux's B0 in the
            efficiency (the choice of B0 scales every goodput alike and never changes the best batch).
        rule: the LR scaling rule, one of ``linear``, ``sqrt``, ``adascale``, ``none`` (:func:`scale_lr`).
        max_micro_batch: the largest micro batch that fits (e.g. ``find_batch_size(...).batch_size``);
            default: the largest measured size. Larger batches run with gradient accumulation.
        world_size: data-parallel ranks; the global batch is micro x accumulation x ranks.
        dataset_size, epochs: for the epoch arithmetic (:func:`schedule`; one epoch when ``epochs`` is None),
            warmup in steps, and as a cap: no candidate exceeds ``dataset_size``.
        gain_threshold: the relative goodput gain needed to move away from ``current_batch``
            (:data:`batchlab.defaults.GAIN_THRESHOLD`, Pollux's 5%).
        betas, eps: Adam's, mapped by the ``sqrt`` rule (Malladi et al. 2022) and passed through otherwise.
        drop_last: passed to :func:`schedule`.
        throughput_spread: ``{b: (low, high)}`` samples/s at measured sizes -- how far each reading may be off
            (:func:`batchlab.advice.pipeline.throughput_spread`: the ~68% interval of a profile point's reading, its
            median step or on the CPU its 10th percentile). With it, or with B_noise's
            standard error, a switch needs the gain above ``gain_threshold`` at the low end of
            ``gain_range`` as well (issue 13: readings inside a loaded machine's noise advised batch 4 over 32).
        noise_from: where ``noise_scale`` came from, in words, when it is not the gradient noise scale (e.g.
            "the critical batch measured by branched runs"); the explanation names it.

    Raises ``ValueError`` naming the argument for invalid input, for a current batch whose micro batch lies
    below the smallest measured size, and for an estimate without a B_simple.
    """
    req = _check_request(
        throughput,
        noise_scale,
        current_batch=current_batch,
        lr=lr,
        base_batch=base_batch,
        rule=rule,
        max_micro_batch=max_micro_batch,
        world_size=world_size,
        dataset_size=dataset_size,
        epochs=epochs,
        gain_threshold=gain_threshold,
        betas=betas,
        eps=eps,
        drop_last=drop_last,
        throughput_spread=throughput_spread,
        noise_from=noise_from,
    )
    notes: list[str] = []
    max_step = _largest_step(req, notes)
    current_plan = _current_plan(req, max_step, notes)
    table = _table(req.curve, _candidate_sizes(req, max_step), max_step, req.world)
    rows, current_row = _goodput_rows(req, table, current_plan.effective_batch)
    best, chosen, gain, gain_range, switched = _choose(rows, current_row, req)
    best_range = _best_batch_range(req, table)
    lr_scaling = scale_lr(
        req.lr,
        req.base,
        chosen.batch_size,
        req.rule,
        noise_scale=req.noise if req.rule == "adascale" else None,
        betas=req.betas,
        eps=req.eps,
    )
    plan = plan_batch(chosen.batch_size, max_step, req.world)
    sched, current_sched, warmup_steps = _schedules(req, plan, current_plan, lr_scaling, notes)
    _model_notes(req, notes)
    knee = knee_batch_size([b for b, _ in req.curve], [t for _, t in req.curve])
    fastest = max(req.curve, key=lambda bt: bt[1])[0]
    rec = Recommendation(
        batch_size=chosen.batch_size,
        micro_batch=plan.micro_batch,
        accumulation_steps=plan.accumulation_steps,
        world_size=req.world,
        plan=plan,
        lr=lr_scaling,
        warmup_steps=warmup_steps,
        switched=switched,
        gain=gain,
        gain_range=gain_range,
        gain_threshold=req.gain_threshold,
        current_batch=req.current,
        best_batch=best.batch_size,
        best_batch_range=best_range,
        base_batch=req.base,
        noise_scale=req.noise,
        noise_scale_stderr=req.noise_se,
        noise_from=req.noise_from,
        efficiency=chosen.efficiency,
        samples_per_second=chosen.samples_per_second,
        goodput=chosen.goodput,
        current_goodput=current_row.goodput,
        knee_batch=knee,
        max_throughput_batch=fastest,
        max_micro_batch=max_step,
        schedule=sched,
        current_schedule=current_sched,
        candidates=tuple(rows),
        explanation=(),
        notes=tuple(notes),
    )
    return replace(rec, explanation=tuple(explain(rec, req.curve, current_row)))
