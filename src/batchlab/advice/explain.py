"""The recommendation's reasoning in plain words: one line per finding, from the numbers it was made of (pure)."""

from __future__ import annotations

import math

from batchlab.advice.goodput import Curve, doubling_step_reduction
from batchlab.advice.records import Candidate, Recommendation
from batchlab.advice.scaling import SDE_BETA_BOUND
from batchlab.defaults import KNEE_THRESHOLD

__all__ = ["explain"]


def _fmt(x: float) -> str:
    """A batch-like number for prose: 192, 1.2e+04."""
    return f"{x:,.0f}" if x < 1e6 else f"{x:.2g}"


def _range_text(best_range: tuple[int, int] | None) -> str:
    if best_range is None:
        return ""
    if best_range[0] == best_range[1]:
        return " (the same with B_noise ± 1 standard error)"
    return f" (with B_noise ± 1 standard error the peak lies at {best_range[0]}..{best_range[1]})"


def _across(noise_se: float | None) -> str:
    """What the gain range spans: the timed steps' spread, and B_noise ± 1 s.e. when B_noise has one."""
    return "across the spread of the timed steps" + (" and B_noise ± 1 standard error" if noise_se else "")


def _gain_text(gain_range: tuple[float, float]) -> str:
    return f"{gain_range[0]:+.0%}..{gain_range[1]:+.0%}"


def explain(rec: Recommendation, curve: Curve, current: Candidate) -> list[str]:
    """The reasoning behind ``rec``, one plain-words line per finding.

    ``curve`` is the measured throughput the recommendation was made from and ``current`` the current
    batch's row of its goodput table (the batch the current one runs as, when it cannot run exactly).
    """
    noise, noise_se, base = rec.noise_scale, rec.noise_scale_stderr, rec.base_batch
    knee, fastest, max_step = rec.knee_batch, rec.max_throughput_batch, rec.max_micro_batch
    best, chosen = rec.candidate(rec.best_batch), rec.candidate(rec.batch_size)
    gain, gain_threshold, switched, gain_range = rec.gain, rec.gain_threshold, rec.switched, rec.gain_range
    plan, lr_scaling, warmup_steps = rec.plan, rec.lr, rec.warmup_steps
    sched, current_sched, best_range = rec.schedule, rec.current_schedule, rec.best_batch_range
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
        what = (
            f"B_noise ≈ {_fmt(noise)}{se}, {rec.noise_from}"
            if rec.noise_from
            else f"gradient noise scale B_noise ≈ {_fmt(noise)}{se} (the critical batch)"
        )
        lines.append(
            f"{what}: past ~{_fmt(noise)} each "
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
        across = f" ({_gain_text(gain_range)} {_across(noise_se)})" if gain_range else ""
        lines.append(
            f"switch from {current.batch_size} to {chosen.batch_size}: {gain:+.0%} goodput{across}, above the "
            f"{gain_threshold:.0%} threshold (Pollux switches only for more); reaches the same result in "
            f"~{1 / (1 + gain):.2f}x the time{steps}"
        )
    elif gain > gain_threshold and gain_range is not None:
        lines.append(
            f"keep batch {current.batch_size}: the best, {best.batch_size}, gains {gain:+.0%} goodput at the "
            f"measured values, but {_gain_text(gain_range)} {_across(noise_se)}: the gain does not hold above the "
            f"{gain_threshold:.0%} threshold, so the difference is inside the measurements' noise"
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
        if lr_scaling.kept_betas:
            kept = [f"{name} kept: k(1 - {name}) = {lr_scaling.k * (1 - beta):.3g}" for name, beta in
                    zip(("beta1", "beta2"), lr_scaling.betas) if name in lr_scaling.kept_betas]  # fmt: skip
            lr_line += (
                f" ({', '.join(kept)} is past {SDE_BETA_BOUND:g}, the bound of the SDE rule's small-k(1 - beta) "
                f"regime: re-tune it or cap the change)"
            )
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
