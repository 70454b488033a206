"""A simulated device: memory as a function of the batch size, for deterministic tests of every search.

``memory(b)`` gives the peak bytes of a step at batch ``b`` (read after the step's first call, so it may
depend on what the step set, such as the shape of its batch). A step whose memory exceeds the capacity raises
``torch.OutOfMemoryError`` inside :meth:`run` exactly as a real card does (the hard edge), and the memory it
grabbed stays "cached" until :meth:`release` -- so a test can prove that a search gives memory back after
every failure. Time comes from ``seconds(b)``, a fake clock, so searches can be compared by cost without
timing anything. :func:`allocator_memory` builds realistic memory functions: a fixed part, a per-sample slope,
allocator block rounding, jumps, and repeatable noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch

from batchlab.devices.base import Device, Measurement


def allocator_memory(
    fixed_bytes: float,
    bytes_per_sample: float,
    *,
    block_bytes: int = 2 * 1024**2,
    jumps: dict[int, float] | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> Callable[[int], int]:
    """Return ``memory(b)``: ``fixed + per_sample*b``, plus ``jumps`` (bytes added from batch size b on, like a
    kernel switching algorithms), times ``1 + noise*u`` with ``u`` in [-1, 1] fixed per (seed, b) -- repeatable
    like allocator rounding, not random per call -- then rounded up to ``block_bytes`` (the CUDA caching
    allocator rounds large segments to 2 MiB)."""
    jumps = dict(jumps or {})

    def memory(batch_size: int) -> int:
        value = fixed_bytes + bytes_per_sample * batch_size
        value += sum(extra for start, extra in jumps.items() if batch_size >= start)
        if noise:
            digest = hashlib.blake2b(f"{seed}:{batch_size}".encode(), digest_size=8).digest()
            u = int.from_bytes(digest, "little") / 2**64 * 2 - 1
            value *= 1 + noise * u
        return int(math.ceil(value / block_bytes) * block_bytes)

    return memory


class SimulatedDevice(Device):
    """A device whose step memory is ``memory(b)`` and whose clock is ``seconds(b)`` per step.

    The step callable is still called (``steps`` times per run) so state handling can be tested; its memory
    is not read. ``runs`` records every batch size run, in order.
    """

    def __init__(
        self,
        memory: Callable[[int], float],
        capacity_bytes: int,
        *,
        seconds: Callable[[int], float] = lambda b: 1e-3 * (1 + b),
        baseline_bytes: int = 0,
        name: str = "simulated",
    ) -> None:
        self.memory = memory
        self._capacity = int(capacity_bytes)
        self.seconds = seconds
        self.baseline = int(baseline_bytes)
        self.name = name
        self.cached_bytes = 0  # memory a failed step grabbed and that release() gives back
        self.runs: list[int] = []

    def capacity_bytes(self) -> int:
        return self._capacity

    def in_use_bytes(self) -> int:
        return self.baseline + self.cached_bytes

    def release(self) -> None:
        self.cached_bytes = 0

    def _begin(self) -> int:  # pragma: no cover - run() is overridden
        return self.in_use_bytes()

    def _end(self) -> tuple[int, None]:  # pragma: no cover - run() is overridden
        return self.in_use_bytes(), None

    def run(self, step: Callable[[int], Any], batch_size: int, steps: int = 2) -> Measurement:
        self.runs.append(batch_size)
        peak = None  # read after the first step: memory(b) may depend on what the step set (a batch's shape)
        elapsed = self.seconds(batch_size) * steps
        oom = None
        try:
            for _ in range(steps):
                step(batch_size)
                if peak is None:
                    peak = self.baseline + int(self.memory(batch_size))
                if peak > self._capacity:
                    self.cached_bytes = peak - self.baseline
                    raise torch.OutOfMemoryError(
                        f"simulated out of memory: {peak} bytes > capacity {self._capacity}"
                    )
        except torch.OutOfMemoryError as exc:
            oom = str(exc)
        if oom is not None:
            self.release()
            return Measurement(batch_size, False, None, self.baseline, elapsed, steps, None, oom)
        return Measurement(batch_size, True, peak, self.baseline, elapsed, steps, None)
