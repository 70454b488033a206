"""The advise pipeline: measure what fits, throughput and the noise scale on a Workload, then recommend.

:func:`advise` is what ``batchlab advise`` computes, callable from Python with the same numbers and the same
JSON (:meth:`Advice.to_dict`). Four measurements, each restoring the workload's state afterwards:

1. the largest batch that fits (:func:`~batchlab.find_batch_size`) -- the largest micro batch;
2. throughput over batch sizes: :func:`batchlab.profile` when it is importable (its own fit search is step 1),
   else the fit search's probes (two steps each, the first creating optimizer state: rough); each size read at
   its median timed step, on the CPU at the 10th percentile (:data:`CPU_STEP_QUANTILE`: interference only adds
   time) of its steps (pooled over the profile's interleaved rounds where ``rounds`` asks for them), with that
   reading's order-statistic interval as its spread;
3. the gradient noise scale (:func:`~batchlab.measure_noise_scale`);
4. :func:`~batchlab.advice.recommend` combines them with the learning-rate rule and the epoch arithmetic.

A critical batch measured apart (``critical_batch=``; :meth:`Advice.with_critical_batch` on an advice already
made, which is how ``batchlab advise --branch`` uses :func:`batchlab.branch_critical_batch`) takes B_simple's
place in the efficiency; B_simple is measured and reported all the same.

The policy the pipeline adds to the pure recommendation: the learning rate, Adam's betas and eps come from the
optimizer's first parameter group unless given (:func:`optimizer_hyperparameters`); ``rule="auto"`` picks
linear for SGD and sqrt otherwise (:func:`rule_for`); the current batch defaults to
:data:`DEFAULT_CURRENT_BATCH`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Protocol

from batchlab import checks
from batchlab.advice.recommend import check_fits_dataset, recommend
from batchlab.advice.records import Recommendation
from batchlab.advice.scaling import RULES
from batchlab.defaults import GAIN_THRESHOLD, MEASURED_MAX_BATCH
from batchlab.errors import DoesNotFitError, NoNoiseScaleError
from batchlab.fit import FitResult, Probe, find_batch_size
from batchlab.noise.estimator import DEFAULT_BETA, NoiseScaleEstimate, check_beta
from batchlab.noise.measure import (
    DEFAULT_NOISE_STEPS,
    measure_noise_scale,
    measurement_dict,
    noise_batch_for,
    require_workload,
)
from batchlab.noise.measure import noise_collector as collector_for
from batchlab.profiling.analysis import check_rounds, quantile_interval, sample_quantile
from batchlab.workload.workload import Workload

__all__ = [
    "Advice",
    "Progress",
    "advise",
    "rule_for",
    "optimizer_hyperparameters",
    "DEFAULT_CURRENT_BATCH",
    "ADVISE_SECONDS_PER_POINT",
    "THROUGHPUT_SOURCES",
    "throughput_spread",
    "throughput_curve",
    "step_quantile",
    "CPU_STEP_QUANTILE",
    "CRITICAL_BATCH_GIVEN",
    "check_critical_batch",
]

# 32: the batch most example scripts and tutorials start from (PyTorch examples, Keras' fit default), used
# when neither current_batch nor base_batch says what the run uses now.
DEFAULT_CURRENT_BATCH = 32
# advise needs the curve's shape, not 1% precision: 0.2 timed seconds per size (profile's default is 1.0)
# keeps the mlp-digits run well under half a minute on two CPU cores.
ADVISE_SECONDS_PER_POINT = 0.2
THROUGHPUT_SOURCES = ("auto", "profile", "probes")
# On the CPU advise reads each size's step time at the 10th percentile of its timed steps, not their median.
# Interference from other processes only ever adds time to a step (Python's timeit docs: the lowest of repeated
# timings is the one that says how fast the code runs, higher ones come from other processes interfering; Chen &
# Revels 2016, "Robust benchmarking in noisy environments": timing noise on a shared machine is non-negative and
# heavy-tailed, and they read the minimum). A low quantile follows the compute time and leaves the load out; the
# 10th percentile rather than the minimum so that the reading has a distribution-free confidence interval
# (:func:`~batchlab.profiling.analysis.quantile_interval`, the spread) and does not rest on one step -- with up
# to 10 timed steps it is the minimum. Measured (benchmarks/RESULTS.md, "advise end to end", run 4): read at the
# fastest step, advise came to 1.11x / 1.12x / 0.94x of the best fixed batch's time, at the median 1.35-2.7x.
# On CUDA the median stays: the evidence above is the CPU's, and a GPU's clock (boost, then throttling when hot)
# moves step times both ways, so its fastest steps may be a speed the run does not keep.
CPU_STEP_QUANTILE = 0.1
# How the explanation names a critical batch passed in as a number (critical_batch=, --critical-batch).
CRITICAL_BATCH_GIVEN = "the critical batch given, in place of the measured noise scale"


class Progress(Protocol):
    """What :func:`advise` reports while it measures (the CLI's ``Display`` is one; the default shows nothing)."""

    def phase(self, text: str) -> None: ...  # a new phase begins

    def probe(self, probe: Probe) -> None: ...  # a fit-search probe ended

    def variant_probe(self, variant: str, probe: Probe) -> None: ...  # a probe of profile's fit search

    def point(self, point: Any) -> None: ...  # a profile point was timed

    def count(self, label: str, done: int, total: int) -> None: ...  # noise steps done of total


class _Silent:
    def phase(self, text: str) -> None:
        pass

    def probe(self, probe: Probe) -> None:
        pass

    def variant_probe(self, variant: str, probe: Probe) -> None:
        pass

    def point(self, point: Any) -> None:
        pass

    def count(self, label: str, done: int, total: int) -> None:
        pass


@dataclass(frozen=True)
class Advice:
    """What :func:`advise` measured and recommends: the :class:`Recommendation` and every input behind it.

    ``throughput`` is the curve the recommendation used (``{micro batch: samples/s}``) and
    ``throughput_spread`` the ~68% interval of each size's reading (None from the fit probes, which time no
    single step); the reading is each size's median step, or on the CPU its :data:`CPU_STEP_QUANTILE` quantile
    (:func:`step_quantile`; ``throughput_detail`` says which). Timed as
    ``throughput_source`` says (``"profile"`` or ``"fit probes"``; ``throughput_detail`` in words). ``noise``
    is the estimate, measured with ``noise_collector`` over ``noise_steps`` steps at ``noise_batch`` in
    ``noise_seconds``. ``lr_from`` and ``rule_reason`` say where the learning rate and its rule came from;
    ``seconds`` is the whole pipeline's wall time. ``options`` are the keyword arguments the recommendation was
    made with besides the curve, its spread and B_noise (what :meth:`with_critical_batch` recommends again with).
    """

    recommendation: Recommendation
    fit: FitResult
    throughput: dict[int, float]
    throughput_spread: dict[int, tuple[float, float]] | None
    throughput_source: str
    throughput_detail: str
    noise: NoiseScaleEstimate
    noise_collector: str
    noise_batch: int
    noise_steps: int
    noise_seconds: float
    lr_from: str
    rule_reason: str
    seconds: float
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def with_critical_batch(self, critical_batch: float, source: str = CRITICAL_BATCH_GIVEN) -> Advice:
        """The same measurements recommended on again with ``critical_batch`` as B_noise in the efficiency.

        B_simple, the noise scale advise measures, read 0.3-0.9x the critical batch of an exhaustive sweep on
        digits, MNIST-1D and a char-LM; short runs branched from one state
        (:func:`batchlab.branch_critical_batch`) landed within 1.5x on all three (benchmarks/RESULTS.md, issue
        13 item 4). This is how a measured critical batch replaces it: nothing is timed or trained again.
        ``source`` says in words where the number came from (the explanation names it). A bare number has no
        standard error, so a switch then has to hold across the throughput's spread alone.
        """
        measured = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recommendation"}
        return _advice_on(measured, critical_batch, source)

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict: ``batchlab advise --json`` prints it (with the workload's name first)."""
        fit = self.fit
        return {
            "device": fit.device,
            "recommendation": self.recommendation.to_dict(),
            "throughput_source": self.throughput_source,
            "throughput_detail": self.throughput_detail,
            "throughput": {str(b): s for b, s in sorted(self.throughput.items())},
            "throughput_spread": (
                {str(b): list(r) for b, r in sorted(self.throughput_spread.items())}
                if self.throughput_spread
                else None
            ),
            "fit": {
                "batch_size": fit.batch_size,
                "limited_by": fit.limited_by,
                "budget_bytes": fit.budget_bytes,
                "peak_bytes": fit.peak_bytes,
            },
            "noise": measurement_dict(
                self.noise, self.noise_collector, self.noise_batch, self.noise_steps, self.noise_seconds
            ),
            "lr_from": self.lr_from,
            "rule_reason": self.rule_reason,
            "seconds": self.seconds,
        }


def check_critical_batch(value: Any) -> float:
    """A critical batch given in place of the noise scale: a positive, finite number of samples."""
    return checks.number("critical_batch", value, what="samples, e.g. branch_critical_batch(...).b_crit")


def rule_for(optimizer: Any) -> tuple[str, str]:
    """(rule, reason) for ``rule="auto"``: linear for SGD (Goyal et al. 2017), sqrt for adaptive optimizers."""
    name = type(optimizer).__name__
    defaults = getattr(optimizer, "defaults", {}) or {}
    if name == "SGD":
        return "linear", "SGD, Goyal et al. 2017"
    if "betas" in defaults or name in ("RMSprop", "Adagrad", "Adadelta"):
        return "sqrt", f"{name} is adaptive, Malladi et al. 2022"
    return "sqrt", f"{name} is neither SGD nor Adam-type; sqrt is the cautious choice"


def optimizer_hyperparameters(
    optimizer: Any,
) -> tuple[float | None, tuple[float, float] | None, float | None]:
    """(lr, betas, eps) of the optimizer's first parameter group, each None where it has none."""
    group = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
    lr = group.get("lr")
    betas = group.get("betas")
    eps = group.get("eps")
    return (
        float(lr) if lr is not None else None,
        (float(betas[0]), float(betas[1])) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None,
        float(eps) if isinstance(eps, (int, float)) else None,
    )


def advise(
    workload: Workload,
    *,
    current_batch: int | None = None,
    lr: float | None = None,
    base_batch: int | None = None,
    rule: str = "auto",
    epochs: int | None = None,
    dataset_size: int | None = None,
    world_size: int = 1,
    gain_threshold: float = GAIN_THRESHOLD,
    throughput: str = "auto",
    seconds_per_point: float | None = None,
    rounds: int | None = None,
    device: Any = "auto",
    memory_budget: int | str | None = None,
    max_batch_size: int | None = None,
    noise_steps: int = DEFAULT_NOISE_STEPS,
    noise_batch: int | None = None,
    noise_collector: str = "auto",
    noise_beta: float = DEFAULT_BETA,
    critical_batch: float | None = None,
    progress: Progress | None = None,
) -> Advice:
    """Measure what fits, throughput and the noise scale of ``workload``, then recommend a batch and its LR.

    Args:
        workload: a :class:`~batchlab.Workload` (the noise scale needs its gradients: a plain
            ``step(batch_size)`` callable is refused). Its state is restored after every measurement.
        current_batch: the global batch the run uses now (default: ``base_batch``, else 32); kept unless
            another has more than ``gain_threshold`` more goodput.
        lr: the learning rate tuned at ``base_batch`` (default: the optimizer's first parameter group's).
        base_batch: the batch ``lr`` was tuned at (default: ``current_batch``).
        rule: ``"auto"`` (linear for SGD, sqrt otherwise: :func:`rule_for`) or one of
            :data:`~batchlab.advice.scaling.RULES`.
        epochs, dataset_size: the epoch arithmetic (default dataset size: the workload's); ``dataset_size``
            also caps the batch sizes measured.
        world_size: data-parallel ranks.
        gain_threshold: the goodput gain needed to switch (:data:`batchlab.defaults.GAIN_THRESHOLD`).
        throughput: ``"profile"`` (steady-state timing), ``"probes"`` (the fit search's, rough) or ``"auto"``
            (profile when available).
        seconds_per_point: profile's timed seconds per size (default 0.2); not with ``throughput="probes"``.
        rounds: profile's interleaved timing rounds (:func:`batchlab.profile`; default one window); not with
            ``throughput="probes"``.
        device, memory_budget: as for :func:`~batchlab.find_batch_size`.
        max_batch_size: the largest micro-batch measured (default
            :data:`~batchlab.defaults.MEASURED_MAX_BATCH`, 65,536: larger ones cannot win on goodput and take
            minutes to time); the fit says when it binds.
        noise_steps, noise_batch, noise_collector, noise_beta: as for :func:`~batchlab.measure_noise_scale`
            (default batch: 128, capped by the dataset and what fits).
        critical_batch: a critical batch measured apart (e.g. :func:`batchlab.branch_critical_batch`'s
            ``b_crit``) to use as B_noise in the efficiency instead of the measured B_simple, which is still
            measured and reported (:meth:`Advice.with_critical_batch`).
        progress: told of each phase, probe, timed point and noise step (see :class:`Progress`).

    Returns an :class:`Advice`; ``advice.recommendation`` is the :class:`Recommendation`. Every argument is
    checked before anything runs; ``ValueError`` names the one at fault. A noise scale that comes out undefined
    (and no ``critical_batch``) raises :class:`~batchlab.errors.NoNoiseScaleError`, which keeps the measurements:
    its ``with_critical_batch(n)`` recommends on them.
    """
    started = time.perf_counter()
    work = require_workload(workload, "advise")
    shown = progress if progress is not None else _Silent()
    for name, value in (
        ("current_batch", current_batch),
        ("base_batch", base_batch),
        ("epochs", epochs),
        ("dataset_size", dataset_size),
        ("max_batch_size", max_batch_size),
        ("noise_steps", noise_steps),
        ("world_size", world_size),
    ):
        checks.integer(name, value, none=name not in ("noise_steps", "world_size"))
    checks.integer("noise_batch", noise_batch, minimum=2, none=True)
    check_beta(noise_beta, "noise_beta")
    checks.number("lr", lr, none=True)
    checks.number("gain_threshold", gain_threshold, inclusive=True, what="0.05 = 5%")
    checks.choice("rule", rule, ("auto", *RULES))
    checks.choice("throughput", throughput, THROUGHPUT_SOURCES)
    checks.number("seconds_per_point", seconds_per_point, inclusive=True, none=True)
    if seconds_per_point is not None and throughput == "probes":
        raise ValueError(
            f"seconds_per_point {seconds_per_point:g} times batch sizes for throughput 'profile'; throughput "
            "'probes' reads the fit search's probes and times nothing: drop one of them"
        )
    check_rounds(rounds)
    if critical_batch is not None:
        check_critical_batch(critical_batch)
    if rounds is not None and throughput == "probes":
        raise ValueError(
            f"rounds {rounds!r} times batch sizes for throughput 'profile'; throughput 'probes' reads the fit "
            "search's probes and times nothing: drop one of them"
        )

    opt_lr, betas, eps = optimizer_hyperparameters(work.optimizer)
    lr_from = "the given lr" if lr is not None else f"the workload's {type(work.optimizer).__name__}"
    lr = lr if lr is not None else opt_lr
    if lr is None:
        raise ValueError("the workload's optimizer has no lr; pass lr")
    rule, rule_reason = rule_for(work.optimizer) if rule == "auto" else (rule, "given")
    current = current_batch or base_batch or DEFAULT_CURRENT_BATCH
    data = dataset_size or work.dataset_size
    check_fits_dataset(current, data)
    # the workload's own dataset size already caps fit and profile; the arguments cap them further
    cap = min(c for c in (max_batch_size or MEASURED_MAX_BATCH, dataset_size) if c)
    kind = collector_for(work, noise_collector)  # fails now for an impossible collector

    fit, curve, spread, source, detail = _measure_throughput(
        work,
        throughput,
        device=device,
        memory_budget=memory_budget,
        max_batch_size=cap,
        seconds_per_point=ADVISE_SECONDS_PER_POINT if seconds_per_point is None else seconds_per_point,
        rounds=rounds,
        progress=shown,
    )
    batch = noise_batch_for(work, noise_batch, fit.batch_size)
    shown.phase(f"noise scale, {noise_steps} steps at batch {batch} ({kind} collector)")
    noise_started = time.perf_counter()
    estimate = measure_noise_scale(
        work,
        batch,
        steps=noise_steps,
        collector=kind,
        beta=noise_beta,
        on_step=lambda index, _pair: shown.count("step", index + 1, noise_steps),
    )
    noise_seconds = time.perf_counter() - noise_started
    options = {
        "current_batch": current,
        "lr": lr,
        "base_batch": base_batch or current,
        "rule": rule,
        "max_micro_batch": fit.batch_size,
        "world_size": world_size,
        "dataset_size": data,
        "epochs": epochs,
        "gain_threshold": gain_threshold,
        "betas": betas,
        "eps": eps,
    }
    seconds = time.perf_counter() - started

    measured = {
        "fit": fit,
        "throughput": curve,
        "throughput_spread": spread,
        "throughput_source": source,
        "throughput_detail": detail,
        "noise": estimate,
        "noise_collector": kind,
        "noise_batch": batch,
        "noise_steps": noise_steps,
        "noise_seconds": noise_seconds,
        "lr_from": lr_from,
        "rule_reason": rule_reason,
        "seconds": seconds,
        "options": options,
    }
    if critical_batch is not None:
        return _advice_on(measured, critical_batch)
    if estimate.b_simple is None:
        raise NoNoiseScaleError(
            f"no noise scale to advise with ({estimate.note}); try more noise steps or a larger noise batch, "
            "or give a critical batch measured apart (critical_batch=, --critical-batch N, --branch SIZES)",
            note=estimate.note,
            options=options,
            recommend_with=partial(_advice_on, measured),
        )
    return _advice_on(measured, estimate)


def _advice_on(
    measured: Mapping[str, Any], noise: NoiseScaleEstimate | float, noise_from: str | None = None
) -> Advice:
    """The :class:`Advice` on advise's measurements -- ``measured``: every Advice field but the recommendation --
    with ``noise`` as B_noise: the measured estimate, or a critical batch measured apart (checked; ``noise_from``
    says where it came from, default :data:`CRITICAL_BATCH_GIVEN`).

    One module-level function for advise's own answer and for :class:`~batchlab.errors.NoNoiseScaleError`'s
    later one, so that the error, holding it with the measurements, pickles (a Ray trial, a process pool).
    """
    if not isinstance(noise, NoiseScaleEstimate):
        noise, noise_from = check_critical_batch(noise), noise_from or CRITICAL_BATCH_GIVEN
    rec = recommend(
        measured["throughput"],
        noise,
        throughput_spread=measured["throughput_spread"],
        noise_from=noise_from,
        **measured["options"],
    )
    return Advice(recommendation=rec, **measured)


def step_quantile(device: str) -> float:
    """The quantile of each size's timed steps that advise reads on ``device`` (a device name, e.g. ``"cpu"``):
    :data:`CPU_STEP_QUANTILE` on the CPU, where interference from other work is the dominant noise and only adds
    time; the median (0.5, profile's own reading) elsewhere."""
    return CPU_STEP_QUANTILE if str(device).split(":")[0] == "cpu" else 0.5


def throughput_curve(points: Any, q: float = 0.5) -> dict[int, float]:
    """``{batch: samples/s}`` of each fitting, timed profile point, its step read at quantile ``q`` of its timed
    steps (:func:`~batchlab.profiling.analysis.sample_quantile`); ``q = 0.5`` is the profile's own reading (its
    median step), unchanged."""
    curve = {}
    for p in points:
        if p.fits and p.samples_per_second:
            curve[p.batch_size] = p.samples_per_second
            if q != 0.5 and p.step_times:
                per_step = p.samples_per_second * p.step_seconds  # samples in one step (batch x accumulation)
                curve[p.batch_size] = per_step / sample_quantile(p.step_times, q)
    return curve


def throughput_spread(points: Any, q: float = 0.5) -> dict[int, tuple[float, float]]:
    """``{batch: (low, high)}`` samples/s: the samples of a step over the ~68% confidence interval of quantile
    ``q`` of each fitting profile point's step times (:func:`~batchlab.profiling.analysis.quantile_interval`;
    ``q = 0.5``: the median's).

    The reading (:func:`throughput_curve`) is that quantile of the timed steps (warm-up steps already dropped),
    so the spread is how far it may be off: for the median the full range of the timed steps with 3-5 of them,
    narrower with more. A quantile's interval, not the steps' full range: one step slowed by a busy neighbour
    must not make a real difference between batch sizes look like noise, any more than noise may pass for a
    difference (issue 13, item 6; the full range kept batch 32 on digits in benchmarks/advise_check.py, where
    128 reached the target three times sooner).
    """
    spread = {}
    for p in points:
        if p.fits and p.samples_per_second and p.step_times:
            per_step = p.samples_per_second * p.step_seconds  # samples in one step (batch x accumulation)
            fast, slow = quantile_interval(p.step_times, q)
            spread[p.batch_size] = (per_step / slow, per_step / fast)
    return spread


def _measure_throughput(
    work: Workload,
    source: str,
    *,
    device: Any,
    memory_budget: int | str | None,
    max_batch_size: int | None,
    seconds_per_point: float,
    progress: Progress,
    rounds: int | None = None,
) -> tuple[FitResult, dict[int, float], dict[int, tuple[float, float]] | None, str, str]:
    """(fit, {batch: samples/s}, its spread, source, detail): profile when importable (and asked), else the fit
    probes (no spread: a probe's time covers its steps together)."""
    limits = {"device": device, "memory_budget": memory_budget, "max_batch_size": max_batch_size}
    profile = None
    if source in ("auto", "profile"):
        try:
            from batchlab.profiling.api import profile
        except ImportError as exc:
            if source == "profile" or rounds is not None:
                asked = "throughput 'profile'" if source == "profile" else f"rounds {rounds!r}"
                raise ImportError(f"{asked}: batchlab.profile is not available ({exc})") from None
    if profile is not None:
        progress.phase("what fits (fit search)")
        result = profile(
            work,
            **limits,
            seconds_per_point=seconds_per_point,
            rounds=rounds,
            on_point=progress.point,
            on_probe=progress.variant_probe,
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
        points = [p for p in result.points if p.variant == variant and p.fits and p.samples_per_second]
        q = step_quantile(result.device)
        curve = throughput_curve(points, q)
        reading = "median" if q == 0.5 else f"{q:.0%} quantile (CPU: interference only adds time)"
        windows = max((p.rounds for p in points), default=1)
        pooled = f" pooled over {windows} interleaved rounds" if windows > 1 else ""
        detail = (
            f"batchlab.profile ({variant}): {reading} of timed steps after warm-up{pooled} at {len(curve)} "
            f"sizes, {result.seconds:.1f} s"
        )
        return fit, curve, throughput_spread(points, q), "profile", detail
    progress.phase("what fits and throughput (fit search probes)")
    fit = find_batch_size(work, **limits, on_probe=progress.probe)
    per_step = getattr(work, "grad_accum", 1)
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
    return fit, curve, None, "fit probes", detail
