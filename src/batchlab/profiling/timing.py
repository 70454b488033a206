"""Timing one batch size on a device: dropped warm-up steps, then timed steps between synchronisations.

The one place the profile reads a clock. A step is timed from its start until ``device.synchronize()``
returns (on CUDA the kernels run asynchronously: without the sync the clock would measure launch time);
the first :data:`batchlab.defaults.WARMUP_STEPS` steps are run and dropped, and the median of the rest is
the step time (robust to one GC pause or a noisy neighbour).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchlab.defaults import WARMUP_STEPS
from batchlab.devices import Device
from batchlab.profiling.analysis import timed_steps_for


@dataclass(frozen=True)
class Timing:
    """What :func:`time_steps` measured: ``ok`` False on an out-of-memory; the peak over both runs."""

    ok: bool
    peak_bytes: int | None
    allocated_bytes: int | None
    step_times: tuple[float, ...]  # the timed steps only: the warm-up steps are dropped
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None


def _max_or_none(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def time_steps(
    device: Device,
    step: Callable[[int], Any],
    batch_size: int,
    *,
    seconds_per_point: float,
    stop_above: int | None = None,
    rounds: int = 1,
    steps: int | None = None,
) -> Timing:
    """Run ``WARMUP_STEPS`` dropped steps, then enough timed steps for ~``seconds_per_point``; peak over both.

    Two device runs: the warm-up, then the timed steps (how many: :func:`~.analysis.timed_steps_for`, from
    the last warm-up step's time). When the warm-up already peaks above ``stop_above`` bytes, no step is
    timed (the size does not fit; its speed is not worth the time). The caller restores the state afterwards.

    One window of ``rounds`` (the profile's interleaved rounds): ``1/rounds`` of that count, rounded up (at
    least one step); ``steps`` fixes the count instead (the later rounds repeat the first one's, so every round
    weighs the same in the pooled steps).
    """
    times: list[float] = []

    def timed_step(b: int) -> None:
        start = time.perf_counter()
        step(b)
        device.synchronize()  # sync point: the clock must include queued device work
        times.append(time.perf_counter() - start)

    warm = device.run(timed_step, batch_size, WARMUP_STEPS)
    if not warm.ok:
        return Timing(False, warm.peak_bytes, warm.allocated_bytes, (), warm.error)
    if stop_above is not None and warm.peak_bytes is not None and warm.peak_bytes > stop_above:
        return Timing(True, warm.peak_bytes, warm.allocated_bytes, ())
    if steps is None:  # the last warm-up step estimates a steady step
        steps = math.ceil(timed_steps_for(times[-1], seconds_per_point) / rounds)
    times.clear()  # the warm-up steps are dropped here
    timed = device.run(timed_step, batch_size, steps)
    peak = _max_or_none(warm.peak_bytes, timed.peak_bytes)
    allocated = _max_or_none(warm.allocated_bytes, timed.allocated_bytes)
    if not timed.ok:
        return Timing(False, peak, allocated, (), timed.error)
    return Timing(True, peak, allocated, tuple(times))
