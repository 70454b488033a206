"""Run one probe on a device -- the workload's steps, measured -- and name the memory of one that fit."""

from __future__ import annotations

import time

from batchlab.defaults import VERIFY_STEPS
from batchlab.devices.base import Device, Measurement
from batchlab.fit.records import Outcome, Probe
from batchlab.memory import MemoryBreakdown, measured_breakdown
from batchlab.workload.skipped_steps import steps_always_create_state
from batchlab.workload.workload import StepFunction, Workload


def run_probe(
    device: Device,
    workload: Workload | StepFunction,
    batch_size: int,
    budget: int,
    predicted: int | None,
    own_bytes: int = 0,
    state_step: int | None = None,
) -> Probe:
    """Run one probe; the verdict is the search's, not the device's.

    ``own_bytes`` is memory the search itself holds in the measured process (the CPU state copy): it is taken
    off the reading, since the user's own run will not hold it. A step that the workload's GradScaler skips
    still creates the optimizer state (:func:`~batchlab.workload.skipped_steps.steps_always_create_state`).
    ``state_step``: run a scout (:func:`next_candidate`), its first step at this size; it is timed apart (the
    device synchronised after it) and left out of the probe's ``steps`` and ``seconds``.
    """
    tensor_bytes: MemoryBreakdown | None = None
    calls = 0
    state_seconds = 0.0

    def step_and_record(b: int) -> None:
        nonlocal tensor_bytes, calls, state_seconds
        calls += 1
        if state_step is not None and calls == 1:
            started = time.perf_counter()
            workload.step(state_step)
            device.synchronize()  # the clock must include the state step's queued device work
            state_seconds = time.perf_counter() - started
        else:
            workload.step(b)
        tensor_bytes = workload.tensor_bytes()

    with steps_always_create_state(workload.scalers, workload.optimizers) as skips:
        measurement: Measurement = device.run(step_and_record, batch_size, VERIFY_STEPS)
    peak = (
        measurement.peak_bytes - own_bytes if measurement.ok and measurement.peak_bytes is not None else None
    )
    if not measurement.ok:
        outcome = Outcome.OOM
    elif peak is not None and peak > budget:
        outcome = Outcome.OVER_BUDGET
    else:
        outcome = Outcome.FITS
    return Probe(
        batch_size,
        outcome,
        peak,
        None if measurement.baseline_bytes is None else measurement.baseline_bytes - own_bytes,
        predicted,
        max(measurement.seconds - state_seconds, 0.0),
        measurement.steps - (state_step is not None),
        measurement.allocated_bytes,
        tensor_bytes if measurement.ok else None,
        measurement.error,
        skips.skipped,
        tuple(skips.scales),
        skips.optimizer_steps if workload.optimizers else None,
        state_step,
    )


def breakdown_of(probe: Probe, before: MemoryBreakdown | None) -> MemoryBreakdown | None:
    """The memory of a fitting probe by what holds it, where the workload can tell (None for a step callable)."""
    if (
        probe.peak_bytes is None
        or probe.baseline_bytes is None
        or probe.tensor_bytes is None
        or before is None
    ):
        return None
    return measured_breakdown(
        peak_bytes=probe.peak_bytes,
        baseline_bytes=probe.baseline_bytes,
        allocated_bytes=probe.allocated_bytes,
        before=before,
        after=probe.tensor_bytes,
    )
