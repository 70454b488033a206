"""AutoBatch side by side: batchlab vs Lightning's BatchSizeFinder vs Accelerate, against the true maximum.

Usage (from the repository root, with the project's virtualenv):

    python benchmarks/autobatch.py                                   # CPU: 5 workloads (~35-45 min)
    python benchmarks/autobatch.py --workloads cnn --check-steps 3   # a quick smoke run
    python benchmarks/autobatch.py --cuda                            # GPU: emulated 16/24/40/80 GiB cards

Workloads (CPU): the built-ins cnn, resnet and gpt in fp32, and two mixed-precision ones defined here
(:func:`build_workload`): resnet-bf16 (bf16 autocast) and gpt-fp16 (fp16 autocast with a GradScaler that skips
the first 6 steps from its starting scale, so the optimizer state first exists at step 7).

What each tool is given -- the same signal, the same budget, the same start:

- **The budget** is 0.90 x a capacity chosen per workload (``CPU_CAPACITY``), counted as the whole process's
  peak resident memory. **The signal** is one emulated out-of-memory error, raised for every tool alike: on
  the CPU the process's peak (VmHWM, reset by ``/proc/self/clear_refs``) is read after every aten op by a
  ``TorchDispatchMode`` (~4 us a read), and the moment it exceeds the budget the step raises
  ``torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory: emulated ...")`` -- mid-step, as a real
  allocator does, so no search ever holds more than the budget plus one op's output. A RuntimeError with one
  argument: Lightning's ``is_oom_error``, Accelerate's ``should_reduce_batch_size`` and batchlab's classifier
  all recognise it, and each tool's own recovery runs (batchlab's: the device releases after its except block,
  :func:`batchlab.devices.release.release_after_oom`). Nothing else is given: no tool is told the budget except
  batchlab, whose API takes one.
- ``batchlab``: ``find_batch_size(workload, batch=-1, memory_budget=capacity)`` -- its own check at 0.90 x
  capacity, the very threshold the guard raises at. The check reads the same counter net of batchlab's state
  copy (its user's run will not hold the copy) while the guard counts the whole process, so the guard always
  fires first: every size over the budget reaches batchlab as the raised error, exactly as for the others,
  and the copy counts against batchlab wherever the guard sees it (batchlab then moves it to disk).
- ``lightning-power`` / ``lightning-binsearch``: the real ``Tuner.scale_batch_size`` (BatchSizeFinder) on a
  LightningModule that wraps the workload: manual optimization, so ``training_step`` runs the user's whole
  step -- forward and loss under the workload's autocast, backward (scaled by the workload's GradScaler under
  fp16) and ``optimizer.step()`` (``scaler.step``/``update`` under fp16, so a skipped step is no optimizer step
  to Lightning either); a DataLoader over batches drawn from the workload's own ``make_batch``; the
  ``batch_size`` attribute. Lightning's defaults: init_val 2, 3 steps per trial, 5% margin (binsearch).
- ``accelerate``: the real ``accelerate.utils.find_executable_batch_size`` around a function that restores the
  user's starting state (the scaler's scale too) and runs two training steps -- a restarted training run, as
  the decorator expects. ``starting_batch_size=1024`` on the CPU (see ``ACCELERATE_START``).
- ``ultralytics`` (CUDA only, image workloads, when importable): ``ultralytics.utils.autobatch.autobatch``.
- **The start**: every role in a fresh process, the same weights, resident baseline and caches (below).

The ground truth:

- ``truth``: the largest batch whose steps from the user's starting state, up to the second *applied*
  optimizer step (:func:`measure`: two steps in fp32/bf16, eight for gpt-fp16, whose scaler skips six), stay
  within the budget, found exhaustively: sizes 1, 2, 4, ... until one exceeds the budget, then bisection over
  every integer in the last bracket, each try real steps from the restored state. The answer must fit in two
  readings (a size that fit once and not again steps it down), and the peaks of the sizes that fit are
  checked to rise with the batch -- monotonicity is what makes bisection exhaustive. Then ``truth-edge``, in
  a fresh process, walks up from that answer while a size fits twice: a process that ran over-budget tries
  reads a few MiB high afterwards (the first raised error pages in ~4 MiB of the unwinder's code, measured on
  resnet), so the edge is settled where only fitting sizes, in rising order, ran -- a user's fresh run.

An error raised inside backward leaves the failed graph's activations queued in the autograd engine until
the next backward (see :func:`flush_autograd`; pytorch/pytorch#82218) -- with a real allocator error as with
the emulated one. The tools meet that as they would for real; only the ground truth flushes it.

After each tool, the state the user started from is restored and 50 further steps run at the tool's answer
in the same process (the tool's leftovers still resident, as they would be for the user); the table reports
the largest per-step peak and how many steps went over the budget, and the JSON which steps and the first
step that ran with the optimizer state (``state_from_step``: 2, or later where a GradScaler skipped). Every
step's wall time is recorded (``tries``, and ``step_times``: per distinct size, its first step against its
later ones -- first-shape costs).

Processes (CPU): every role runs in a fresh interpreter that imports torch, Lightning, Accelerate and
batchlab, sets glibc's mmap threshold (batchlab's ``exact_allocator``, for repeatable readings), seeds,
and builds the workload -- so every tool starts from the same weights (fingerprint checked) and the same
resident baseline, and no tool inherits another's heap or per-shape caches (oneDNN's and PyTorch's, held at
zero or one entry: ``ONEDNN_CACHE_OFF``). Wall time is the tool's call alone (not imports or model building).

CUDA (``--cuda``), kept apart in :func:`run_cuda`: the same roles on emulated cards
(``set_per_process_memory_fraction``), all in one process, with the budget at 0.90 x the card, the peak from
``max_memory_reserved`` and the emulated error reading "CUDA out of memory. (emulated ...)". Untested here
(no GPU). The CPU path never touches CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchlab import Workload, find_batch_size
from batchlab.devices.cpu import exact_allocator
from batchlab.units import format_bytes, parse_bytes
from batchlab.workloads import load_workload
from provenance import provenance

FRACTION = 0.90  # batchlab's DEFAULT_FRACTION (spec.py); every tool is held to fraction x capacity
SEED = 0  # every process builds the same weights from this seed
PROBE_STEPS = 2  # truth and accelerate tries: step 1 creates optimizer state, step 2 runs with it
# The truth counts *applied* optimizer steps: a GradScaler that skips (fp16 overflow) delays the optimizer state,
# so a truth probe runs until PROBE_STEPS steps were applied -- the user's run meets the state at its first
# applied step -- and gives up (the size does not settle) after this many steps; gpt-fp16 skips 6 (measured).
MAX_PROBE_STEPS = 16
CHECK_STEPS = 50  # further steps at each answer, from the user's starting state (issue 2, item 7)
# Accelerate only ever goes down (x0.9 per OOM), so it needs a start above the answer. Its default, 128, is
# returned untested against anything larger whenever 128 fits; 1024 (CPU) is a round guess well above every
# true max here, as a user who wants "the largest" would pick. On emulated 16-80 GiB cards true maxes reach
# the tens of thousands, hence 65536 there. OOMs abort early in the step, so extra tries cost little.
ACCELERATE_START = {"cpu": 1024, "cuda": 65536}
TRUTH_LIMIT = 2**16  # the exhaustive search refuses to go further (no CPU or emulated card here gets near)
CEILING_FACTOR = 2.0  # runaway guard for the machine (CPU): no step may pass 2x capacity, whoever runs it
DATASET_LENGTH = 10**7  # Lightning stops at len(dataset); synthetic batches are drawn lazily, so no cost
# Capacities (CPU): 0.9 x these puts the true max at ~12-70 samples, where one step takes ~1-2 s on an
# unloaded core. The process alone is ~830-900 MiB with torch 2.14.1's CUDA build (torch ~510 MiB, Lightning
# ~300 MiB, the model); with 2.13.0's CPU build it was ~410-490 MiB and cnn/resnet/gpt ran at 768/768/832 MiB.
# Measured here (MiB per sample / fixed MiB, to the second applied optimizer step, caches off as below):
# cnn 3.81 / 836, resnet 5.88 / 855, gpt 11.3 / 895, resnet-bf16 ~3.0 / 856, gpt-fp16 7.72 / 900 -- whose
# steps are the slowest (~0.18 s per sample), hence its smaller max (~12.5).
CPU_CAPACITY = {
    "cnn": "1216MiB",
    "resnet": "1216MiB",
    "gpt": "1280MiB",
    "resnet-bf16": "1152MiB",
    "gpt-fp16": "1107MiB",
}
# mlp-digits is left out: its answer is capped by its 1797 samples. The two mixed-precision workloads are
# defined here (:func:`build_workload`).
CPU_WORKLOADS = ("cnn", "resnet", "gpt", "resnet-bf16", "gpt-fp16")
CPU_TOOLS = ("batchlab", "lightning-power", "lightning-binsearch", "accelerate")
CUDA_CARDS_GIB = (16, 24, 40, 80)
# The GPU check (benchmarks/gpu_check.sh) gives this script ~200 s for all four cards: 10 steps per check
# there by default (--check-steps 50 for the full check when time allows).
CUDA_CHECK_STEPS = 10
CUDA_WORKLOADS = ("cnn",)  # the cheapest built-in, to give four cards a chance in that time (unmeasured)
IMAGE_WORKLOADS = {"cnn": 64, "resnet": 64}  # workloads Ultralytics' autobatch can feed: name -> image size
ROOT = Path(__file__).resolve().parent
# oneDNN caches a compiled primitive per convolution shape, so every new batch size a process tries stays
# resident: measured here on resnet, +19 MiB after 8 new sizes (~2.4 MiB each, ~0.4 samples), +4 MiB with
# the cache off. Left on, the true max depends on which sizes a process tried before, and a search that
# tries many sizes (Accelerate from 1024 tries ~30) shrinks its own budget. Off in every process (costs
# ~15% conv speed, the same for all); --onednn-cache keeps the default to show the effect. The "+4 MiB" left
# is PyTorch's own per-shape cache of oneDNN computations (ideep's LRU, LRU_CACHE_CAPACITY, default 1024):
# measured with torch 2.14.1, RssAnon grows per new batch size by ~0.5 MiB (resnet), ~1.5 MiB (resnet-bf16)
# and ~4.5 MiB (gpt-fp16: 2 samples after 4 sizes), and not at all with a capacity of 1 (0 crashes). It is
# held at 1 in every process too: no step time changed (cnn, resnet, resnet-bf16, gpt) except gpt-fp16's,
# whose fp16 matmuls then re-pack their weights every call (~2x slower, the same for all tools).
ONEDNN_CACHE_OFF = {
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
    "DNNL_PRIMITIVE_CACHE_CAPACITY": "0",
    "LRU_CACHE_CAPACITY": "1",
}

log = logging.getLogger("autobatch")


# ---------------------------------------------------------------------------------------------------------
# Reading memory: one meter per backend (whole-process RSS on the CPU, the caching allocator on CUDA)
# ---------------------------------------------------------------------------------------------------------


class CPUMeter:
    """Whole-process peak resident memory: clear_refs resets VmHWM; a pread of /proc/self/status reads it."""

    name = "cpu"

    def __init__(self) -> None:
        exact_allocator()  # batchlab's: 64 KiB mmap threshold, so freed tensors leave RSS (repeatable)
        self._status = os.open("/proc/self/status", os.O_RDONLY)
        self.reset()  # fails here, not mid-benchmark, where clear_refs is not writable

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as handle:  # "5": reset the peak RSS to the current RSS
            handle.write("5")

    def _field(self, key: bytes) -> int:
        data = os.pread(self._status, 8192, 0)
        start = data.index(key) + len(key)
        return int(data[start : data.index(b"kB", start)]) * 1024

    def peak(self) -> int:
        return self._field(b"VmHWM:")

    def current(self) -> int:
        return self._field(b"VmRSS:")

    @staticmethod
    def oom(message: str) -> torch.OutOfMemoryError:
        # One argument, a RuntimeError subclass, the CPU allocator's words: Lightning's is_out_of_cpu_memory,
        # accelerate's should_reduce_batch_size and batchlab's classifier all match it.
        return torch.OutOfMemoryError(f"DefaultCPUAllocator: can't allocate memory: emulated by {message}")


class CUDAMeter:
    """Caching-allocator peak (reserved bytes, fragmentation included) on the current CUDA device."""

    name = "cuda"

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_reserved()  # host-side counter: no device sync

    def current(self) -> int:
        return torch.cuda.memory_reserved()

    @staticmethod
    def oom(message: str) -> torch.OutOfMemoryError:
        # " out of memory." (accelerate) and "CUDA" + "out of memory" (Lightning) both appear.
        return torch.OutOfMemoryError(f"CUDA out of memory. (emulated by {message})")


# ---------------------------------------------------------------------------------------------------------
# The budget guard: the one out-of-memory signal every tool sees
# ---------------------------------------------------------------------------------------------------------


class _OpWatch(TorchDispatchMode):
    """Reads the meter after every aten op (forward, backward and optimizer alike) and raises past ``limit``."""

    def __init__(self, meter: CPUMeter | CUDAMeter, limit: int | None, what: str, batch_size: int) -> None:
        super().__init__()
        self.meter, self.limit, self.what, self.batch_size = meter, limit, what, batch_size

    def over_limit(self) -> bool:
        return self.limit is not None and self.meter.peak() > self.limit

    def error(self) -> torch.OutOfMemoryError:
        return self.meter.oom(
            f"benchmarks/autobatch.py: batch {self.batch_size} peaked at {format_bytes(self.meter.peak())}, "
            f"over the {self.what} of {format_bytes(self.limit)}"
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.over_limit():
            raise self.error()
        return out


@dataclass
class StepEvent:
    batch_size: int
    peak_bytes: int
    outcome: str  # "ok" | "oom" (emulated, over the budget) | "ceiling" (runaway guard) | "error"
    seconds: float  # the step's wall time, to its end or to the raise


class _GuardedStep:
    """The context of one guarded step. A class, not a generator: a ``@contextmanager`` re-raises through its
    own frames, whose locals hold the exception -- a reference cycle that keeps the failed step's tensors
    alive until the next full garbage collection (measured: ~2 MiB per failed try, which starved Accelerate
    of memory after 40 tries). Real allocator errors create no such cycle, so the harness must not either."""

    def __init__(self, guard: Guard, batch_size: int, reset: bool) -> None:
        self.guard, self.batch_size, self.reset = guard, batch_size, reset
        enforce = guard.enforce
        limit = guard.budget if enforce else guard.ceiling
        self.watch = _OpWatch(guard.meter, limit, "budget" if enforce else "runaway ceiling", batch_size)

    def __enter__(self) -> None:
        if self.reset:
            self.guard.meter.reset()
        self.started = time.perf_counter()
        self.watch.__enter__()

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.watch.__exit__(exc_type, exc, traceback)
        seconds = time.perf_counter() - self.started
        peak = self.guard.meter.peak()
        if exc_type is None:
            late = self.watch.over_limit()  # anything allocated outside an aten op
            kind = self._kind() if late else "ok"
            self.guard.events.append(StepEvent(self.batch_size, peak, kind, seconds))
            if late:
                raise self.watch.error()
            return False
        emulated = issubclass(exc_type, torch.OutOfMemoryError) and "emulated by benchmarks/" in str(exc)
        kind = self._kind() if emulated else "error"
        self.guard.events.append(StepEvent(self.batch_size, peak, kind, seconds))
        return False  # propagate unchanged

    def _kind(self) -> str:
        return "oom" if self.guard.enforce else "ceiling"


@dataclass
class Guard:
    """Runs training steps under the budget: ``enforce=True`` raises the emulated OOM past ``budget``;
    ``enforce=False`` only watches (and raises past ``ceiling``, the machine's runaway guard)."""

    meter: Any
    budget: int
    enforce: bool
    ceiling: int | None
    events: list[StepEvent] = field(default_factory=list)

    def step(self, batch_size: int, *, reset: bool = True) -> _GuardedStep:
        """``with guard.step(b): <one training step>``. ``reset=False`` leaves the peak counter to the caller
        (batchlab resets it itself once per probe of two steps)."""
        return _GuardedStep(self, batch_size, reset)


# ---------------------------------------------------------------------------------------------------------
# One process, one role
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    name: str
    workload: Any
    snapshot: Any
    meter: Any
    device: str
    capacity: int
    budget: int
    ceiling: int | None
    fingerprint: str

    def guard(self, *, enforce: bool) -> Guard:
        return Guard(self.meter, self.budget, enforce, self.ceiling)

    def restore(self) -> None:
        """Back to the user's starting state (weights, optimizer, RNG), with garbage collected."""
        self.snapshot.restore()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def setup(workload_name: str, device: str, capacity: int) -> Context:
    """Import every tool, fix the allocator, seed, build the workload: the same starting point for all roles."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    import accelerate.utils  # noqa: F401 - imported by every role so that every process has the same baseline
    import lightning.pytorch  # noqa: F401

    if device == "cuda":
        meter: Any = CUDAMeter()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(capacity / total)  # the emulated card
        ceiling = None  # the emulated card is the hard wall; it raises a real OOM
    else:
        meter = CPUMeter()
        ceiling = int(CEILING_FACTOR * capacity)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    workload = build_workload(workload_name, device)
    return Context(
        name=workload_name,
        workload=workload,
        snapshot=workload.snapshot(),
        meter=meter,
        device=device,
        capacity=capacity,
        budget=int(capacity * FRACTION),  # exactly how find_batch_size turns capacity into a budget
        ceiling=ceiling,
        fingerprint=fingerprint(workload.model),
    )


def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy summed over each sequence and averaged over sequences (gpt-fp16's loss)."""
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return flat / targets.shape[0]


def build_workload(name: str, device: str) -> Workload:
    """A built-in workload, or one of the two mixed-precision variants defined here.

    - ``resnet-bf16``: the resnet built-in under bf16 autocast (no GradScaler: bf16 has fp32's range).
    - ``gpt-fp16``: the gpt built-in under fp16 autocast with a GradScaler, its loss summed over each
      sequence's 128 tokens (:func:`per_sequence_loss`, as much sequence code writes it) instead of averaged.
      At the scaler's starting scale (2^16) the scaled gradients overflow: measured here, the scaler skips the
      first 6 steps at every batch size tried (2, 8, 24) and applies the 7th, so AdamW's state (2x the
      parameters, 28 MiB) first exists at step 7 -- after any 2- or 3-step try that restarts from the user's
      state. That is the case where a search can miss the optimizer state (issue 10, item 1).
    """
    if name == "resnet-bf16":
        return load_workload("resnet", device=device).with_amp("bf16")
    if name == "gpt-fp16":
        base = load_workload("gpt", device=device)
        return Workload(base.model, base.make_batch, per_sequence_loss, base.optimizer, amp="fp16", name=name)
    return load_workload(name, device=device)


def flush_autograd(device: str) -> None:
    """Run a trivial backward, which frees what a failed backward left behind.

    After an out-of-memory error *inside* backward, PyTorch's autograd engine keeps the failed graph's pending
    work -- and every activation it saved -- queued on this thread until the next backward runs; gc cannot
    free it. Measured on resnet at b=8: 60 MiB stayed resident, with the emulated error and with a real
    DefaultCPUAllocator failure (under RLIMIT_AS) alike; one tiny backward freed it. The tools meet this as
    it is; only the ground truth flushes it, so that every size it measures starts clean.
    """
    leaf = torch.ones(1, device=device, requires_grad=True)
    (leaf * 1).sum().backward()


def measure(ctx: Context, guard: Guard, batch_size: int) -> tuple[int | None, list[int]]:
    """Steps at ``batch_size`` from the restored state until ``PROBE_STEPS`` optimizer steps were applied
    (a GradScaler's skipped steps do not count: the state they delay is what the user's run meets next);
    (max peak, or None if a step was aborted, and every step's peak)."""
    ctx.restore()
    peaks, aborted, applied = [], False, []
    handle = ctx.workload.optimizer.register_step_post_hook(lambda *_: applied.append(True))
    try:
        while len(applied) < PROBE_STEPS:
            if len(peaks) == MAX_PROBE_STEPS:
                raise SystemExit(
                    f"batch {batch_size}: {MAX_PROBE_STEPS} steps applied only {len(applied)} optimizer steps "
                    "(the GradScaler keeps skipping); the true max is undefined"
                )
            try:
                with guard.step(batch_size):
                    ctx.workload.step(batch_size)
            except torch.OutOfMemoryError:  # over the budget (truth), or the emulated card's wall (CUDA)
                aborted = True
            peaks.append(guard.events[-1].peak_bytes)
            if aborted:
                break
    finally:
        handle.remove()
    if aborted:
        flush_autograd(ctx.device)
    ctx.restore()  # outside the except block: its traceback held the step's tensors
    return (None if aborted else max(peaks)), peaks


def role_truth(ctx: Context, args) -> dict[str, Any]:
    """The true largest batch at the budget: doubling, then bisection over every integer in the bracket.

    A size fits when every step of a probe (:func:`measure`: to the second applied optimizer step) stays within
    the budget. The answer must fit in two readings: at
    the edge, whole-process readings differ by 1-2 MiB from probe to probe, so a size that fit once and not
    again steps the answer down by one until a size fits twice (``edge`` in the JSON shows what happened).
    """
    # Enforcing: a size that crosses the budget has failed, so its probe stops there (as the tools' do).
    guard = ctx.guard(enforce=True)
    readings: dict[int, list[int | None]] = {}

    def fits(batch_size: int) -> bool:
        peak, _ = measure(ctx, guard, batch_size)
        readings.setdefault(batch_size, []).append(peak)
        log.info("truth b=%d peak %s", batch_size, format_bytes(peak))
        return peak is not None and peak <= ctx.budget

    started = time.perf_counter()
    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > TRUTH_LIMIT:
            raise SystemExit(
                f"batch {lo} still fits: the true max is above {TRUTH_LIMIT}; lower the capacity"
            )
    if lo == 0:
        raise SystemExit(f"batch 1 does not fit the budget {format_bytes(ctx.budget)}; raise --capacity")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    bisection = lo
    fits(lo + 1)  # a second reading of the first size that failed, for the record
    while lo >= 1:
        while len(readings.setdefault(lo, [])) < 2:
            fits(lo)
        if all(p is not None and p <= ctx.budget for p in readings[lo]):
            break
        lo -= 1
    ran = sorted((b, max(p)) for b, p in readings.items() if None not in p)  # sizes that always ran through
    slack = 2 * 2**20  # 2 MiB: the spread of repeat readings here; a larger drop with a larger batch is a dip
    dips = [(b1, p1, b2, p2) for (b1, p1), (b2, p2) in zip(ran, ran[1:]) if p2 < p1 - slack]
    big = [(b, p) for b, p in ran if b >= lo / 8]  # the affine part, as batchlab fits it
    slope = None
    if len(big) >= 2:
        xs, ys = zip(*big)
        slope = float(np.polyfit(xs, ys, 1)[0])
    return {
        "answer": lo,
        "bisection_answer": bisection,
        "seconds": time.perf_counter() - started,
        "readings": {str(b): p for b, p in sorted(readings.items())},
        "edge": {str(b): readings.get(b) for b in range(lo, bisection + 2)},
        "monotone": not dips,
        "dips": dips,
        "bytes_per_sample": slope,
        "steps": len(guard.events),
    }


def role_truth_edge(ctx: Context, args) -> dict[str, Any]:
    """The edge again, in a fresh process: from the bisection's answer, walk up while a size fits twice.

    A process that has run over-budget steps reads a few MiB higher afterwards (measured on cnn: the truth
    process read b=65 ~6 MiB above the line through its smaller sizes, after six failed tries above it;
    a process that never went over read b=67 on the line). So the bisection runs in one process and its
    edge is settled here, where only sizes that fit, in rising order, have run -- the history any search
    that climbs from below would have. A size fits when both of two probes (:func:`measure`) stay within the
    budget; the walk stops at the first size that does not (or walks down if the start does not fit).
    """
    guard = ctx.guard(enforce=True)
    readings: dict[int, list[int | None]] = {}

    def fits_twice(batch_size: int) -> bool:
        peaks = [measure(ctx, guard, batch_size)[0] for _ in range(2)]
        readings[batch_size] = peaks
        log.info("edge b=%d peaks %s", batch_size, [format_bytes(p) for p in peaks])
        return all(p is not None and p <= ctx.budget for p in peaks)

    started = time.perf_counter()
    b = args.start
    if fits_twice(b):
        while fits_twice(b + 1):
            b += 1
    else:
        b -= 1
        while b >= 1 and not fits_twice(b):
            b -= 1
    return {
        "answer": b,
        "seconds": time.perf_counter() - started,
        "readings": {str(k): v for k, v in sorted(readings.items())},
        "steps": len(guard.events),
    }


def role_batchlab(ctx: Context, args) -> dict[str, Any]:
    """``find_batch_size(batch=-1, memory_budget=capacity)``: its own check at 0.90 x capacity, the guard's budget.

    The guard raises the same emulated OOM at the same budget as for the other tools. batchlab's own check
    reads the same counter net of its state copy (the user's run will not hold the copy), so it can never
    fire before the guard: every over-budget size reaches batchlab as the raised error, and its recovery
    (:func:`batchlab.devices.release.release_after_oom`) runs as it would after a real one.
    """
    guard = ctx.guard(enforce=True)
    workload = ctx.workload
    own_step = workload.step

    def watched_step(batch_size: int):
        with guard.step(batch_size, reset=False):  # batchlab's CPUDevice resets the peak once per probe
            return own_step(batch_size)

    workload.step = watched_step  # instance attribute; removed again below
    try:
        started = time.perf_counter()
        result = find_batch_size(workload, device=ctx.device, batch=-1, memory_budget=ctx.capacity)
        seconds = time.perf_counter() - started
    finally:
        del workload.step
    if result.budget_bytes != ctx.budget:
        raise SystemExit(f"batchlab's budget {result.budget_bytes} != the benchmark's {ctx.budget}")
    return {
        "answer": result.batch_size,
        "seconds": seconds,
        "steps": len(guard.events),
        "batchlab_steps_run": result.steps_run,
        "probes": [
            [p.batch_size, p.outcome, p.peak_bytes, round(p.seconds, 3), p.steps, p.skipped_optimizer_steps]
            for p in result.probes
        ],
        "tries": _tries(guard.events),
        "step_times": step_times(guard.events),
        "limited_by": result.limited_by,
        "peak_reported": result.peak_bytes,
        "state_copy_bytes": result.state_copy_bytes,
        "state_copy_storage": result.state_copy_storage,
        "skipped_optimizer_steps": result.skipped_optimizer_steps,
        "notes": result.notes,
        "ooms": sum(e.outcome != "ok" for e in guard.events),
        "_keep": result,
    }


def _tries(events: list[StepEvent]) -> list[list]:
    return [[e.batch_size, e.outcome, e.peak_bytes, round(e.seconds, 3)] for e in events]


def step_times(events: list[StepEvent]) -> list[list]:
    """Per distinct batch size, in the order first run: [b, outcome and seconds of its first step ever in this
    process, median seconds of its later completed steps (None if none), steps at b]. A first-shape cost
    (oneDNN primitives, kernel caches for a new shape) shows as a first step slower than the later ones."""
    by_size: dict[int, list[StepEvent]] = {}
    for event in events:
        by_size.setdefault(event.batch_size, []).append(event)
    rows = []
    for b, steps in by_size.items():
        later = [e.seconds for e in steps[1:] if e.outcome == "ok"]
        median = round(statistics.median(later), 3) if later else None
        rows.append([b, steps[0].outcome, round(steps[0].seconds, 3), median, len(steps)])
    return rows


class _SyntheticBatches(torch.utils.data.Dataset):
    """Samples from the workload's ``make_batch``; a whole batch is drawn at once through ``__getitems__``."""

    def __init__(self, make_batch) -> None:
        self.make_batch = make_batch

    def __len__(self) -> int:
        return DATASET_LENGTH

    def __getitem__(self, index: int):
        return tuple(part[0] for part in self.make_batch(1))

    def __getitems__(self, indices: list[int]):
        return self.make_batch(len(indices))


def _batch_as_is(batch):
    return batch  # __getitems__ already returns the collated (inputs, targets)


def role_lightning(ctx: Context, args, mode: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    guard = ctx.guard(enforce=True)
    workload = ctx.workload

    class WorkloadModule(pl.LightningModule):
        """The workload as a LightningModule: the whole step, optimizer included, inside training_step."""

        def __init__(self) -> None:
            super().__init__()
            self.model = workload.model
            self.batch_size = 2  # the attribute BatchSizeFinder scales (batch_arg_name="batch_size")
            self.automatic_optimization = False

        def train_dataloader(self):
            return torch.utils.data.DataLoader(
                _SyntheticBatches(workload.make_batch), batch_size=self.batch_size, collate_fn=_batch_as_is
            )

        def configure_optimizers(self):
            return workload.optimizer

        def training_step(self, batch, batch_idx):
            # The user's own step: the workload's autocast and, under fp16, its GradScaler (Lightning's
            # precision stays "32-true"; a skipped scaler.step is not an optimizer step to Lightning either).
            inputs, targets = batch
            scaler = workload.scaler
            with guard.step(len(inputs)):
                optimizer = self.optimizers()
                optimizer.zero_grad(set_to_none=True)
                loss = workload.loss((inputs, targets))
                self.manual_backward(scaler.scale(loss) if scaler else loss)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            return loss.detach()

    root = tempfile.mkdtemp(prefix="autobatch-lightning-")
    module = WorkloadModule()
    trainer = pl.Trainer(
        accelerator="gpu" if ctx.device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    started = time.perf_counter()
    answer = Tuner(trainer).scale_batch_size(module, mode=mode)  # Lightning's defaults otherwise
    seconds = time.perf_counter() - started
    return {
        "answer": int(answer),
        "seconds": seconds,
        "steps": len(guard.events),
        "tries": _tries(guard.events),
        "step_times": step_times(guard.events),
        "ooms": sum(e.outcome == "oom" for e in guard.events),
        "restored_fingerprint": fingerprint(workload.model),
        "_keep": (trainer, module),  # the user's trainer stays alive through the 50-step check
    }


def role_accelerate(ctx: Context, args) -> dict[str, Any]:
    from accelerate.utils import find_executable_batch_size

    guard = ctx.guard(enforce=True)
    workload = ctx.workload

    @find_executable_batch_size(starting_batch_size=args.accelerate_start)
    def train(batch_size: int) -> int:
        ctx.snapshot.restore()  # a restarted run starts from the user's state, not a half-done step
        for _ in range(PROBE_STEPS):  # stands in for the user's training run: an OOM shows in its first steps
            with guard.step(batch_size):
                workload.step(batch_size)
        return batch_size

    started = time.perf_counter()
    answer = train()
    seconds = time.perf_counter() - started
    return {
        "answer": int(answer),
        "seconds": seconds,
        "steps": len(guard.events),
        "tries": _tries(guard.events),
        "step_times": step_times(guard.events),
        "ooms": sum(e.outcome == "oom" for e in guard.events),
        "start": args.accelerate_start,
    }


def role_ultralytics(ctx: Context, args) -> dict[str, Any]:
    """Ultralytics' AutoBatch (CUDA only): forward+backward probes, a line, fraction of the card's memory."""
    import copy

    from ultralytics.utils.autobatch import autobatch

    started = time.perf_counter()
    answer = autobatch(
        copy.deepcopy(ctx.workload.model).train(), imgsz=IMAGE_WORKLOADS[ctx.name], fraction=FRACTION
    )
    seconds = time.perf_counter() - started
    ctx.restore()
    # It reads the physical card (get_device_properties / mem_get_info), not the per-process fraction.
    return {"answer": int(answer), "seconds": seconds, "steps": 0, "tries": [], "ooms": 0}


def check(ctx: Context, batch_size: int, steps: int) -> dict[str, Any]:
    """``steps`` further steps at ``batch_size`` from the user's starting state: do they stay in the budget?

    The process is left as the tool left it (its objects alive, nothing flushed), as the user's training
    continues in it; the weights, optimizer and RNG (and a GradScaler's scale) are put back to where the user
    started. ``state_from_step`` is the first step that ran with the optimizer state present (1-based; 2 when
    no step is skipped; later when a GradScaler skipped the first steps), ``over_budget_at`` the steps that
    went over.
    """
    guard = ctx.guard(enforce=False)
    ctx.restore()
    aborted = False
    has_state = []  # per step: did the optimizer state exist when the step began?
    for _ in range(steps):
        has_state.append(bool(ctx.workload.optimizer.state))
        try:
            with guard.step(batch_size):
                ctx.workload.step(batch_size)
        except torch.OutOfMemoryError as exc:  # the runaway ceiling, or the emulated card's real wall (CUDA)
            aborted = True
            log.warning("check at b=%d aborted: %s", batch_size, exc)
        if aborted:
            break
    ctx.restore()
    peaks = [e.peak_bytes for e in guard.events]
    return {
        "batch_size": batch_size,
        "steps": len(peaks),
        "max_peak": max(peaks) if peaks else None,
        "first_step_peak": peaks[0] if peaks else None,
        "max_peak_after_first": max(peaks[1:]) if len(peaks) > 1 else None,
        "median_peak": statistics.median(peaks) if peaks else None,
        "over_budget_steps": sum(p > ctx.budget for p in peaks) + (steps - len(peaks)),
        "over_budget_at": [i + 1 for i, p in enumerate(peaks) if p > ctx.budget],
        "state_from_step": next((i + 1 for i, present in enumerate(has_state) if present), None),
        "aborted": aborted,
    }


ROLES = {
    "truth": role_truth,
    "truth-edge": role_truth_edge,
    "batchlab": role_batchlab,
    "lightning-power": lambda ctx, args: role_lightning(ctx, args, "power"),
    "lightning-binsearch": lambda ctx, args: role_lightning(ctx, args, "binsearch"),
    "accelerate": role_accelerate,
    "ultralytics": role_ultralytics,
}


def worker(args) -> None:
    """Entry point of one role's process: set up, run the role, run the check, write JSON to ``--out``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    ctx = setup(args.workload, args.device, args.capacity)
    result = run_role_here(ctx, args.worker, args)
    Path(args.out).write_text(json.dumps(result, default=str))


def run_role_here(ctx: Context, role: str, args) -> dict[str, Any]:
    """Run one role in this process, then (for a tool) the check at its answer, while its objects live."""
    start_bytes = ctx.meter.current()
    result = ROLES[role](ctx, args)
    keep = result.pop("_keep", None)  # noqa: F841 - the tool's objects stay alive through the check
    if not role.startswith("truth") and args.check_steps > 0:
        result["check"] = check(ctx, result["answer"], args.check_steps)
    result.update(
        role=role,
        workload=ctx.name,
        device=ctx.device,
        capacity=ctx.capacity,
        budget=ctx.budget,
        fingerprint=ctx.fingerprint,
        start_bytes=start_bytes,
    )
    return result


# ---------------------------------------------------------------------------------------------------------
# The orchestrator: one process per role, then the table
# ---------------------------------------------------------------------------------------------------------


def run_role(
    args, role: str, workload: str, device: str, capacity: int, logdir: Path, start: int = 0
) -> dict[str, Any]:
    out = logdir / f"{device}-{workload}-{capacity}-{role}.json"
    log_path = out.with_suffix(".log")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        role,
        "--workload",
        workload,
        "--device",
        device,
        "--capacity",
        str(capacity),
        "--check-steps",
        str(args.check_steps),
        "--accelerate-start",
        str(args.accelerate_start),
        "--threads",
        str(args.threads),
        "--out",
        str(out),
        "--start",
        str(start),
    ]
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
        if not args.onednn_cache:
            env.update(ONEDNN_CACHE_OFF)
    started = time.perf_counter()
    with open(log_path, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not out.exists():
        tail = log_path.read_text().splitlines()[-25:]
        print(f"  {role}: FAILED (exit {code}); last lines of {log_path}:", *tail, sep="\n    ", flush=True)
        return {"role": role, "workload": workload, "error": f"exit {code}", "log": str(log_path)}
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - started
    check_text = ""
    if "check" in result:
        c = result["check"]
        check_text = f", check max {format_bytes(c['max_peak'])} ({c['over_budget_steps']} over)"
    print(
        f"  {role:20s} answer {result['answer']:>5}  {result['seconds']:7.1f} s  {result['steps']:3d} steps"
        f"{check_text}  [{result['process_seconds']:.0f} s in all]",
        flush=True,
    )
    return result


def run_suite(args, device: str, capacities: list[tuple[str, int, str]], tools: list[str]) -> list[dict]:
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="autobatch-"))
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {logdir}", flush=True)
    rows = []
    for workload, capacity, label in capacities:
        budget = int(capacity * FRACTION)
        print(f"\n{workload} on {label}: budget {format_bytes(budget)} (0.90 x {format_bytes(capacity)})")
        truth = run_role(args, "truth", workload, device, capacity, logdir)
        if "answer" in truth:
            edge = run_role(args, "truth-edge", workload, device, capacity, logdir, start=truth["answer"])
            if "answer" in edge:
                truth["bisection_process_answer"] = truth["answer"]
                truth["answer"] = edge["answer"]
                truth["edge_walk"] = edge
        results = {}
        for tool in tools:
            if tool == "ultralytics" and workload not in IMAGE_WORKLOADS:
                continue
            results[tool] = run_role(args, tool, workload, device, capacity, logdir)
        rows.append({"workload": workload, "card": label, "truth": truth, "tools": results})
    return rows


def run_cuda(args, cards: list[int], workloads: list[str], tools: list[str], write) -> list[dict]:
    """CUDA: every role for every (card, workload) in this one process, a card at a time.

    On the GPU the counters are the caching allocator's, which ``empty_cache`` and ``reset_peak_memory_stats``
    bring back to what is live, so roles can share a process (a fresh process per role would spend most of a
    GPU check's few minutes importing). Between roles: the starting state restored, a failed backward's
    leftovers flushed, the cache emptied. The table and JSON are rewritten after each card, so a run cut by
    a timeout keeps what it finished.
    """
    rows = []
    for card in cards:
        for workload in workloads:
            capacity = card * 2**30
            label = f"{card} GiB card"
            print(f"\n{workload} on a {label}: budget {format_bytes(int(capacity * FRACTION))}", flush=True)
            ctx = setup(workload, "cuda", capacity)
            results: dict[str, dict] = {}
            for role in ["truth", *tools]:
                if role == "ultralytics" and workload not in IMAGE_WORKLOADS:
                    continue
                ctx.restore()
                flush_autograd("cuda")
                torch.cuda.empty_cache()
                try:
                    results[role] = run_role_here(ctx, role, args)
                except Exception as exc:  # one tool's failure must not cost the others their run
                    results[role] = {
                        "role": role,
                        "workload": workload,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                    print(f"  {role}: FAILED: {results[role]['error'][:300]}", flush=True)
                    continue
                r = results[role]
                print(
                    f"  {role:20s} answer {r['answer']:>6}  {r['seconds']:7.1f} s  {r['steps']:3d} steps",
                    flush=True,
                )
            truth = results.pop("truth", {})
            rows.append({"workload": workload, "card": label, "truth": truth, "tools": results})
            del ctx
            gc.collect()
            torch.cuda.empty_cache()
        write(rows)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One flat record per (workload, tool), with the ratios the issue asks for."""
    table = []
    for row in rows:
        truth = row["truth"].get("answer")
        reference = row["tools"].get("lightning-binsearch", {}).get("seconds")
        for tool, r in row["tools"].items():
            if "error" in r:
                table.append(
                    {"workload": row["workload"], "card": row["card"], "tool": tool, "error": r["error"]}
                )
                continue
            c = r.get("check", {})
            table.append(
                {
                    "workload": row["workload"],
                    "card": row["card"],
                    "budget": r["budget"],
                    "tool": tool,
                    "answer": r["answer"],
                    "true_max": truth,
                    "ratio": r["answer"] / truth if truth else None,
                    "seconds": r["seconds"],
                    "vs_binsearch": r["seconds"] / reference if reference else None,
                    "steps": r["steps"],
                    "sizes": len(r.get("step_times", [])),  # distinct batch sizes the tool ran
                    "ooms": r.get("ooms"),
                    "check_max_peak": c.get("max_peak"),
                    "check_over_budget_steps": c.get("over_budget_steps"),
                    "check_over_budget_at": c.get("over_budget_at"),
                    "check_state_from_step": c.get("state_from_step"),
                    "same_start": r["fingerprint"] == row["truth"].get("fingerprint"),
                }
            )
    return table


def markdown(table: list[dict], check_steps: int) -> str:
    lines = [
        "| workload | budget | tool | answer | true max | ÷ true max | wall s | ÷ binsearch | steps | sizes "
        f"| OOMs | {check_steps}-step max peak | within budget |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in table:
        if "error" in t:
            lines.append(f"| {t['workload']} | {t['card']} | {t['tool']} | error: {t['error']} |||||||||||")
            continue
        over = t["check_over_budget_steps"]
        at = t.get("check_over_budget_at") or []
        where = f" (step {', '.join(map(str, at[:3]))}{', ...' if len(at) > 3 else ''})" if at else ""
        verdict = "yes" if over == 0 else ("—" if over is None else f"**no: {over} over{where}**")
        lines.append(
            f"| {t['workload']} | {format_bytes(t['budget'])} ({t['card']}) | {t['tool']} | {t['answer']} | "
            f"{t['true_max']} | {t['ratio']:.2f} | {t['seconds']:.1f} | "
            f"{'—' if t['vs_binsearch'] is None else format(t['vs_binsearch'], '.2f')} | {t['steps']} | "
            f"{t['sizes']} | {t['ooms']} | "
            f"{format_bytes(t['check_max_peak']) if t['check_max_peak'] else '—'} | {verdict} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What produced the numbers (provenance.py), with the search module's hash: the code every tool is held to."""
    return provenance(
        ("lightning", "accelerate", "batchlab", "ultralytics"), files=("src/batchlab/fit/search.py",)
    )


def parse_capacities(specs: list[str], workloads: list[str]) -> dict[str, int]:
    capacities = {name: parse_bytes(CPU_CAPACITY.get(name, "1GiB")) for name in workloads}
    for spec in specs:
        if "=" in spec:
            name, _, value = spec.partition("=")
            capacities[name.strip()] = parse_bytes(value)
        else:
            capacities = {name: parse_bytes(spec) for name in workloads}
    return capacities


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cuda", action="store_true", help="the same as --device cuda")
    parser.add_argument(
        "--workloads", default=None, help="comma-separated (default: " + ",".join(CPU_WORKLOADS) + ")"
    )
    parser.add_argument(
        "--capacity",
        action="append",
        default=[],
        help="CPU: NAME=SIZE, or SIZE for all (default: "
        + ", ".join(f"{k}={v}" for k, v in CPU_CAPACITY.items())
        + "); the budget is 0.9 x this",
    )
    parser.add_argument("--cards", default=",".join(map(str, CUDA_CARDS_GIB)), help="CUDA: emulated GiB")
    parser.add_argument("--tools", default=None, help="comma-separated subset of the tools")
    parser.add_argument(
        "--check-steps",
        type=int,
        default=None,
        help=f"default: {CHECK_STEPS} (CPU), {CUDA_CHECK_STEPS} (CUDA)",
    )
    parser.add_argument(
        "--accelerate-start", type=int, default=None, help="default: 1024 (CPU), 65536 (CUDA)"
    )
    # One thread: the machine is shared, and with its 2 cores busy, 2 OpenMP threads ran slower and noisier
    # than 1 (measured: cnn b=32 0.57-0.99 s vs 0.61-0.73 s per step); the same for every tool.
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads per process (default 1)")
    parser.add_argument(
        "--onednn-cache",
        action="store_true",
        help="CPU: keep oneDNN's and PyTorch's per-shape caches (default: off, ONEDNN_CACHE_OFF)",
    )
    parser.add_argument(
        "--json", default=None, help="where to write the results (default: benchmarks/results/)"
    )
    parser.add_argument("--logdir", default=None, help="keep per-process logs and JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cuda:
        args.device = "cuda"
    if args.check_steps is None:
        args.check_steps = CHECK_STEPS if args.device == "cpu" else CUDA_CHECK_STEPS
    args.accelerate_start = args.accelerate_start or ACCELERATE_START[args.device]
    if args.worker:
        args.capacity = int(args.capacity[0])
        worker(args)
        return

    started = time.perf_counter()
    env = environment()
    tools = args.tools.split(",") if args.tools else list(CPU_TOOLS)
    default_dir = Path(os.environ["BATCHLAB_OUT"]) if os.environ.get("BATCHLAB_OUT") else ROOT / "results"
    out = Path(args.json) if args.json else default_dir / f"autobatch-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> list[dict]:
        table = summarise(rows)
        env["seconds"] = time.perf_counter() - started
        env["load_average_at_end"] = os.getloadavg()
        out.write_text(json.dumps({"environment": env, "table": table, "runs": rows}, indent=1, default=str))
        return table

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
        workloads = args.workloads.split(",") if args.workloads else list(CUDA_WORKLOADS)
        total = torch.cuda.get_device_properties(0).total_memory
        cards = [int(c) for c in args.cards.split(",") if int(c) * 2**30 <= total]
        if not args.tools:
            with contextlib.suppress(ImportError):
                import ultralytics  # noqa: F401

                tools.append("ultralytics")
        env["gpu"] = torch.cuda.get_device_name(0)
        env["check_steps"] = args.check_steps

        def write_and_print(rows: list[dict]) -> None:
            print("\n" + markdown(write(rows), args.check_steps), flush=True)

        rows = run_cuda(args, cards, workloads, tools, write_and_print)
    else:
        env["per_shape_caches"] = "default" if args.onednn_cache else ONEDNN_CACHE_OFF
        env["check_steps"] = args.check_steps
        workloads = args.workloads.split(",") if args.workloads else list(CPU_WORKLOADS)
        caps = parse_capacities(args.capacity, workloads)
        capacities = [(w, caps[w], f"{format_bytes(caps[w])} capacity") for w in workloads]
        rows = run_suite(args, args.device, capacities, tools)
    table = write(rows)
    print("\n" + markdown(table, args.check_steps))
    print(f"\ntotal wall time: {env['seconds'] / 60:.1f} min")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
