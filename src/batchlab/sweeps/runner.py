"""One run of a sweep: the training loop that times every step, evaluates on a schedule and records it all.

:func:`execute_run` is the same function for every backend (the local loop and each Ray Tune trial): it
builds a fresh run from the factory, trains it until its budget is spent, the target is reached (with
``stop_at_target``) or the loss stops being finite, and returns its :class:`~batchlab.sweeps.records.SweepRun`.
Evaluations follow a schedule -- before the first step, densely early (large batches often reach a target
within the first regular interval), then every ``eval_every`` steps -- and each point carries its step,
samples and training seconds, evaluation excluded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from batchlab.defaults import WARMUP_STEPS
from batchlab.devices import resolve_device
from batchlab.sweeps.records import (
    Curve,
    RunSpec,
    RunStatus,
    StopReason,
    SweepConfig,
    SweepRun,
    target_fields,
)
from batchlab.sweeps.trainable import close_run

__all__ = ["execute_run", "EVAL_POINTS", "EVAL_EVERY_UNKNOWN", "EARLY_EVAL_RATIO"]

EVAL_POINTS = 50  # default evaluations per run when the budget gives a step count (one every budget/50 steps)
EVAL_EVERY_UNKNOWN = 10  # ... and every 10 steps when it does not (a budget in seconds only)
EARLY_EVAL_RATIO = 1.3  # before the first regular evaluation, also evaluate at steps ceil(1.3^k): 1, 2, 3,
# 4, 5, 7, 9, 11, 14, ... -- large batches often reach a target within the first regular interval


def _early_evals(every: int) -> set[int]:
    """The steps ceil(1.3^k) below ``every``: the dense evaluations before the first regular one."""
    steps, k = set(), 0
    while True:
        s = math.ceil(EARLY_EVAL_RATIO**k)
        if s >= every:
            return steps
        steps.add(s)
        k += 1


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (a diverged loss, a metric that is not a number)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _noise_estimate(trainable: Any) -> Any:
    """The run's noise-scale estimate so far (None for a trainable that does not measure it)."""
    return trainable.noise_scale() if hasattr(trainable, "noise_scale") else None


def _b_simple(estimate: Any) -> float | None:
    return None if estimate is None else _finite(estimate.b_simple)


def execute_run(
    factory: Callable[[int, float, int], Any],
    spec: RunSpec,
    config: SweepConfig,
    on_step: Callable[[int, int | None], None] | None = None,
) -> SweepRun:
    """Train one run of ``config`` (the same function for every backend) and return its record.

    Each step is timed alone (``train_step`` returns a float, a device sync; CUDA is synchronised after it
    too), so training seconds exclude evaluation and throughput can leave out warm-up and noise-measurement
    steps. The whole loop runs inside ``Device.run``: its peak memory is the run's, and an out-of-memory error
    ends the run as ``status="oom"`` while any other exception propagates unchanged. A trainable with
    ``step_metrics()`` (a batch ramp, :class:`~batchlab.sweeps.ramped_run.RampedRun`) has its ``batch_size``
    read before each step, for the samples, and the values it returns recorded in the training curve.
    """
    started = time.time()
    trainable = factory(spec.batch_size, spec.lr, spec.seed)
    batch = int(getattr(trainable, "batch_size", spec.batch_size))
    if batch != spec.batch_size:
        raise ValueError(f"the factory built a run with batch_size {batch}, asked for {spec.batch_size}")
    model_device = getattr(trainable, "device", None)
    # A run trains at training's speed: on the CPU the exact readings' allocator cost 1.2-1.7x.
    device = resolve_device(
        "auto", model_device if isinstance(model_device, torch.device) else torch.device("cpu")
    ).for_training()
    is_cuda = isinstance(model_device, torch.device) and model_device.type == "cuda"
    budget, target = config.budget, config.target
    max_steps = budget.max_steps(batch)
    every = config.eval_every or (max(1, max_steps // EVAL_POINTS) if max_steps else EVAL_EVERY_UNKNOWN)
    early = _early_evals(every)
    train, val, updates = Curve(), Curve(), Curve()
    step_metrics = getattr(trainable, "step_metrics", None)
    step_metrics = step_metrics if callable(step_metrics) else None
    state: dict[str, Any] = {"step": 0, "samples": 0, "seconds": 0.0, "stopped_by": None}
    timed = {"samples": 0, "seconds": 0.0}

    def evaluate() -> None:
        metrics = {name: _finite(value) for name, value in dict(trainable.evaluate()).items()}
        if "loss" not in metrics:
            raise ValueError("evaluate() must return a mapping with a 'loss' key")
        if target is not None and target.metric not in metrics:  # else the target could never be reached
            raise ValueError(
                f"the target's metric {target.metric!r} is not among the metrics evaluate() returns "
                f"({', '.join(sorted(metrics))}): aim at one of them, or return {target.metric!r} too"
            )
        val.add(
            state["step"],
            state["samples"],
            state["seconds"],
            noise_scale=_b_simple(_noise_estimate(trainable)),
            **metrics,
        )
        if target is not None and target.reached(metrics.get(target.metric)):
            state["reached"] = True
        if metrics["loss"] is None:
            state["stopped_by"] = StopReason.DIVERGED

    def loop(_: int) -> None:
        evaluate()
        if is_cuda:
            torch.cuda.synchronize(model_device)
        while state["stopped_by"] is None:
            # A trainable with step_metrics (a batch ramp) may change its batch between steps: read it each time.
            size = int(trainable.batch_size) if step_metrics is not None else batch
            t0 = time.perf_counter()
            loss = _finite(trainable.train_step())
            if is_cuda:
                torch.cuda.synchronize(model_device)  # the step's kernels belong to its time
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["samples"] += size
            state["seconds"] += dt
            step = state["step"]
            if step > WARMUP_STEPS and not getattr(trainable, "last_step_measured_noise", False):
                timed["samples"] += size
                timed["seconds"] += dt
            extra = dict(step_metrics()) if step_metrics is not None else {}
            train.add(step, state["samples"], state["seconds"], loss=loss, **extra)
            pair = getattr(trainable, "last_noise", None)
            if pair is not None:
                updates.add(step, state["samples"], state["seconds"], g2=pair[0], trace=pair[1])
            if loss is None:
                state["stopped_by"] = StopReason.DIVERGED
            spent = budget.spent(step, state["samples"], state["seconds"])
            if spent or step % every == 0 or step in early:
                if state["stopped_by"] is None:
                    evaluate()
                if spent and state["stopped_by"] is None:
                    state["stopped_by"] = spent
                if config.stop_at_target and state.get("reached") and state["stopped_by"] is None:
                    state["stopped_by"] = StopReason.TARGET
            if on_step is not None:
                on_step(step, max_steps)

    try:
        measurement = device.run(loop, batch, steps=1)
    finally:
        close_run(trainable)
    status, stopped_by, error = RunStatus.FINISHED, state["stopped_by"], None
    if not measurement.ok:
        status, stopped_by = RunStatus.OOM, StopReason.OOM
        error = f"out of memory at step {state['step'] + 1}: {measurement.error}"
    elif stopped_by is StopReason.DIVERGED:
        status = RunStatus.DIVERGED

    final = {name: column[-1] for name, column in val.values.items() if name != "noise_scale" and column}
    losses = [v for v in val.values.get("loss", []) if v is not None]
    estimate = _noise_estimate(trainable)
    return SweepRun(
        key=spec.key,
        workload=config.workload,
        batch_size=batch,
        seed=spec.seed,
        lr=spec.lr,
        base_lr=config.lr,
        base_batch=config.effective_base_batch,
        rule=config.rule,
        lr_multiplier=spec.lr_multiplier,
        accumulation=int(getattr(trainable, "accumulation", 1)),
        precision=str(getattr(trainable, "precision", "fp32")),
        device=str(model_device) if model_device is not None else "cpu",
        status=status,
        stopped_by=stopped_by or StopReason.STEPS,
        steps=state["step"],
        samples=state["samples"],
        train_seconds=state["seconds"],
        wall_seconds=time.time() - started,
        throughput=(timed["samples"] / timed["seconds"])
        if timed["seconds"] > 0
        else (state["samples"] / state["seconds"] if state["seconds"] > 0 else None),
        peak_bytes=measurement.peak_bytes,
        baseline_bytes=measurement.baseline_bytes,
        noise_scale=_b_simple(estimate),
        final_val=final,
        best_val_loss=min(losses) if losses else None,
        train=train,
        val=val,
        noise=estimate.to_dict() if estimate is not None else None,
        noise_updates=updates,
        error=error,
        started_at=started,
        **target_fields(val, updates, target),
        finished_at=time.time(),
    )
