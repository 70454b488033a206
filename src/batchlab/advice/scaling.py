"""Learning-rate scaling rules, accumulation plans and epoch/iteration arithmetic.

Pure functions over numbers (no torch): what happens to the learning rate when the batch changes by a
factor k, how to reach a global batch with the micro-batches that fit, and how many iterations, optimizer
steps and samples a run really has. Sources are named next to each formula; see DESIGN.md, "The science".
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from batchlab import checks

__all__ = [
    "LRScaling",
    "BatchPlan",
    "Schedule",
    "RULES",
    "scale_lr",
    "plan_batch",
    "schedule",
    "check_noise_scale",
    "SDE_BETA_BOUND",
]

RULES = ("linear", "sqrt", "adascale", "none")

# Goyal et al. 2017, "Accurate, Large Minibatch SGD", §2.2: ramp the LR from lr to k·lr over the first 5 epochs.
LINEAR_WARMUP_EPOCHS = 5.0

# The square-root rule maps 1 - beta -> k(1 - beta) only while k(1 - beta) <= 0.5; past it the beta is kept.
# Why: Malladi et al. 2022 derive the rule as an SDE limit in which 1 - beta shrinks with eta^2 (their
# c = (1 - beta)/eta^2 held fixed), a first-order statement for small k(1 - beta) with no guarantee beyond. The
# mapped beta' = 1 - k(1 - beta) is an EMA whose half-life is ln(1/2)/ln(beta') steps: at beta' = 0.5 it is
# one step, below it the moment forgets half of itself within one step of the new batch -- the rule asks for less
# averaging than a step can express, and at k(1 - beta) >= 1 for none at all (beta' <= 0). Beta1 = 0.9
# passes the bound at k > 5 (beta2 = 0.999 at k > 500). Measured (benchmarks/RESULTS.md, "advise end to end"):
# advised at k = 32, beta1 clamped to 0 and the run never reached the target in 60000 samples, where every fixed
# batch with Adam's beta1 = 0.9 did; keeping beta is the fixed batches' setting. Batch changes with
# k(1 - beta) <= 0.5 (every k <= 5 for Adam's defaults, every shrinking batch) map exactly as before. The bound
# applies per change: a batch ramp's doublings (k = 2) take beta1 0.9 -> 0.8 -> 0.6 and then keep it there.
SDE_BETA_BOUND = 0.5


# ---------------------------------------------------------------------------------------------- validation


def check_noise_scale(value: object) -> float:
    """B_noise as a float in [0, inf]: inf when gradient noise dominates (NaN and non-numbers refused)."""
    return checks.number(
        "noise_scale",
        value,
        inclusive=True,
        allow_inf=True,
        what="B_noise, e.g. GradientNoiseScale.result().b_simple; inf when noise dominates",
    )


def _check_betas(betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    out = []
    for i, b in enumerate(betas, start=1):
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= float(b) < 1.0:
            raise ValueError(f"beta{i} must be a number in [0, 1), got {b!r} (betas={betas!r})")
        out.append(float(b))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------ scale_lr


@dataclass(frozen=True)
class LRScaling:
    """The learning rate (and Adam hyper-parameters) for a new batch size, with the rule that produced it.

    ``factor`` is ``lr / base_lr``; ``k`` is ``new_batch / base_batch``. ``betas``/``eps`` are the values to
    use at the new batch (mapped by the ``sqrt`` rule, passed through unchanged by the others; ``None`` when
    not given); ``kept_betas`` names those the ``sqrt`` rule kept because k(1 - beta) passed
    :data:`SDE_BETA_BOUND` (``notes`` say by how much). ``warmup_epochs`` is the suggested warmup length (0 when
    the rule suggests none).
    """

    rule: str
    base_lr: float
    lr: float
    factor: float
    base_batch: int
    new_batch: int
    k: float
    betas: tuple[float, float] | None
    eps: float | None
    warmup_epochs: float
    noise_scale: float | None
    notes: tuple[str, ...]
    kept_betas: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field (an infinite ``noise_scale`` becomes None; ``notes`` say so)."""
        d = asdict(self)
        d["betas"] = list(self.betas) if self.betas is not None else None
        d["notes"] = list(self.notes)
        d["kept_betas"] = list(self.kept_betas)
        if self.noise_scale is not None and math.isinf(self.noise_scale):
            d["noise_scale"] = None
        return d


def _map_beta(name: str, beta: float, k: float, notes: list[str], kept: list[str]) -> float:
    """Malladi et al. 2022 SDE rule: 1 - beta -> k (1 - beta) while k (1 - beta) <= :data:`SDE_BETA_BOUND`;
    past the bound ``beta`` is kept, ``name`` joins ``kept`` and ``notes`` say why."""
    step = k * (1.0 - beta)  # the mapped 1 - beta: the weight the moment gives each new gradient
    if step > SDE_BETA_BOUND:
        kept.append(name)
        notes.append(
            f"{name} {beta:g} kept: k(1 - {name}) = {k:g}*(1 - {beta:g}) = {step:.3g} is past "
            f"{SDE_BETA_BOUND:g}, the bound of the square-root (SDE) rule, which would map it to "
            f"{max(0.0, 1.0 - step):.3g} (a half-life under one step); re-tune {name} if it matters"
        )
        return beta
    mapped = 1.0 - step
    if mapped >= 1.0:  # only by rounding when k(1 - beta) is below float resolution
        clamped = math.nextafter(1.0, 0.0)
        notes.append(f"{name} {beta:g} maps to {mapped!r} >= 1 by rounding: clamped to {clamped!r}")
        return clamped
    return mapped


def scale_lr(
    lr: float,
    base_batch: int,
    new_batch: int,
    rule: str = "sqrt",
    *,
    noise_scale: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> LRScaling:
    """Scale a learning rate tuned at ``base_batch`` to ``new_batch`` (k = new_batch / base_batch).

    Rules:

    - ``"linear"`` (Goyal et al. 2017, for SGD): lr·k, with a gradual warmup over ~5 epochs when k > 1.
    - ``"sqrt"`` (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", for
      Adam-type optimizers): lr·√k, 1−β₁ → k(1−β₁), 1−β₂ → k(1−β₂), ε → ε/√k. A beta whose k(1−β) passes
      :data:`SDE_BETA_BOUND` (0.5: the rule is derived for small k(1−β)) is kept as it is, named in
      ``kept_betas`` and stated in ``notes``.
    - ``"adascale"`` (Johnson et al. 2020, AdaScale; the gain Pollux uses): lr·r with
      r = (1 + B_noise/B0)/(1 + B_noise/B); needs ``noise_scale`` (a measured B_noise, e.g. B_simple).
      ``noise_scale=inf`` (noise dominates) gives r = k, the linear rule; 0 gives r = 1.
    - ``"none"``: lr unchanged.

    ``betas`` and ``eps`` are optional; when given they are mapped by ``sqrt`` and passed through otherwise.
    Raises ``ValueError`` naming any invalid argument.
    """
    lr_ = checks.number("lr", lr)
    b0 = checks.integer("base_batch", base_batch)
    b1 = checks.integer("new_batch", new_batch)
    checks.choice("rule", rule, RULES)
    betas_ = _check_betas(betas) if betas is not None else None
    eps_ = checks.number("eps", eps, inclusive=True, none=True)
    if noise_scale is not None:
        noise_ = check_noise_scale(noise_scale)
    elif rule == "adascale":
        raise ValueError(
            "rule 'adascale' needs noise_scale (a measured B_noise, e.g. GradientNoiseScale.result().b_simple); "
            "got noise_scale=None"
        )
    else:
        noise_ = None

    k = b1 / b0
    notes: list[str] = []
    kept: list[str] = []
    new_betas, new_eps, warmup = betas_, eps_, 0.0
    if rule == "linear":
        factor = k
        if k > 1:
            warmup = LINEAR_WARMUP_EPOCHS
            notes.append(
                f"linear rule (Goyal et al. 2017): ramp the LR from {lr_:g} to {lr_ * k:g} over the first "
                f"{LINEAR_WARMUP_EPOCHS:g} epochs; the rule is for SGD, prefer 'sqrt' for Adam-type optimizers"
            )
    elif rule == "sqrt":
        factor = math.sqrt(k)
        if betas_ is not None:
            new_betas = (
                _map_beta("beta1", betas_[0], k, notes, kept),
                _map_beta("beta2", betas_[1], k, notes, kept),
            )
        if eps_ is not None:
            new_eps = eps_ / math.sqrt(k)
    elif rule == "adascale":
        assert noise_ is not None
        if math.isinf(noise_):
            factor = k  # limit of (1 + B_noise/B0)/(1 + B_noise/B) as B_noise -> inf
            notes.append(
                "noise_scale is inf (gradient noise dominates): the AdaScale gain equals k, the linear rule"
            )
        else:
            factor = (1.0 + noise_ / b0) / (1.0 + noise_ / b1)
    else:  # "none"
        factor = 1.0
    if noise_ is not None and rule != "adascale":
        notes.append(f"noise_scale is used only by rule 'adascale'; ignored by rule {rule!r}")

    return LRScaling(
        rule=rule,
        base_lr=lr_,
        lr=lr_ * factor,
        factor=factor,
        base_batch=b0,
        new_batch=b1,
        k=k,
        betas=new_betas,
        eps=new_eps,
        warmup_epochs=warmup,
        noise_scale=noise_,
        notes=tuple(notes),
        kept_betas=tuple(kept),
    )


# ---------------------------------------------------------------------------------------------- plan_batch


@dataclass(frozen=True)
class BatchPlan:
    """How to run a global batch: ``micro_batch`` per forward/backward, ``accumulation_steps`` per optimizer
    step, on ``world_size`` ranks. ``effective_batch = micro_batch * accumulation_steps * world_size``;
    ``difference = effective_batch - target_global_batch`` (0 when ``exact``)."""

    target_global_batch: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    effective_batch: int
    per_rank_batch: int
    difference: int
    exact: bool
    note: str

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field."""
        return asdict(self)


def _split(per_rank: int, max_micro: int) -> tuple[int, int]:
    """(micro, accum) with micro * accum == per_rank, micro <= max_micro and the fewest accumulation steps."""
    accum = -(-per_rank // max_micro)  # ceil: the fewest steps any split can have
    while per_rank % accum:
        accum += 1  # terminates at accum == per_rank (micro 1)
    return per_rank // accum, accum


def plan_batch(target_global_batch: int, max_micro_batch: int, world_size: int = 1) -> BatchPlan:
    """Plan micro-batch size and accumulation steps to reach ``target_global_batch`` on ``world_size`` ranks.

    The micro batch never exceeds ``max_micro_batch`` (the largest that fits, e.g. from the memory search).
    When ``world_size`` divides the target the plan is exact, with the fewest accumulation steps among exact
    plans (so the largest micro batch that divides the per-rank batch). Otherwise the effective batch is the
    nearest multiple of ``world_size`` (the smaller one on a tie; at least ``world_size``), and ``difference``
    and ``note`` say by how much it misses. When an exact split needs more accumulation steps than the memory
    limit forces (e.g. a prime per-rank batch), ``note`` also names the nearest fuller split.
    """
    target = checks.integer("target_global_batch", target_global_batch)
    max_micro = checks.integer("max_micro_batch", max_micro_batch)
    world = checks.integer("world_size", world_size)

    if target % world == 0:
        per_rank = target // world
    else:
        lo, hi = target // world, target // world + 1
        per_rank = hi if lo == 0 or (target - lo * world) > (hi * world - target) else lo
    micro, accum = _split(per_rank, max_micro)
    effective = micro * accum * world
    difference = effective - target
    ranks = f" × {world} ranks" if world > 1 else ""
    recipe = (
        f"{micro} per micro-batch × {accum} accumulation step{'s' if accum > 1 else ''}{ranks} = {effective}"
    )
    if difference == 0:
        note = f"exact: {recipe}"
    else:
        note = (
            f"{target} is not a multiple of world size {world}: the nearest achievable global batch is "
            f"{recipe}, {abs(difference)} {'more' if difference > 0 else 'fewer'} than asked"
        )
    fewest = -(-per_rank // max_micro)
    if accum > fewest:
        alt_micro = min(max_micro, round(per_rank / fewest))
        alt = alt_micro * fewest * world
        note += (
            f"; an exact split of {per_rank} per rank needs {accum} accumulation steps of {micro}, while "
            f"{fewest} step{'s' if fewest > 1 else ''} of {alt_micro} would give {alt} ({alt - target:+d})"
        )
    return BatchPlan(
        target_global_batch=target,
        micro_batch=micro,
        accumulation_steps=accum,
        world_size=world,
        effective_batch=effective,
        per_rank_batch=per_rank,
        difference=difference,
        exact=difference == 0,
        note=note,
    )


# ------------------------------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class Schedule:
    """Epoch/iteration arithmetic of one run (see :func:`schedule` for the counting convention).

    ``iterations_per_epoch`` counts micro-batches per rank; ``steps_per_epoch`` counts optimizer steps;
    ``samples_per_epoch`` counts samples processed on all ranks together, including the duplicates
    DistributedSampler adds as padding (``padded_samples``); ``dropped_samples`` were never seen.
    """

    dataset_size: int
    batch_size: int
    epochs: int
    accumulation: int
    world_size: int
    drop_last: bool
    global_batch: int
    samples_per_rank: int
    iterations_per_epoch: int
    last_batch_size: int
    steps_per_epoch: int
    last_step_micro_batches: int
    total_iterations: int
    total_steps: int
    samples_per_epoch: int
    total_samples: int
    padded_samples: int
    dropped_samples: int
    note: str

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field."""
        return asdict(self)


def schedule(
    dataset_size: int,
    batch_size: int,
    epochs: int,
    accumulation: int = 1,
    world_size: int = 1,
    drop_last: bool = False,
) -> Schedule:
    """Count iterations, optimizer steps and samples the way PyTorch's DataLoader + DistributedSampler do.

    Convention (one ``drop_last`` flag for both, as most scripts pass the same value to each):

    - Each rank gets ``ceil(dataset_size / world_size)`` samples per epoch; DistributedSampler pads by
      repeating samples so every rank has as many. With ``drop_last`` it gets ``floor(dataset_size /
      world_size)`` instead and the tail is dropped. (``world_size=1`` is a plain DataLoader.)
    - ``batch_size`` is the per-rank micro batch (the DataLoader's). Iterations per epoch per rank are
      ``ceil(samples_per_rank / batch_size)``, or ``floor`` with ``drop_last`` (the DataLoader's ``len``).
    - An optimizer step follows every ``accumulation`` micro-batches, and the last, partial group of an epoch
      still steps (``ceil(iterations / accumulation)`` steps), as loops that step on
      ``(i + 1) % accumulation == 0 or i == last`` do; accumulation restarts at each epoch.

    ``batch_size`` larger than a rank's share of the data gives one short batch per epoch without
    ``drop_last``; with ``drop_last`` every batch would be dropped and no step would ever run, so that raises
    ``ValueError`` rather than returning a silent zero. Invalid arguments raise ``ValueError`` naming them.
    """
    n = checks.integer("dataset_size", dataset_size)
    b = checks.integer("batch_size", batch_size)
    e = checks.integer("epochs", epochs)
    a = checks.integer("accumulation", accumulation)
    w = checks.integer("world_size", world_size)
    checks.flag("drop_last", drop_last)

    per_rank = n // w if drop_last else -(-n // w)
    iters = per_rank // b if drop_last else -(-per_rank // b)
    if iters == 0:
        raise ValueError(
            f"batch_size {b} with drop_last=True is larger than the {per_rank} samples each rank gets per epoch "
            f"(dataset_size {n} / world_size {w}): every batch would be dropped and no step would run; "
            f"use drop_last=False or batch_size <= {per_rank}"
            if per_rank
            else f"dataset_size {n} is smaller than world_size {w}: with drop_last=True no rank gets a sample"
        )
    last_batch = b if drop_last else per_rank - (iters - 1) * b
    steps = -(-iters // a)
    last_group = iters - (steps - 1) * a
    seen_per_rank = (iters - 1) * b + last_batch
    samples = seen_per_rank * w
    padded = max(0, per_rank * w - n)
    dropped = n - min(n, samples)

    notes = []
    if padded:
        notes.append(
            f"DistributedSampler repeats {padded} sample(s) per epoch so {w} ranks get {per_rank} each"
        )
    if dropped:
        notes.append(f"{dropped} sample(s) per epoch are dropped (drop_last=True)")
    if last_batch != b:
        notes.append(f"the last micro-batch of each epoch has {last_batch} of {b} samples")
    if last_group != a:
        notes.append(
            f"the last optimizer step of each epoch accumulates {last_group} of {a} micro-batches "
            f"(a smaller effective batch)"
        )
    if b > per_rank:
        notes.append(f"batch_size {b} exceeds the {per_rank} samples per rank: one short batch per epoch")
    return Schedule(
        dataset_size=n,
        batch_size=b,
        epochs=e,
        accumulation=a,
        world_size=w,
        drop_last=drop_last,
        global_batch=b * a * w,
        samples_per_rank=per_rank,
        iterations_per_epoch=iters,
        last_batch_size=last_batch,
        steps_per_epoch=steps,
        last_step_micro_batches=last_group,
        total_iterations=iters * e,
        total_steps=steps * e,
        samples_per_epoch=samples,
        total_samples=samples * e,
        padded_samples=padded,
        dropped_samples=dropped,
        note="; ".join(notes) if notes else "every epoch divides evenly",
    )
