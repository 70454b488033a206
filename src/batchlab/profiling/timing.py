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
    """What :func:`time_steps` measured: ``ok`` False on an out-of-memory (then ``error`` says which)."""

    ok: bool
    step_times: tuple[float, ...]  # the timed steps only: the warm-up steps are dropped
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None


def time_steps(
    device: Device,
    step: Callable[[int], Any],
    batch_size: int,
    *,
    seconds_per_point: float,
    rounds: int = 1,
    steps: int | None = None,
) -> Timing:
    """Run ``WARMUP_STEPS`` dropped steps, then enough timed steps for ~``seconds_per_point``.

    Two device runs: the warm-up, then the timed steps (how many: :func:`~.analysis.timed_steps_for`, from
    the last warm-up step's time). Memory is not read here: the profile reads it first, on the measuring
    device, and times on the device as training runs it. The caller restores the state afterwards.

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
        return Timing(False, (), warm.error)
    if steps is None:  # the last warm-up step estimates a steady step
        steps = math.ceil(timed_steps_for(times[-1], seconds_per_point) / rounds)
    times.clear()  # the warm-up steps are dropped here
    timed = device.run(timed_step, batch_size, steps)
    if not timed.ok:
        return Timing(False, (), timed.error)
    return Timing(True, tuple(times))
