"""CPU device: the whole process's peak resident memory per step, against RAM or a container limit.

Peak: on Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark (VmHWM) to the
current resident size, and reading ``VmHWM`` from ``/proc/self/status`` after the step gives the exact peak
with no sampling. Elsewhere a background thread samples psutil's RSS every millisecond (it can miss
sub-millisecond spikes; said where it is used).

glibc keeps freed memory in its heaps unless told otherwise, so repeated readings of the same step drift
10-20% high (measured on this project's CNN). Fixing the mmap threshold at 64 KiB makes every large tensor
its own mapping, returned to the kernel on free: then the peak grows exactly linearly with the batch
(3.55 MiB per 64x64 image, repeatable to 0.1 MiB; see DESIGN.md). :func:`exact_allocator` sets it when a CPU device is made, through ``mallopt``: process-wide, and it stays
-- switching back and forth is not an option, because the large free chunks a fast heap keeps would serve a
later measured step's tensors without new resident pages and read as nothing (measured: 0.0 MiB for a CNN
step at batch 2 after fast-mode steps). Its cost, measured: a training step is 17-45% slower (every large
tensor a fresh mapping, page faults and all; benchmarks/RESULTS.md, "glibc's mmap threshold"). So batchlab
trains and times at speed, on :meth:`CPUDevice.for_training` -- a sweep's runs, and the profile (advise's
throughput) once it has read every peak. A user who trains on the CPU in the same process after a search
calls :func:`fast_allocator` and gets the speed back; the integrations that train after searching do.

Capacity is counted like a container limit counts it: the whole process, ``rss + available RAM``, capped by
every cgroup limit above the process (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, nested: the smallest
room wins). A limit counts every process in its cgroup, so the room it leaves is ``limit - (usage -
reclaimable cache - this process's rss)`` (:class:`CgroupLevel`). A CPU step that exceeds it is killed by the
kernel, not raised, so :meth:`CPUDevice.hard_limit_bytes` tells the search where it must never go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from batchlab.devices.base import Device
from batchlab.devices.release import release_after_oom

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
EXACT_MMAP_BYTES = 64 * 1024  # measuring: every tensor larger than this is mmapped and unmapped on free
FAST_MMAP_BYTES = 32 * 1024**2  # DEFAULT_MMAP_THRESHOLD_MAX (64-bit): where the dynamic threshold tops out
FAST_TRIM_BYTES = 2 * FAST_MMAP_BYTES  # the dynamic rule keeps trim at twice the mmap threshold
_allocator: str | None = None  # None: untouched; "exact" or "fast" once set (process-wide)
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _libc() -> ctypes.CDLL | None:
    """glibc, where ``mallopt`` exists (None elsewhere: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def exact_allocator() -> bool:
    """Set glibc's mmap threshold to 64 KiB for exact readings (process-wide, and it stays: module docstring);
    True if it is in effect. After :func:`fast_allocator` it is set again, and readings trim the heap first."""
    global _allocator
    libc = _libc()
    if libc is None:
        return False
    if _allocator != "exact":
        libc.mallopt(_M_MMAP_THRESHOLD, EXACT_MMAP_BYTES)
        _allocator = "exact" if _allocator is None else "exact after fast"
    return True


def fast_allocator() -> bool:
    """Give training its speed back after measuring on the CPU: the static thresholds glibc's dynamic ones
    settle at for large tensors (mmap 32 MiB, its 64-bit maximum; trim twice that); True where it applies.

    The 64 KiB threshold batchlab measures with makes a training step 17-45% slower (benchmarks/RESULTS.md,
    "glibc's mmap threshold"); glibc cannot return to its dynamic threshold, and with these a step runs as
    fast as in a process batchlab never touched (measured, same page). Call it once your searches are done
    and training follows in the same process (the Lightning, Ultralytics and Hugging Face integrations do).
    A later measurement on the CPU still works, reading conservatively high: freed tensors then sit in the
    heap, which each reading trims first (:meth:`CPUDevice._begin`) and the step faults back in.
    """
    global _allocator
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, FAST_MMAP_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, FAST_TRIM_BYTES)
    _allocator = "fast"
    return True


@contextmanager
def measuring_allocator() -> Iterator[None]:
    """Exact readings inside (a :class:`CPUDevice` made there sets them), and training's speed back on the
    way out unless the process was measuring already: for a check that measures on the way to training
    (:func:`batchlab.fit.search.check_host_room`), which must leave the allocator as it found it, as nearly as
    glibc allows -- an untouched process gets :func:`fast_allocator`, which runs as fast."""
    before = _allocator
    try:
        yield
    finally:
        if before in (None, "fast") and _allocator not in (None, "fast"):
            fast_allocator()


def _read_status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} missing from {_STATUS}")


@dataclass(frozen=True)
class CgroupLevel:
    """One cgroup on the way from this process's own to the root that has a memory limit.

    ``usage`` is what the kernel charges to it (every process inside, page cache included) and
    ``reclaimable`` the inactive file cache, which it drops before it kills -- the working set that Docker and
    the kubelet report is ``usage - reclaimable``.
    """

    path: Path
    limit: int
    usage: int
    reclaimable: int

    def room_for(self, rss: int) -> int:
        """The most resident memory a process holding ``rss`` now can reach: the limit minus the others' use."""
        others = max(self.usage - self.reclaimable - rss, 0)
        return self.limit - others


_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number (9223372036854771712)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    value = int(text)
    return value if value < _NO_LIMIT else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_levels(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> list[CgroupLevel]:
    """Every cgroup from this process's own up to the root that limits memory (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``); nested limits all apply, so callers take the smallest room among them."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    levels = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, files = (
                root / "memory",
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
            )
        else:
            continue
        own = base / path.lstrip("/")
        if not own.is_dir():  # a namespaced container sees its own cgroup at the mount's root
            own = base
        for folder in [own, *own.parents]:
            if folder != base and base not in folder.parents:
                break
            limit = _read_int(folder / files[0])
            usage = _read_int(folder / files[1])
            if limit is not None and usage is not None:
                levels.append(CgroupLevel(folder, limit, usage, _stat(folder / "memory.stat", files[2])))
    return levels


def process_capacity_bytes() -> int:
    """The most resident memory this process can reach: ``rss + available RAM``, capped by every cgroup limit
    above it (each net of what the cgroup's other processes hold)."""
    rss = psutil.Process().memory_info().rss
    rooms = [level.room_for(rss) for level in cgroup_levels()]
    return min([rss + psutil.virtual_memory().available, *rooms])


def host_room_bytes() -> int:
    """Host memory this process can still grow into (for a state copy in RAM, on any device)."""
    return max(process_capacity_bytes() - psutil.Process().memory_info().rss, 0)


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
    """Runs steps on the CPU and reads the process's peak resident memory.

    ``exact`` (the default) sets glibc's 64 KiB mmap threshold for every run, so readings are exact and
    linear in the batch; ``exact=False`` (:meth:`for_training`) runs with the speed back
    (:func:`fast_allocator`) and reads the same peak resident memory, which then includes freed memory the
    heap keeps: high, never low.
    """

    name = "cpu"

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        self.glibc = exact_allocator() if exact else fast_allocator()
        self._training: CPUDevice | None = None if exact else self
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
        return process_capacity_bytes()

    def hard_limit_bytes(self) -> int:
        return process_capacity_bytes()

    def for_training(self) -> CPUDevice:
        """This device with training's speed, for a sweep's runs and the profile's timing: the exact readings'
        allocator made their steps 1.2-1.7x slower on the built-in tasks (benchmarks/RESULTS.md, "CPU sweeps with the allocator's
        speed back"). A later exact reading in this process then reads high, never low, as after
        :func:`fast_allocator`."""
        if self._training is None:
            self._training = CPUDevice(exact=False)
        return self._training

    def settings(self) -> dict[str, object]:
        """What shapes the readings: how the peak is read and what the allocator did while measuring."""
        if not self.exact and self.glibc:
            return {
                "peak": self.peak_method,
                "allocator": "glibc as training runs it (fast_allocator): the peak includes freed memory the heap keeps",
            }
        if not self.glibc:
            allocator = "not glibc: readings may include freed memory the allocator keeps"
        elif _allocator == "exact after fast":
            allocator = (
                "glibc, mmap threshold 64 KiB after fast_allocator(): each reading trims the heap first"
            )
        else:
            allocator = "glibc, mmap threshold 64 KiB (exact readings)"
        return {"peak": self.peak_method, "allocator": allocator}

    def release(self) -> None:
        release_after_oom("cpu")

    def _begin(self) -> int:
        if self.exact:
            exact_allocator()  # again, after a fast_allocator() since this device was made
        else:
            fast_allocator()  # again, after an exact reading since this device was made
        if _allocator in ("exact after fast", "fast"):
            _libc().malloc_trim(0)  # freed chunks must not serve this step unread: a reading high, never low
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
