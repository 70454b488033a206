"""The Device interface: run a step at batch size b and report what it cost, never decide what that means.

A device measures (peak memory, seconds) and turns a recognised out-of-memory error into a failed
:class:`Measurement`; the search decides what fits. Any exception that is not an out-of-memory propagates
unchanged -- a shape error is never "does not fit".
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from batchlab.devices.oom import out_of_memory_kind

# The one release path after an out-of-memory error lives in batchlab.devices.release; the name stays importable
# from here, where it was first defined.
from batchlab.devices.release import flush_failed_backward as flush_failed_backward


@dataclass(frozen=True)
class Measurement:
    """What running ``steps`` training steps at ``batch_size`` cost on a device.

    ``peak_bytes`` is the highest memory in use during the steps, counted the way the device's capacity is
    counted (CPU: the whole process's resident memory; CUDA: the caching allocator's reserved bytes).
    ``baseline_bytes`` is what was in use just before. ``ok`` is False when a step raised an out-of-memory
    error; then ``error`` holds its first line and ``peak_bytes`` may be None.
    """

    batch_size: int
    ok: bool
    peak_bytes: int | None
    baseline_bytes: int | None
    seconds: float
    steps: int
    allocated_bytes: int | None = None  # CUDA: max_memory_allocated (live tensors, no fragmentation)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Device(ABC):
    """A place to run training steps and read their memory.

    Subclasses implement :meth:`capacity_bytes`, :meth:`in_use_bytes` and the two hooks around a run
    (:meth:`_begin` / :meth:`_end`); :meth:`run` is shared and handles timing and out-of-memory errors.
    """

    name: str = "device"

    @abstractmethod
    def capacity_bytes(self) -> int:
        """Memory this process may use on the device, counted like ``Measurement.peak_bytes``."""

    def hard_limit_bytes(self) -> int | None:
        """Memory above which a step would be killed instead of raising an error (CPU RAM); None if it raises."""
        return None

    @abstractmethod
    def in_use_bytes(self) -> int:
        """Memory in use by this process on the device right now."""

    def release(self) -> None:  # noqa: B027 - an optional hook; most devices have nothing to free
        """Free what a failed step left behind (called outside the ``except`` block, see :meth:`run`); real
        devices use :func:`batchlab.devices.release.release_after_oom`, the path every caller shares."""

    def settings(self) -> dict[str, Any]:
        """What shapes this device's readings (allocator configuration, how the peak is read), for the record."""
        return {}

    def for_training(self) -> Device:
        """This device as a training run uses it, for steps that train or are timed rather than measured (a
        sweep's runs, the profile's timing): itself, except on the CPU, where the allocator that makes readings
        exact slows a step 1.2-1.7x
        (:meth:`batchlab.devices.cpu.CPUDevice.for_training`)."""
        return self

    def synchronize(self) -> None:  # noqa: B027 - an optional hook; CPU work is synchronous
        """Wait for queued work to finish, so a clock read after it is honest (no-op on the CPU)."""

    @abstractmethod
    def _begin(self) -> int:
        """Reset the device's peak counter; return the memory in use now (the baseline)."""

    @abstractmethod
    def _end(self) -> tuple[int, int | None]:
        """Return (peak bytes since :meth:`_begin`, peak allocated bytes or None)."""

    def run(self, step: Callable[[int], Any], batch_size: int, steps: int = 2) -> Measurement:
        """Run ``step(batch_size)`` ``steps`` times; measure peak memory and wall time.

        An out-of-memory error becomes ``Measurement(ok=False)``. Memory is released *after* leaving the
        ``except`` block: the exception's traceback holds the frames that hold the step's tensors, and
        Python drops it only when the block ends.
        """
        self.synchronize()
        baseline = self._begin()
        start = time.perf_counter()
        oom_message = None
        try:
            for _ in range(steps):
                step(batch_size)
            self.synchronize()  # the clock below must include queued device work
        except Exception as exc:
            if out_of_memory_kind(exc) is None:
                raise
            oom_message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        seconds = time.perf_counter() - start
        if oom_message is not None:
            peak, allocated = self._end()
            self.release()
            return Measurement(batch_size, False, peak, baseline, seconds, steps, allocated, oom_message)
        peak, allocated = self._end()
        return Measurement(batch_size, True, peak, baseline, seconds, steps, allocated)
