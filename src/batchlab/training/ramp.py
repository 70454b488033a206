"""BatchRamp: grow the global batch during training toward the measured noise scale, hyper-parameters carried.

The critical batch starts near zero and grows (McCandlish et al. 2018; Merrill et al. 2025). The ramp
measures the gradient noise scale B_simple for free from the accumulation micro-batches of each step
(:class:`batchlab.noise.AccumulationCollector`, so every step has at least two), and when the estimate says so
(:class:`batchlab.advice.ramp.RampRule`: the lower bound mean − 1 s.e. clears the next size for 3 consecutive
steps) it moves to a larger global batch -- bounded by ``max_batch``, rounded to whole micro-batches of at most
``max_micro_batch`` -- through :func:`batchlab.training.carry_over` (LR, betas, eps, weight decay; the
accumulation). It never shrinks. A plain loop::

    ramp = BatchRamp(optimizer, batch_size=32, max_batch=1024, max_micro_batch=128)
    while training:
        for _ in range(ramp.accumulation):                       # what batch and accumulation now
            x, y = next_samples(ramp.micro_batch)
            (loss_fn(model(x), y) / ramp.accumulation).backward()
        optimizer.step(); optimizer.zero_grad()
        event = ramp.step()                                       # takes this step's gradients; may grow
    ramp.close()

A change is all or nothing: if carrying the hyper-parameters or the ``on_change`` callback (where a framework
changes its accumulation) raises, the optimizer, its schedulers and the ramp are put back to the last good
batch and LR before the error propagates, and training can go on there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchlab import checks
from batchlab.advice.ramp import (
    DEFAULT_GROWTH,
    DEFAULT_MIN_UPDATES,
    DEFAULT_PATIENCE,
    DEFAULT_Z,
    MIN_ACCUMULATION,
    RampReading,
    RampRule,
    ramp_sizes,
)
from batchlab.advice.scaling import RULES, BatchPlan, plan_batch
from batchlab.advice.transfer import KEEPABLE, optimizer_rule
from batchlab.noise.collectors import AccumulationCollector, NormPair
from batchlab.noise.estimator import GradientNoiseScale, NoiseScaleEstimate, check_beta
from batchlab.training.carry import carry_over, hyperparameter_snapshot, optimizer_name, unwrap_optimizer

log = logging.getLogger("batchlab")

__all__ = ["BatchRamp", "RampEvent", "RAMP_BETA", "check_ramp_settings"]

# The ramp's EMA decay: a ~20-update window. B_simple rises as training goes on and the default 0.99 (~100
# updates) lags a short run's rise by its whole window; the lower bound (mean - 1 s.e.) pays for the noise.
RAMP_BETA = 0.95


@dataclass(frozen=True)
class RampEvent:
    """One change of the global batch, after optimizer step ``step``: the batch, split and LR (group 0) before
    and after, the reading that triggered it, and the full audit (``carry``, a CarryOver's dict)."""

    step: int
    batch_before: int
    batch_after: int
    micro_batch: int
    accumulation: int
    lr_before: float
    lr_after: float
    b_simple: float | None
    b_simple_stderr: float | None
    carry: dict[str, Any]

    def message(self) -> str:
        return (
            f"batch ramp at step {self.step}: batch {self.batch_before} -> {self.batch_after} "
            f"({self.micro_batch} x {self.accumulation}), lr {self.lr_before:.4g} -> {self.lr_after:.4g} "
            f"(B_simple {self.b_simple:.4g} +- {self.b_simple_stderr:.2g})"
            if self.b_simple is not None and self.b_simple_stderr is not None
            else f"batch ramp at step {self.step}: batch {self.batch_before} -> {self.batch_after}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_ramp_settings(
    *,
    max_batch: int,
    rule: str | None = None,
    target: float = 1.0,
    growth: float = DEFAULT_GROWTH,
    patience: int = DEFAULT_PATIENCE,
    z: float = DEFAULT_Z,
    min_updates: int = DEFAULT_MIN_UPDATES,
    min_accumulation: int = MIN_ACCUMULATION,
    beta: float = RAMP_BETA,
    keep: Sequence[str] = (),
    measure_every: int = 1,
) -> None:
    """Check a ramp's settings that do not depend on its run (the start batch, the optimizer) or its micro-batch
    (the Lightning callback reads that from the dataloader at train start), each with a one-line error naming
    the value. :class:`BatchRamp` runs it on construction, and :class:`batchlab.sweeps.RampFactory` and the
    Lightning callback when they are made, so a bad ramp fails before any training (a sweep's: before the fixed
    batches it is compared with)."""
    checks.integer("max_batch", max_batch)
    checks.integer("min_accumulation", min_accumulation, minimum=2)
    checks.number("growth", growth, minimum=1.0)
    RampRule.check_settings(target=target, patience=patience, z=z, min_updates=min_updates)
    if rule is not None:
        checks.choice("rule", rule, RULES)
    check_beta(beta)
    for key in keep:
        checks.choice("keep entry", key, KEEPABLE)
    checks.integer("measure_every", measure_every)


def start_sizes(
    batch_size: int, max_batch: int, max_micro_batch: int, *, growth: float = DEFAULT_GROWTH,
    min_accumulation: int = MIN_ACCUMULATION,
) -> tuple[int, ...]:  # fmt: skip
    """The batches a ramp starting at ``batch_size`` may take (:func:`~batchlab.advice.ramp.ramp_sizes`), or a
    one-line error for a start the ramp cannot run: under ``min_accumulation`` samples, or above ``max_batch``.
    :class:`BatchRamp` checks its start with it, and a ramped sweep every start before any run trains."""
    start = checks.integer("batch_size", batch_size)
    if start < min_accumulation:
        raise ValueError(
            f"invalid batch_size {start}: a step needs at least {min_accumulation} micro-batches of "
            "one sample to measure the noise scale"
        )
    return ramp_sizes(start, max_batch, max_micro_batch, growth=growth, min_accumulation=min_accumulation)


def _lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


class BatchRamp:
    """A batch that grows with the measured noise scale (module docstring).

    Args:
        optimizer: the torch optimizer (or a wrapper with ``.optimizer``); its type picks the carry rule.
        params: the parameters whose gradients measure the noise (default: the optimizer's).
        batch_size: the global batch to start from (at least ``min_accumulation`` samples).
        max_batch: never grow past this (rounded down to whole micro-batches); below ``batch_size`` is an error.
        max_micro_batch: the largest micro-batch that fits (e.g. :func:`batchlab.find_batch_size`'s answer).
        rule: the LR rule, overriding the optimizer's (required for an optimizer the rules do not know).
        target: grow toward ``target x B_simple`` (a positive number; 1.0 is B_simple). The value that paid
            off differed tenfold between data sets (benchmarks/RESULTS.md, "The ramp's target swept ..."):
            1.5-2 on digits, 0.2 on a char-LM, none of 0.1-2 on MNIST-1D; sweep it as you would a batch. A
            ramp beats every fixed batch only where the critical batch grows during training; on MNIST-1D it
            does not, and the ramps land on or above the fixed batches' curve ("Why MNIST-1D has no working ramp").
        growth, patience, z, min_updates: the sizes and the hysteresis (:mod:`batchlab.advice.ramp`).
        min_accumulation: micro-batches per step, at least 2 so every step measures the noise scale. 4 read it
            sharply enough to narrow the working targets to 1.5-2 on digits (1-2 on held-out seeds) and 0.2 on
            the char-LM (0.2 on six seeds, 0.5 on four of six); 8 did worse on both, and none rescued MNIST-1D
            (benchmarks/RESULTS.md, "The ramp's reading from more micro-batches", "The char-LM ramp on two more
            held-out seeds"). More micro-batches are smaller ones, which cost GPU wall time.
        beta: the noise tracker's EMA decay (:data:`RAMP_BETA`); ``tracker`` replaces the tracker.
        schedulers: LR schedulers whose ``base_lrs`` follow the LR.
        scaler: a GradScaler whose scale the collector divides out.
        measure_every: measure the noise scale on one optimizer step in this many (the collector's ``every``:
            the steps in between carry no hooks and cost nothing; patience counts measured steps only).
        keep: hyper-parameters each change leaves as they are (e.g. ``("betas",)``), see ``carry_over``.
        on_change: called with each :class:`RampEvent` inside the change (an error there undoes it).

    ``batch_size``, ``micro_batch``, ``accumulation``: what to run now; ``events``: every change; ``reading``:
    the last reading (:class:`~batchlab.advice.ramp.RampReading`); ``last_pair``: the last step's norms;
    ``steps``: optimizer steps seen.
    """

    def __init__(
        self,
        optimizer: Any,
        params: Iterable[torch.Tensor] | None = None,
        *,
        batch_size: int,
        max_batch: int,
        max_micro_batch: int,
        rule: str | None = None,
        target: float = 1.0,
        growth: float = DEFAULT_GROWTH,
        patience: int = DEFAULT_PATIENCE,
        z: float = DEFAULT_Z,
        min_updates: int = DEFAULT_MIN_UPDATES,
        min_accumulation: int = MIN_ACCUMULATION,
        beta: float = RAMP_BETA,
        tracker: GradientNoiseScale | None = None,
        schedulers: Sequence[Any] = (),
        scaler: Any = None,
        keep: Sequence[str] = (),
        on_change: Callable[[RampEvent], Any] | None = None,
        measure_every: int = 1,
    ) -> None:
        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"BatchRamp needs a torch optimizer, got {type(optimizer).__name__}")
        optimizer_rule(optimizer_name(opt), rule)  # an unknown optimizer fails here, before training
        check_ramp_settings(max_batch=max_batch, rule=rule, target=target, growth=growth, patience=patience, z=z,
                            min_updates=min_updates, min_accumulation=min_accumulation, beta=beta, keep=keep,
                            measure_every=measure_every)  # fmt: skip
        self.keep = tuple(keep)
        self.max_micro_batch = checks.integer("max_micro_batch", max_micro_batch)
        self.min_accumulation = min_accumulation
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable as on_change(event), got {on_change!r}")
        sizes = start_sizes(
            batch_size, max_batch, self.max_micro_batch, growth=growth, min_accumulation=self.min_accumulation
        )
        start = sizes[0]
        self.rule = RampRule(sizes, target=target, patience=patience, z=z, min_updates=min_updates)
        self.optimizer = opt
        self.lr_rule = rule
        self.schedulers = tuple(schedulers)
        self.on_change = on_change
        self.plan = self._plan(start)
        self.tracker = tracker if tracker is not None else GradientNoiseScale(beta)
        params = list(params) if params is not None else [p for g in opt.param_groups for p in g["params"]]
        self.collector = AccumulationCollector(
            params,
            self.plan.micro_batch,
            self.tracker,
            scaler=scaler,
            every=measure_every,
        )
        self.events: list[RampEvent] = []
        self.reading: RampReading | None = None
        self.last_pair: NormPair | None = (
            None  # the last step's squared norms (None: fewer than 2 micro-batches)
        )
        self.steps = 0

    def _plan(self, batch: int) -> BatchPlan:
        micro = min(self.max_micro_batch, batch // self.min_accumulation)
        return plan_batch(batch, micro)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every global batch the ramp may take, from the start to the maximum."""
        return self.rule.sizes

    @property
    def batch_size(self) -> int:
        """The global batch of the next step."""
        return self.plan.effective_batch

    @property
    def micro_batch(self) -> int:
        return self.plan.micro_batch

    @property
    def accumulation(self) -> int:
        return self.plan.accumulation_steps

    @property
    def lr(self) -> float:
        """The first param group's LR now."""
        return _lr(self.optimizer)

    def estimate(self) -> NoiseScaleEstimate:
        """The running noise-scale estimate."""
        return self.tracker.result()

    def observe(self) -> int | None:
        """Take the step's gradients (the micro-batches since the last call) into the estimate; return the batch
        to grow to now, or None. Call once per optimizer step, after its last backward. A step that brought no
        new measurement (left out by ``measure_every``, one micro-batch, or non-finite norms) is not a reading:
        the same estimate folded in twice would count toward the patience without new evidence."""
        self.last_pair = self.collector.step(self.micro_batch)
        self.steps += 1
        if self.last_pair is None or not self.last_pair.accepted:
            return None
        est = self.tracker.result()
        self.reading = self.rule.observe(est.b_simple, est.b_simple_stderr, est.updates)
        return self.reading.grow_to

    def apply(self, new_batch: int) -> RampEvent:
        """Move to ``new_batch`` (one of :attr:`sizes` above the current one): carry the hyper-parameters, plan
        the split, call ``on_change``. All or nothing: on any error the last good batch and LR stay."""
        if new_batch not in self.rule.sizes or new_batch <= self.batch_size:
            raise ValueError(
                f"invalid new_batch {new_batch!r}: expected one of {self.sizes} above {self.batch_size}"
            )
        old_plan, old_batch, lr_before = self.plan, self.batch_size, self.lr
        plan = self._plan(new_batch)
        restore = hyperparameter_snapshot(self.optimizer, self.schedulers)
        est = self.tracker.result()
        try:
            carry = carry_over(
                self.optimizer,
                old_batch,
                plan.effective_batch,
                rule=self.lr_rule,
                schedulers=self.schedulers,
                keep=self.keep,
            )
            event = RampEvent(self.steps, old_batch, plan.effective_batch, plan.micro_batch,
                              plan.accumulation_steps, lr_before, self.lr, est.b_simple, est.b_simple_stderr,
                              carry.to_dict())  # fmt: skip
            self.plan = plan
            if self.on_change is not None:
                self.on_change(event)
        except BaseException:
            restore()
            self.plan = old_plan
            raise
        self.rule.moved(new_batch)
        self.events.append(event)
        log.info("%s", event.message())
        return event

    def step(self) -> RampEvent | None:
        """:meth:`observe` then, when it says so, :meth:`apply`: call after each optimizer step (a plain loop)."""
        grow_to = self.observe()
        return self.apply(grow_to) if grow_to is not None else None

    def close(self) -> None:
        """Remove the collector's hooks (the estimate and the events stay)."""
        self.collector.close()

    def __enter__(self) -> BatchRamp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
