"""CPU device: the whole process's peak resident memory per step, against RAM or a container limit.

Peak: on Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark (VmHWM) to the
current resident size, and reading ``VmHWM`` from ``/proc/self/status`` after the step gives the exact peak
with no sampling. Elsewhere a background thread samples psutil's RSS every millisecond (it can miss
sub-millisecond spikes; said where it is used).

glibc keeps freed memory in its heaps unless told otherwise, so repeated readings of the same step drift
10-20% high (measured on this project's CNN). Fixing the mmap threshold at 64 KiB makes every large tensor
its own mapping, returned to the kernel on free: then the peak grows exactly linearly with the batch
(3.55 MiB per 64x64 image, repeatable to 0.1 MiB; see DESIGN.md). :func:`fix_malloc_threshold` does this
once per process through ``mallopt`` -- it is process-wide and stays on (glibc cannot return to its dynamic
threshold), costing a few more mmap calls for tensors over 64 KiB.

Capacity is counted like a container limit counts it: the whole process, ``rss + available RAM``, capped by
the cgroup limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``). A CPU step that exceeds RAM is killed by
the kernel, not raised, so :meth:`CPUDevice.hard_limit_bytes` tells the search where it must never go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from pathlib import Path

import psutil

from batchlab.devices.base import Device
from batchlab.devices.release import release_after_oom

_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_MMAP_THRESHOLD_BYTES = 64 * 1024  # 64 KiB: every tensor larger than this is mmapped and unmapped on free
_malloc_fixed: bool | None = None
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def fix_malloc_threshold() -> bool:
    """Set glibc's mmap threshold to 64 KiB once per process; True if it is (or already was) in effect."""
    global _malloc_fixed
    if _malloc_fixed is None:
        _malloc_fixed = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_fixed = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                _malloc_fixed = False
    return _malloc_fixed


def _read_status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} missing from {_STATUS}")


def cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or None when there is none."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # cgroup v2
                candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max")
                candidates.append(Path("/sys/fs/cgroup/memory.max"))
            elif "memory" in controllers.split(","):  # cgroup v1
                candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes")
                candidates.append(Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
    except OSError:
        return None
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text and text != "max":
            limit = int(text)
            if limit < 1 << 60:  # v1 reports "no limit" as a huge number
                return limit
    return None


class _RSSSampler:
    """Fallback peak reader for systems without clear_refs: samples RSS in a thread every millisecond."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


class CPUDevice(Device):
    """Runs steps on the CPU and reads the process's peak resident memory."""

    name = "cpu"

    def __init__(self) -> None:
        self.malloc_threshold_fixed = fix_malloc_threshold()
        self._process = psutil.Process()
        self._exact_peak = sys.platform.startswith("linux") and self._clear_refs_works()
        self._sampler: _RSSSampler | None = None

    @staticmethod
    def _clear_refs_works() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
            _read_status_kib("VmHWM")
            return True
        except OSError:
            return False

    @property
    def peak_method(self) -> str:
        return (
            "VmHWM after clear_refs (exact)"
            if self._exact_peak
            else "RSS sampled every 1 ms (may miss spikes)"
        )

    def in_use_bytes(self) -> int:
        return self._process.memory_info().rss

    def capacity_bytes(self) -> int:
        capacity = self.in_use_bytes() + psutil.virtual_memory().available
        limit = cgroup_limit_bytes()
        return min(capacity, limit) if limit else capacity

    def hard_limit_bytes(self) -> int:
        return self.capacity_bytes()

    def release(self) -> None:
        release_after_oom("cpu")

    def _begin(self) -> int:
        if self._exact_peak:
            _CLEAR_REFS.write_text("5")
            return _read_status_kib("VmRSS")
        self._sampler = _RSSSampler()
        return self.in_use_bytes()

    def _end(self) -> tuple[int, None]:
        if self._exact_peak:
            return _read_status_kib("VmHWM"), None
        sampler, self._sampler = self._sampler, None
        return (sampler.stop() if sampler else self.in_use_bytes()), None

    def __repr__(self) -> str:
        return f"CPUDevice(pid={os.getpid()}, peak={self.peak_method!r})"
