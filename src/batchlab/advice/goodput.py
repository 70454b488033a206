"""Goodput math: statistical efficiency, goodput and steps to a result over a throughput curve (pure numbers).

Memory decides which batch sizes are *possible*; throughput says how many samples a second each one processes;
the gradient noise scale says how much each sample is worth. Pollux (Qiao et al. 2021, OSDI; AdaptDL)
multiplies the two:

- statistical efficiency ``E(B) = (B_noise + B0)/(B_noise + B)`` -- the progress per sample at batch B relative
  to batch B0, from McCandlish et al. 2018 (steps ``S = S_min(1 + B_noise/B)``, samples
  ``E = E_min(1 + B/B_noise)``);
- goodput ``G(B) = throughput(B) x E(B)`` -- progress per second; the best batch maximises it.

A throughput curve is ``{batch_size: samples/s}`` or ``(batch_size, samples/s)`` pairs; between measured
sizes it is interpolated linearly in log(batch) vs log(samples/s) (a power law between neighbours) and never
extrapolated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from batchlab import checks
from batchlab.advice.scaling import check_noise_scale

__all__ = [
    "Curve",
    "parse_curve",
    "statistical_efficiency",
    "goodput",
    "steps_factor",
    "doubling_step_reduction",
    "interpolate_throughput",
    "candidate_batch_sizes",
    "parse_spread",
    "goodput_ratio_range",
    "CANDIDATES",
]

# Pollux/AdaptDL evaluate goodput at ~50 geometrically spaced batch sizes: dense enough that neighbours
# differ by a few percent over a 1..10^4 range, cheap enough to print.
CANDIDATES = 50

Curve = tuple[tuple[int, float], ...]  # (batch size, samples/s), sorted by batch size, each size once


def parse_curve(throughput: Any) -> Curve:
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
        size = checks.integer("throughput batch size", b)
        if size in curve:
            raise ValueError(f"throughput lists batch size {b} twice")
        curve[size] = checks.number(f"throughput[{size}]", speed, what="samples/s")
    return tuple(sorted(curve.items()))


def parse_spread(spread: Any, curve: Curve) -> tuple[Curve, Curve] | None:
    """``{b: (low, high)}`` samples/s at measured sizes -> (low curve, high curve) over every size of ``curve``.

    The spread of a measured size is the range its timed steps span (e.g. ``batch / max(step times)`` ..
    ``batch / min(step times)``); it must contain the size's own reading. A size without one is taken as
    exact (low = high = its reading). None in, None out.
    """
    if spread is None:
        return None
    if not isinstance(spread, Mapping):
        raise ValueError(
            f"throughput_spread must be {{batch_size: (low, high) samples/s}}, got {type(spread).__name__}"
        )
    speeds = dict(curve)
    bounds = {b: (v, v) for b, v in curve}
    for b, pair in spread.items():
        if b not in speeds:
            raise ValueError(f"throughput_spread has batch size {b!r}, which the throughput curve does not")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"throughput_spread[{b}] must be (low, high) samples/s, got {pair!r}")
        low = checks.number(f"throughput_spread[{b}] low", pair[0], what="samples/s")
        high = checks.number(f"throughput_spread[{b}] high", pair[1], what="samples/s")
        if not low <= speeds[b] <= high:
            raise ValueError(
                f"throughput_spread[{b}] = ({low:g}, {high:g}) does not contain the reading {speeds[b]:g} samples/s"
            )
        bounds[b] = (low, high)
    return tuple((b, lo) for b, (lo, _) in sorted(bounds.items())), tuple(
        (b, hi) for b, (_, hi) in sorted(bounds.items())
    )


def goodput_ratio_range(
    speeds: tuple[tuple[float, float], tuple[float, float]],
    batches: tuple[float, float],
    noise_range: tuple[float, float],
    base_batch: float,
) -> tuple[float, float]:
    """(lowest, highest) goodput ratio of batch ``batches[0]`` over ``batches[1]``.

    ``speeds`` holds each batch's (low, high) samples/s; ``noise_range`` B_noise's (low, high) (e.g. ± 1
    standard error). The efficiency ratio (B_noise + B1)/(B_noise + B0) is monotone in B_noise, so its extremes
    lie at the ends of ``noise_range``; the throughput ratio's at opposite ends of the two spreads. Issue 13,
    item 6: a switch is advised only when even the lowest ratio clears the threshold.
    """
    (lo_a, hi_a), (lo_b, hi_b) = speeds
    a, b = batches
    ratios = [
        statistical_efficiency(a, noise, base_batch) / statistical_efficiency(b, noise, base_batch)
        for noise in noise_range
    ]
    return lo_a / hi_b * min(ratios), hi_a / lo_b * max(ratios)


def statistical_efficiency(batch_size: float, noise_scale: float, base_batch: float) -> float:
    """Progress per sample at ``batch_size`` relative to ``base_batch``: ``(B_noise + B0)/(B_noise + B)``.

    Pollux's efficiency (Qiao et al. 2021, eq. 6) from McCandlish et al. 2018's samples-to-result
    ``E = E_min(1 + B/B_noise)``: 1 at B0, below 1 above it. ``noise_scale=inf`` (noise dominates: every
    sample counts fully) gives 1; ``0`` (no noise: one sample is as good as a batch) gives B0/B.
    """
    b = checks.number("batch_size", batch_size)
    b0 = checks.number("base_batch", base_batch)
    noise = check_noise_scale(noise_scale)
    if math.isinf(noise):
        return 1.0
    return (noise + b0) / (noise + b)


def goodput(samples_per_second: float, batch_size: float, noise_scale: float, base_batch: float) -> float:
    """Throughput x statistical efficiency: samples/s, each counted by its worth relative to ``base_batch``."""
    speed = checks.number("samples_per_second", samples_per_second)
    return speed * statistical_efficiency(batch_size, noise_scale, base_batch)


def steps_factor(batch_size: float, noise_scale: float) -> float:
    """Optimizer steps to a result relative to the fewest possible: ``S/S_min = 1 + B_noise/B``."""
    noise = check_noise_scale(noise_scale)
    b = checks.number("batch_size", batch_size)
    return math.inf if math.isinf(noise) else 1.0 + noise / b


def doubling_step_reduction(batch_size: float, noise_scale: float) -> float:
    """How many times fewer steps doubling ``batch_size`` buys: ``S(B)/S(2B) = (2B + 2B_noise)/(2B + B_noise)``.

    2 when noise dominates (B << B_noise: perfect scaling), 4/3 at B = B_noise (the critical batch), toward 1
    above it (McCandlish et al. 2018, eq. 2.11).
    """
    noise = check_noise_scale(noise_scale)
    b = checks.number("batch_size", batch_size)
    if math.isinf(noise):
        return 2.0
    return (2.0 * b + 2.0 * noise) / (2.0 * b + noise)


def interpolate_throughput(throughput: Any, batch_size: float) -> float:
    """Samples/s at ``batch_size``: exact at measured sizes, log-log linear between neighbours.

    ``throughput`` is a curve in any form :func:`parse_curve` takes. Raises ``ValueError`` outside the
    measured range -- a curve is never extrapolated.
    """
    curve = parse_curve(throughput)
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


def candidate_batch_sizes(smallest: int, largest: int, count: int = CANDIDATES) -> list[int]:
    """About ``count`` integer batch sizes spaced geometrically from ``smallest`` to ``largest`` (both in)."""
    lo, hi = checks.integer("smallest", smallest), checks.integer("largest", largest)
    n = checks.integer("count", count)
    if hi < lo:
        raise ValueError(f"largest must be >= smallest, got smallest={smallest!r}, largest={largest!r}")
    if hi == lo or n == 1:
        return sorted({lo, hi})
    ratio = (hi / lo) ** (1.0 / (n - 1))
    return sorted({lo, hi} | {min(hi, max(lo, round(lo * ratio**i))) for i in range(n)})
