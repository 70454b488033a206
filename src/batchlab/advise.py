"""Advise: the batch size (and learning rate) that reaches a result soonest -- goodput, not throughput.

Memory decides which batch sizes are *possible* (:func:`~batchlab.find_batch_size`); throughput says how many
samples a second each one processes; the gradient noise scale says how much each sample is worth. Pollux
(Qiao et al. 2021, OSDI; AdaptDL) multiplies the two:

- statistical efficiency ``E(B) = (B_noise + B0)/(B_noise + B)`` -- the progress per sample at batch B relative
  to batch B0, from McCandlish et al. 2018 (steps ``S = S_min(1 + B_noise/B)``, samples
  ``E = E_min(1 + B/B_noise)``);
- goodput ``G(B) = throughput(B) x E(B)`` -- progress per second; the best batch maximises it.

Everything here is a pure function over numbers (no torch): a throughput curve ``{batch_size: samples/s}``
(from :func:`batchlab.profile.profile`, the fit search's probes or your own timings) and a measured B_noise
(:class:`~batchlab.noise.GradientNoiseScale`, B_simple) go in; a :class:`Recommendation` comes out.

How :func:`advise` models throughput (the curve is per device, one optimizer step per micro-batch):

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
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from batchlab.scaling import RULES, BatchPlan, LRScaling, Schedule, _check_int, plan_batch, scale_lr, schedule

__all__ = [
    "Candidate",
    "Recommendation",
    "advise",
    "statistical_efficiency",
    "goodput",
    "steps_factor",
    "doubling_step_reduction",
    "interpolate_throughput",
    "throughput_knee",
    "candidate_batch_sizes",
    "DEFAULT_GAIN_THRESHOLD",
    "CANDIDATES",
    "KNEE_THRESHOLD",
]

# Pollux/AdaptDL re-configure a job only when the new configuration's goodput is > 5% better: smaller gains
# are within the noise of the measurements and not worth a restart (Qiao et al. 2021, §4.2).
DEFAULT_GAIN_THRESHOLD = 0.05
# Pollux/AdaptDL evaluate goodput at ~50 geometrically spaced batch sizes: dense enough that neighbours
# differ by a few percent over a 1..10^4 range, cheap enough to print.
CANDIDATES = 50
# The knee of throughput: the smallest measured batch reaching 95% of the best samples/s (as batchlab.profile).
KNEE_THRESHOLD = 0.95
# Accumulation candidates: the largest single step times 2, 4, 8 and 16 -- enough to show what accumulation
# costs in goodput; more steps per update only lower the efficiency further.
ACCUMULATION_FACTORS = (2, 4, 8, 16)
# Throughput rarely falls as the batch grows; a drop of more than 25% between neighbouring measured sizes is
# timing noise (a loaded machine) or a real cliff (memory pressure, a kernel switch), and either deserves a word.
THROUGHPUT_DROP = 0.25
_TIE = 1e-9  # relative goodput difference treated as a tie (the smaller batch wins a tie)


# ---------------------------------------------------------------------------------------------- validation


def _check_positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_noise(value: object) -> float:
    """B_noise as a float in [0, inf]; a NoiseScaleEstimate is unwrapped by the caller."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ValueError(
            f"noise_scale must be a number >= 0 (B_noise, e.g. GradientNoiseScale.result().b_simple; "
            f"inf when noise dominates), got {value!r}"
        )
    x = float(value)
    if x < 0:
        raise ValueError(f"noise_scale must be >= 0 (B_noise), got {value!r}")
    return x


def _unwrap_noise(noise_scale: Any) -> tuple[float, float | None]:
    """``(B_noise, stderr or None)`` from a number or a :class:`~batchlab.noise.NoiseScaleEstimate`."""
    if hasattr(noise_scale, "b_simple") and hasattr(noise_scale, "note"):
        if noise_scale.b_simple is None:
            raise ValueError(f"the noise-scale estimate has no B_simple: {noise_scale.note}")
        return _check_noise(noise_scale.b_simple), getattr(noise_scale, "b_simple_stderr", None)
    if noise_scale is None:
        raise ValueError(
            "noise_scale is required: a measured B_noise (batchlab.measure_noise_scale or "
            "GradientNoiseScale.result().b_simple), or inf to let throughput alone decide"
        )
    return _check_noise(noise_scale), None


def _parse_curve(throughput: Any) -> tuple[tuple[int, float], ...]:
    """``{b: samples/s}`` or pairs ``(b, samples/s)`` -> sorted pairs; every value checked."""
    if isinstance(throughput, Mapping):
        items = list(throughput.items())
    elif isinstance(throughput, Iterable) and not isinstance(throughput, (str, bytes)):
        items = []
        for item in throughput:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(
                    f"throughput must be {{batch_size: samples_per_second}} or (batch_size, samples_per_second) "
                    f"pairs; got the item {item!r}"
                )
            items.append(tuple(item))
    else:
        raise ValueError(
            f"throughput must be {{batch_size: samples_per_second}} or (batch_size, samples_per_second) pairs, "
            f"got {type(throughput).__name__}"
        )
    if not items:
        raise ValueError("throughput is empty: measure samples/s at one batch size at least")
    curve: dict[int, float] = {}
    for b, speed in items:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"throughput batch sizes must be integers >= 1, got {b!r}")
        if (
            isinstance(speed, bool)
            or not isinstance(speed, numbers.Real)
            or not math.isfinite(speed)
            or speed <= 0
        ):
            raise ValueError(
                f"throughput at batch {b} must be a finite number of samples/s > 0, got {speed!r}"
            )
        if int(b) in curve:
            raise ValueError(f"throughput lists batch size {b} twice")
        curve[int(b)] = float(speed)
    return tuple(sorted(curve.items()))


# ----------------------------------------------------------------------------------------------- the math


def statistical_efficiency(batch_size: float, noise_scale: float, base_batch: float) -> float:
    """Progress per sample at ``batch_size`` relative to ``base_batch``: ``(B_noise + B0)/(B_noise + B)``.

    Pollux's efficiency (Qiao et al. 2021, eq. 6) from McCandlish et al. 2018's samples-to-result
    ``E = E_min(1 + B/B_noise)``: 1 at B0, below 1 above it. ``noise_scale=inf`` (noise dominates: every
    sample counts fully) gives 1; ``0`` (no noise: one sample is as good as a batch) gives B0/B.
    """
    b = _check_positive("batch_size", batch_size)
    b0 = _check_positive("base_batch", base_batch)
    noise = _check_noise(noise_scale)
    if math.isinf(noise):
        return 1.0
    return (noise + b0) / (noise + b)


def goodput(samples_per_second: float, batch_size: float, noise_scale: float, base_batch: float) -> float:
    """Throughput x statistical efficiency: samples/s, each counted by its worth relative to ``base_batch``."""
    speed = _check_positive("samples_per_second", samples_per_second)
    return speed * statistical_efficiency(batch_size, noise_scale, base_batch)


def steps_factor(batch_size: float, noise_scale: float) -> float:
    """Optimizer steps to a result relative to the fewest possible: ``S/S_min = 1 + B_noise/B``."""
    noise = _check_noise(noise_scale)
    b = _check_positive("batch_size", batch_size)
    return math.inf if math.isinf(noise) else 1.0 + noise / b


def doubling_step_reduction(batch_size: float, noise_scale: float) -> float:
    """How many times fewer steps doubling ``batch_size`` buys: ``S(B)/S(2B) = (2B + 2B_noise)/(2B + B_noise)``.

    2 when noise dominates (B << B_noise: perfect scaling), 4/3 at B = B_noise (the critical batch), toward 1
    above it (McCandlish et al. 2018, eq. 2.11).
    """
    noise = _check_noise(noise_scale)
    b = _check_positive("batch_size", batch_size)
    if math.isinf(noise):
        return 2.0
    return (2.0 * b + 2.0 * noise) / (2.0 * b + noise)


def interpolate_throughput(throughput: Any, batch_size: float) -> float:
    """Samples/s at ``batch_size``: exact at measured sizes, log-log linear between neighbours.

    Raises ``ValueError`` outside the measured range -- a curve is never extrapolated.
    """
    curve = _parse_curve(throughput)
    return _interpolate(curve, batch_size)


def _interpolate(curve: tuple[tuple[int, float], ...], batch_size: float) -> float:
    lo_b, hi_b = curve[0][0], curve[-1][0]
    if not lo_b <= batch_size <= hi_b:
        raise ValueError(
            f"batch {batch_size:g} is outside the measured throughput range {lo_b}..{hi_b}; "
            f"the curve is not extrapolated"
        )
    for (b0, t0), (b1, t1) in zip(curve, curve[1:]):
        if b0 <= batch_size <= b1:
            if batch_size == b0:
                return t0
            if batch_size == b1:
                return t1
            w = (math.log(batch_size) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    return curve[0][1]  # a single measured point


def throughput_knee(throughput: Any, threshold: float = KNEE_THRESHOLD) -> int:
    """The smallest measured batch size reaching ``threshold`` x the best measured samples/s."""
    curve = _parse_curve(throughput)
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    best = max(t for _, t in curve)
    return min(b for b, t in curve if t >= threshold * best)


def candidate_batch_sizes(smallest: int, largest: int, count: int = CANDIDATES) -> list[int]:
    """About ``count`` integer batch sizes spaced geometrically from ``smallest`` to ``largest`` (both in)."""
    lo, hi = _check_int("smallest", smallest), _check_int("largest", largest)
    n = _check_int("count", count)
    if hi < lo:
        raise ValueError(f"largest must be >= smallest, got smallest={smallest!r}, largest={largest!r}")
    if hi == lo or n == 1:
        return sorted({lo, hi})
    ratio = (hi / lo) ** (1.0 / (n - 1))
    return sorted({lo, hi} | {min(hi, max(lo, round(lo * ratio**i))) for i in range(n)})


# ------------------------------------------------------------------------------------------ recommendation


@dataclass(frozen=True)
class Candidate:
    """One global batch size evaluated by :func:`advise`.

    ``samples_per_second`` is the throughput of all ``world_size`` ranks together at micro batch
    ``micro_batch`` (``source``: ``"measured"`` at a measured size, ``"interpolated"`` between two, or
    ``"accumulation"`` -- the largest single step's throughput, repeated). ``goodput`` = throughput x
    ``efficiency``; ``relative_goodput`` is it divided by the current batch's goodput. ``steps_factor`` is
    S/S_min = 1 + B_noise/B.
    """

    batch_size: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    samples_per_second: float
    efficiency: float
    goodput: float
    relative_goodput: float
    steps_factor: float | None
    source: str

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (an infinite steps factor -- noise dominates -- is None)."""
        d = asdict(self)
        if self.steps_factor is not None and math.isinf(self.steps_factor):
            d["steps_factor"] = None
        return d


@dataclass(frozen=True)
class Recommendation:
    """What :func:`advise` recommends, and why.

    The global batch ``batch_size`` runs as ``micro_batch`` x ``accumulation_steps`` x ``world_size``
    (``plan``), with the learning rate ``lr.lr`` (``lr`` is the full :class:`~batchlab.scaling.LRScaling`:
    rule, factor, Adam betas/eps, warmup). ``switched`` says whether it differs from ``current_batch``: only
    when ``best_batch`` beats it by more than ``gain_threshold`` in goodput (``gain``). ``schedule`` /
    ``current_schedule`` are the epoch arithmetic at the recommended and the current batch (when the dataset
    size is known); ``warmup_steps`` converts the rule's warmup epochs into optimizer steps. ``candidates`` is
    the goodput table, ``explanation`` the reasoning in plain words, one finding per line.
    """

    batch_size: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    plan: BatchPlan
    lr: LRScaling
    warmup_steps: int | None
    switched: bool
    gain: float
    gain_threshold: float
    current_batch: int
    best_batch: int
    best_batch_range: tuple[int, int] | None
    base_batch: int
    noise_scale: float
    noise_scale_stderr: float | None
    efficiency: float
    samples_per_second: float
    goodput: float
    current_goodput: float
    knee_batch: int
    max_throughput_batch: int
    max_micro_batch: int
    schedule: Schedule | None
    current_schedule: Schedule | None
    candidates: tuple[Candidate, ...]
    explanation: tuple[str, ...]
    notes: tuple[str, ...]

    def candidate(self, batch_size: int) -> Candidate:
        """The goodput-table row of ``batch_size`` (KeyError if it was not a candidate)."""
        for c in self.candidates:
            if c.batch_size == batch_size:
                return c
        raise KeyError(f"batch {batch_size} is not in the goodput table")

    def summary(self) -> str:
        """The explanation, one line per finding."""
        return "\n".join(self.explanation)

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (no inf or NaN: an infinite B_noise is None, and ``notes`` say so)."""
        d = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("plan", "lr", "schedule", "current_schedule", "candidates")
        }
        d["plan"] = self.plan.to_dict()
        d["lr"] = self.lr.to_dict()
        d["schedule"] = self.schedule.to_dict() if self.schedule else None
        d["current_schedule"] = self.current_schedule.to_dict() if self.current_schedule else None
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d["best_batch_range"] = list(self.best_batch_range) if self.best_batch_range else None
        d["explanation"] = list(self.explanation)
        d["notes"] = list(self.notes)
        if math.isinf(self.noise_scale):
            d["noise_scale"] = None
        return d


def _evaluate(
    curve: tuple[tuple[int, float], ...],
    batch_size: int,
    max_step: int,
    world: int,
) -> tuple[BatchPlan, float, str]:
    """(plan, samples/s of all ranks, source) of a global batch; ValueError if its micro batch is unmeasured."""
    plan = plan_batch(batch_size, max_step, world)
    measured = dict(curve)
    speed = world * _interpolate(curve, plan.micro_batch)
    if plan.accumulation_steps > 1:
        source = "accumulation"
    else:
        source = "measured" if plan.micro_batch in measured else "interpolated"
    return plan, speed, source


def _best(rows: list[Candidate]) -> Candidate:
    """The row with the most goodput; a tie (within ``_TIE``) goes to the smaller batch."""
    top = max(r.goodput for r in rows)
    return min((r for r in rows if r.goodput >= top * (1.0 - _TIE)), key=lambda r: r.batch_size)


def _table(
    curve: tuple[tuple[int, float], ...],
    sizes: Iterable[int],
    max_step: int,
    world: int,
) -> dict[int, tuple[BatchPlan, float, str]]:
    out: dict[int, tuple[BatchPlan, float, str]] = {}
    for b in sorted(set(sizes)):
        plan, speed, source = _evaluate(curve, b, max_step, world)
        out.setdefault(plan.effective_batch, (plan, speed, source))
    return out


def _rows(
    table: dict[int, tuple[BatchPlan, float, str]], noise: float, base: int, reference: float | None
) -> list[Candidate]:
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


def _fmt(x: float) -> str:
    """A batch-like number for prose: 192, 1.2e+04."""
    return f"{x:,.0f}" if x < 1e6 else f"{x:.2g}"


def advise(
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
    gain_threshold: float = DEFAULT_GAIN_THRESHOLD,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    drop_last: bool = False,
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
        gain_threshold: the relative goodput gain needed to move away from ``current_batch`` (Pollux: 5%).
        betas, eps: Adam's, mapped by the ``sqrt`` rule (Malladi et al. 2022) and passed through otherwise.
        drop_last: passed to :func:`schedule`.

    Raises ``ValueError`` naming the argument for invalid input, for a current batch whose micro batch lies
    below the smallest measured size, and for an estimate without a B_simple.
    """
    curve = _parse_curve(throughput)
    noise, noise_se = _unwrap_noise(noise_scale)
    current = _check_int("current_batch", current_batch)
    base = _check_int("base_batch", base_batch) if base_batch is not None else current
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(repr(r) for r in RULES)}; got {rule!r}")
    world = _check_int("world_size", world_size)
    max_micro = _check_int("max_micro_batch", max_micro_batch) if max_micro_batch is not None else None
    data = _check_int("dataset_size", dataset_size) if dataset_size is not None else None
    n_epochs = _check_int("epochs", epochs) if epochs is not None else None
    if n_epochs is not None and data is None:
        raise ValueError("epochs needs dataset_size (the epoch arithmetic counts samples per epoch)")
    if (
        isinstance(gain_threshold, bool)
        or not isinstance(gain_threshold, numbers.Real)
        or not math.isfinite(gain_threshold)
        or gain_threshold < 0
    ):
        raise ValueError(f"gain_threshold must be a finite number >= 0 (0.05 = 5%), got {gain_threshold!r}")
    # validates lr, betas, eps (and the rule) before any work; the real call follows with the chosen batch
    scale_lr(lr, base, base, rule, noise_scale=noise if rule == "adascale" else None, betas=betas, eps=eps)

    smallest, largest = curve[0][0], curve[-1][0]
    notes: list[str] = []
    max_step = largest if max_micro is None else min(max_micro, largest)
    if max_micro is not None and max_micro < smallest:
        raise ValueError(
            f"max_micro_batch {max_micro} is below the smallest measured batch {smallest}: no measured size fits"
        )
    if max_micro is not None and max_micro > largest:
        notes.append(
            f"throughput was measured up to batch {largest}; single steps up to the {max_micro} that fit are "
            f"not considered (the curve is not extrapolated)"
        )
    lo, hi = smallest * world, max_step * world
    cap = data if data is not None else None
    if cap is not None and cap < lo:
        raise ValueError(
            f"dataset_size {cap} is smaller than the smallest measured batch {smallest} x world size {world}"
        )
    if cap is not None and current > cap:
        raise ValueError(f"current_batch {current} is larger than the dataset ({cap} samples)")

    current_plan = plan_batch(current, max_step, world)
    if current_plan.micro_batch < smallest:
        raise ValueError(
            f"current_batch {current} runs as micro-batches of {current_plan.micro_batch} "
            f"({current_plan.note}), below the smallest measured batch {smallest}; measure throughput there"
        )

    if not current_plan.exact:
        notes.append(f"the current batch {current} cannot run exactly: {current_plan.note}")
    # Candidates: per-rank sizes over the measured range (geometric, plus every measured size), times the
    # ranks; then accumulation of the largest single step; then the current batch itself.
    per_rank = candidate_batch_sizes(smallest, max_step) + [b for b, _ in curve if b <= max_step]
    sizes = [r * world for r in per_rank]
    sizes += [hi * k for k in ACCUMULATION_FACTORS]
    if cap is not None:
        sizes = [b for b in sizes if b <= cap]
    sizes.append(current)

    def best_for(noise_value: float) -> Candidate:
        table = _table(curve, sizes, max_step, world)
        return _best(_rows(table, noise_value, base, None))

    table = _table(curve, sizes, max_step, world)
    current_eff_batch = current_plan.effective_batch
    raw = _rows(table, noise, base, None)
    current_goodput = next(r.goodput for r in raw if r.batch_size == current_eff_batch)
    rows = _rows(table, noise, base, current_goodput)
    best = _best(rows)
    current_row = next(r for r in rows if r.batch_size == current_eff_batch)
    gain = best.goodput / current_row.goodput - 1.0
    switched = best.batch_size != current_eff_batch and gain > gain_threshold
    chosen = best if switched else current_row

    best_range = None
    if noise_se is not None and math.isfinite(noise) and noise_se > 0:
        ends = [best_for(max(0.0, noise - noise_se)).batch_size, best_for(noise + noise_se).batch_size]
        best_range = (min(ends), max(ends))

    lr_scaling = scale_lr(
        lr,
        base,
        chosen.batch_size,
        rule,
        noise_scale=noise if rule == "adascale" else None,
        betas=betas,
        eps=eps,
    )
    plan = plan_batch(chosen.batch_size, max_step, world)
    sched = current_sched = None
    warmup_steps = None
    if data is not None:
        e = n_epochs or 1
        sched = schedule(data, plan.micro_batch, e, plan.accumulation_steps, world, drop_last)
        current_sched = schedule(
            data, current_plan.micro_batch, e, current_plan.accumulation_steps, world, drop_last
        )
        if lr_scaling.warmup_epochs:
            warmup_steps = math.ceil(lr_scaling.warmup_epochs * sched.steps_per_epoch)
            if n_epochs is not None and lr_scaling.warmup_epochs > n_epochs:
                notes.append(
                    f"the suggested warmup ({lr_scaling.warmup_epochs:g} epochs) is longer than the run "
                    f"({n_epochs} epochs): shorten it or keep the smaller batch"
                )
    if world > 1:
        notes.append(
            f"throughput at {world} ranks is {world} x one device's: an upper bound that ignores the all-reduce"
        )
    if math.isinf(noise):
        notes.append("B_noise is infinite (noise dominates): every sample counts fully, throughput decides")

    drops = [
        f"{b0} -> {b1} ({t1 / t0 - 1:+.0%})"
        for (b0, t0), (b1, t1) in zip(curve, curve[1:])
        if t1 < (1 - THROUGHPUT_DROP) * t0
    ]
    if drops:
        notes.append(
            f"throughput falls with the batch at {', '.join(drops)}: noisy timings (a loaded machine) or a real "
            f"cliff; the recommendation follows the measurements, so re-measure if the machine was busy"
        )
    knee = throughput_knee(curve)
    fastest = max(curve, key=lambda bt: bt[1])[0]
    explanation = _explain(
        noise=noise,
        noise_se=noise_se,
        base=base,
        curve=curve,
        knee=knee,
        fastest=fastest,
        best=best,
        chosen=chosen,
        current=current_row,
        gain=gain,
        gain_threshold=float(gain_threshold),
        switched=switched,
        plan=plan,
        max_step=max_step,
        lr_scaling=lr_scaling,
        warmup_steps=warmup_steps,
        sched=sched,
        current_sched=current_sched,
        best_range=best_range,
    )
    return Recommendation(
        batch_size=chosen.batch_size,
        micro_batch=plan.micro_batch,
        accumulation_steps=plan.accumulation_steps,
        world_size=world,
        plan=plan,
        lr=lr_scaling,
        warmup_steps=warmup_steps,
        switched=switched,
        gain=gain,
        gain_threshold=float(gain_threshold),
        current_batch=current,
        best_batch=best.batch_size,
        best_batch_range=best_range,
        base_batch=base,
        noise_scale=noise,
        noise_scale_stderr=noise_se,
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
        explanation=tuple(explanation),
        notes=tuple(notes),
    )


def _range_text(best_range: tuple[int, int] | None) -> str:
    if best_range is None:
        return ""
    if best_range[0] == best_range[1]:
        return " (the same with B_noise ± 1 standard error)"
    return f" (with B_noise ± 1 standard error the peak lies at {best_range[0]}..{best_range[1]})"


def _explain(
    *,
    noise: float,
    noise_se: float | None,
    base: int,
    curve: tuple[tuple[int, float], ...],
    knee: int,
    fastest: int,
    best: Candidate,
    chosen: Candidate,
    current: Candidate,
    gain: float,
    gain_threshold: float,
    switched: bool,
    plan: BatchPlan,
    max_step: int,
    lr_scaling: LRScaling,
    warmup_steps: int | None,
    sched: Schedule | None,
    current_sched: Schedule | None,
    best_range: tuple[int, int] | None,
) -> list[str]:
    """The reasoning, one plain-words line per finding."""
    lines = []
    # 1. what the noise scale says
    if math.isinf(noise):
        lines.append(
            "gradient noise dominates (B_noise = inf): every doubling of the batch halves the steps to a "
            "result, so throughput alone decides"
        )
    elif noise == 0:
        lines.append(
            "no gradient noise measured (B_noise = 0): a larger batch buys no fewer steps, so only steps per "
            "second count"
        )
    else:
        se = f" ± {_fmt(noise_se)}" if noise_se else ""
        lines.append(
            f"gradient noise scale B_noise ≈ {_fmt(noise)}{se} (the critical batch): past ~{_fmt(noise)} each "
            f"doubling of the batch buys < {doubling_step_reduction(noise, noise):.2f}x fewer steps "
            f"(S = S_min(1 + B_noise/B), McCandlish et al. 2018); at batch {chosen.batch_size} a doubling buys "
            f"{doubling_step_reduction(chosen.batch_size, noise):.2f}x"
        )
    # 2. the throughput curve
    speeds = dict(curve)
    knee_text = (
        f"the knee of throughput is at {knee} ({speeds[knee]:,.0f} samples/s, ≥ {KNEE_THRESHOLD:.0%} of the best)"
        if knee != fastest
        else f"throughput keeps rising up to {knee} (no knee below it)"
    )
    lines.append(
        f"{knee_text}; most samples/s at {fastest} ({speeds[fastest]:,.0f}); measured {curve[0][0]}..{curve[-1][0]}"
        f", {len(curve)} size{'s' if len(curve) > 1 else ''}"
    )
    # 3. goodput
    lines.append(
        f"goodput (samples/s x statistical efficiency (B_noise + B0)/(B_noise + B), B0 = {base}) peaks at "
        f"{best.batch_size}: {best.relative_goodput:.2f}x the current batch {current.batch_size}'s"
        + _range_text(best_range)
    )
    # 4. the 5% rule, either way
    if best.batch_size == current.batch_size:
        lines.append(f"keep batch {current.batch_size}: it already has the most goodput")
    elif switched:
        steps = ""
        if current.steps_factor is not None and math.isfinite(current.steps_factor):
            ratio = current.steps_factor / chosen.steps_factor
            steps = (
                f"; {ratio:.2f}x fewer steps"
                if ratio >= 1
                else f"; {1 / ratio:.2f}x more steps, each cheaper"
            )
        lines.append(
            f"switch from {current.batch_size} to {chosen.batch_size}: {gain:+.0%} goodput, above the "
            f"{gain_threshold:.0%} threshold (Pollux switches only for more); reaches the same result in "
            f"~{1 / (1 + gain):.2f}x the time{steps}"
        )
    else:
        lines.append(
            f"keep batch {current.batch_size}: the best, {best.batch_size}, gains only {gain:+.1%} goodput, not "
            f"above the {gain_threshold:.0%} threshold (Pollux switches only for more)"
        )
    # 5. how to run it
    if plan.accumulation_steps > 1:
        lines.append(
            f"{chosen.batch_size} does not fit in one step (largest measured single step: {max_step}): "
            f"{plan.note}; accumulation buys no throughput"
        )
    elif plan.world_size > 1:
        lines.append(f"run it as {plan.note}")
    # 6. learning rate
    lr_line = (
        f"learning rate {lr_scaling.lr:.3g} ({lr_scaling.rule} rule: {lr_scaling.base_lr:g} at batch "
        f"{lr_scaling.base_batch} x {lr_scaling.factor:.3g})"
    )
    if lr_scaling.betas is not None:
        lr_line += f", betas ({lr_scaling.betas[0]:.4g}, {lr_scaling.betas[1]:.4g})"
    if lr_scaling.eps is not None:
        lr_line += f", eps {lr_scaling.eps:.3g}"
    if lr_scaling.warmup_epochs:
        lr_line += f"; warm up over {lr_scaling.warmup_epochs:g} epochs" + (
            f" ({warmup_steps} steps)" if warmup_steps is not None else ""
        )
    lines.append(lr_line)
    # 7. the schedule
    if sched is not None and current_sched is not None:
        per = "" if sched.epochs == 1 else f" x {sched.epochs} epochs = {sched.total_steps} in total"
        micro = (
            f" ({sched.iterations_per_epoch} micro-batches)"
            if sched.iterations_per_epoch != sched.steps_per_epoch
            else ""
        )
        steps = f"{sched.steps_per_epoch} optimizer step{'s' if sched.steps_per_epoch != 1 else ''}"
        line = f"{sched.dataset_size} samples: {steps} per epoch{micro}{per}"
        if current_sched.global_batch != sched.global_batch:
            line += f"; {current_sched.steps_per_epoch} per epoch at batch {current_sched.global_batch}"
        lines.append(line)
    return lines
