"""How close is the fake-tensor estimate to what a training step really takes -- and what does it save a search?

Part 1, accuracy (``--part accuracy``): for each built-in workload at several batch sizes, the fake device's
estimate of two training steps (from a fresh optimizer, as every probe runs) against

- **CPU measured**: the CPU device's step-memory increase, peak minus baseline of the process's resident
  memory (VmHWM after clear_refs, glibc's mmap threshold fixed at 64 KiB -- see devices/cpu.py). This is
  what a real search compares with its budget, so the +-5% target is held against it. Each size is run once
  to warm up (oneDNN primitive caches, lazily created kernels), then measured twice; the median is used.
- **MemTracker real**: torch's MemTracker on the real tensors, same accounting as the fake run but real
  data: it separates "fake tensors differ from real ones" (should be 0%) from "RSS holds more than tensors"
  (allocator overhead, oneDNN scratch).
- **CUDA** (``--cuda``, on a GPU machine): ``max_memory_allocated`` and ``max_memory_reserved`` increases
  against the fake CUDA estimate's allocated and reserved peaks, and the CUDA context measured as
  ``(total - free) - memory_reserved`` after the steps (what targets.CUDA_CONTEXT_BYTES assumes).

The fake side counts the increase too: its peak minus the tensors that existed before the step (parameters,
buffers).

Part 3, recurrent layers (``--part recurrent``): the issue-10 classifiers -- embedding 256, a 2-layer LSTM or
GRU of hidden 512 over 64 steps, Adam -- in the same three columns, then ``plan`` for a 1 GiB CPU target and
MemTracker on real tensors at the planned batch. With ``--cuda`` on a GPU machine, the same steps measured on
the card (cuDNN) next to the fake CPU estimate: the fake CUDA run refuses cuDNN's RNN kernel, so this is the
one place to see how far the CPU kernels' memory (what an emulated CUDA plan counts) is from cuDNN's.

Part 2, search (``--part search``): probes and wall time of ``find_batch_size`` on the CPU with and without
``estimate=estimate_memory_line(...)``, for real workloads under a memory budget, and over simulated memory
shapes whose estimated slope is off by -10%..+10% (how robust the seeded jump is).

Run: ``python benchmarks/plan_accuracy.py [--part accuracy|search|recurrent|all] [--cuda] [--quick]``.
Machines here are shared and noisy: times are wall clock of one run, memory is exact (VmHWM).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a source tree, no install

from batchlab import FakeTensorError, Workload, find_batch_size
from batchlab.devices import CPUDevice, SimulatedDevice
from batchlab.fit import MemoryLine  # noqa: E402
from batchlab.planning.fake import FakeDevice, _torch_internals  # noqa: E402
from batchlab.planning.plan import estimate_memory_line, plan  # noqa: E402
from batchlab.workloads import load_workload  # noqa: E402
from provenance import machine_line  # noqa: E402

MiB = 2**20
GiB = 2**30

SIZES = {"mlp-digits": (64, 256, 1024), "cnn": (8, 32, 128), "resnet": (8, 16, 32), "gpt": (4, 8, 16)}
QUICK_SIZES = {"mlp-digits": (64, 256), "cnn": (8, 32), "resnet": (8, 16), "gpt": (4, 8)}
RECURRENT_SIZES = {"LSTM": (32, 64, 128), "GRU": (32, 64)}  # the GRU runs step by step: ~10 s a step at 64
QUICK_RECURRENT_SIZES = {"LSTM": (32, 64), "GRU": (32,)}


class RecurrentClassifier(torch.nn.Module):
    """Issue 10's classifier: tokens -> embedding 256 -> a 2-layer ``cell`` of hidden 512 -> the last step's logits."""

    def __init__(self, cell: type[torch.nn.RNNBase]):
        super().__init__()
        self.embed = torch.nn.Embedding(10_000, 256)
        self.rnn = cell(256, 512, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(512, 10)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def recurrent_workload(cell_name: str, device: str = "cpu") -> Workload:
    """The classifier over 64-step sequences with Adam, on ``device``."""
    torch.manual_seed(0)
    return Workload(
        RecurrentClassifier(getattr(torch.nn, cell_name)).to(device),
        lambda b: (
            torch.randint(0, 10_000, (b, 64), device=device),
            torch.randint(0, 10, (b,), device=device),
        ),
        torch.nn.functional.cross_entropy,
        lambda params: torch.optim.Adam(params, lr=1e-3),
        name=f"{cell_name.lower()}-classifier",
    )


def fake_increase(device: FakeDevice, batch_size: int) -> tuple[int, int, float]:
    """(peak - baseline, allocated - baseline, seconds) of the fake estimate."""
    estimate = device.estimate(batch_size)
    return (
        estimate.peak_bytes - estimate.baseline_bytes,
        estimate.allocated_bytes - estimate.baseline_bytes,
        estimate.seconds,
    )


def memtracker_increase(workload, batch_size: int) -> int:
    """torch's MemTracker on the real tensors: peak total minus the tensors before the step."""
    tracker = _torch_internals()["MemTracker"]()
    tracker.track_external(workload.model, workload.optimizer)
    snapshot = workload.snapshot()
    original = workload.make_batch

    def make_batch(b):
        tracker.reset_mod_stats()  # MemTracker refuses a second root forward without it
        return original(b)

    workload.make_batch = make_batch
    try:
        start = sum(
            v for k, v in next(iter(tracker.get_tracker_snapshot("current").values())).items() if k != "Total"
        )
        with tracker:
            for _ in range(2):
                workload.step(batch_size)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    finally:
        workload.make_batch = original
        snapshot.restore()
    return int(peak - start)


def cpu_increase(workload, batch_size: int, device: CPUDevice) -> int:
    """Median peak-minus-baseline of two measured runs after one warm-up run."""
    snapshot = workload.snapshot()
    readings = []
    try:
        for attempt in range(3):
            measurement = device.run(workload.step, batch_size, 2)
            snapshot.restore()
            if attempt:  # attempt 0 warms up: oneDNN primitives, first-call allocations
                readings.append(measurement.peak_bytes - measurement.baseline_bytes)
    finally:
        snapshot.restore()
    return int(statistics.median(readings))


def cuda_increase(workload, batch_size: int) -> tuple[int, int, int]:
    """(max_memory_allocated, max_memory_reserved) increases over two steps, and the CUDA context estimate."""
    snapshot = workload.snapshot()
    try:
        workload.step(batch_size)  # warm-up: cuBLAS handle and workspace, cuDNN autotuning
        snapshot.restore()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        for _ in range(2):
            workload.step(batch_size)
        torch.cuda.synchronize()  # peaks are read after the queued work ran
        peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        context = (total - free) - torch.cuda.memory_reserved()  # other processes count here too
    finally:
        snapshot.restore()
    return peak_allocated - allocated, peak_reserved - reserved, context


def pct(estimate: float, measured: float) -> str:
    return f"{100 * (estimate - measured) / measured:+.1f}%" if measured else "n/a"


def accuracy(sizes: dict[str, tuple[int, ...]], with_cuda: bool) -> list[float]:
    errors = []
    device = CPUDevice()
    print(
        "| workload | batch | fake (MiB) | CPU measured (MiB) | error | MemTracker real (MiB) | error | fake s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch_sizes in sizes.items():
        workload = load_workload(name, device="cpu")
        fake = FakeDevice(workload, device_type="cpu")
        for b in batch_sizes:
            estimate, _, seconds = fake_increase(fake, b)
            measured = cpu_increase(workload, b, device)
            tracked = memtracker_increase(workload, b)
            errors.append((estimate - measured) / measured)
            print(
                f"| {name} | {b} | {estimate / MiB:.1f} | {measured / MiB:.1f} | {pct(estimate, measured)} "
                f"| {tracked / MiB:.1f} | {pct(estimate, tracked)} | {seconds:.2f} |"
            )
    print(
        f"\nCPU: max |error| {100 * max(map(abs, errors)):.1f}%, median |error| "
        f"{100 * statistics.median(map(abs, errors)):.1f}% over {len(errors)} (workload, batch) pairs"
    )
    if with_cuda:
        if not torch.cuda.is_available():
            print("--cuda: no CUDA device here; skipped")
            return errors
        print(
            "\n| workload | batch | fake alloc (MiB) | max_allocated (MiB) | error | fake reserved (MiB) | max_reserved (MiB) | error | context (MiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, batch_sizes in sizes.items():
            workload = load_workload(name, device="cuda")
            fake = FakeDevice(workload, device_type="cuda")
            for b in batch_sizes:
                reserved_est, allocated_est, _ = fake_increase(fake, b)
                allocated, reserved, context = cuda_increase(workload, b)
                print(
                    f"| {name} | {b} | {allocated_est / MiB:.1f} | {allocated / MiB:.1f} | {pct(allocated_est, allocated)} "
                    f"| {reserved_est / MiB:.1f} | {reserved / MiB:.1f} | {pct(reserved_est, reserved)} | {context / MiB:.0f} |"
                )
            del workload, fake
            torch.cuda.empty_cache()
    return errors


def recurrent(sizes: dict[str, tuple[int, ...]], with_cuda: bool) -> None:
    """Part 3: the LSTM and GRU classifiers, estimate against the CPU and MemTracker, and a 1 GiB CPU plan."""
    device = CPUDevice()
    print(
        "| workload | batch | fake (MiB) | CPU measured (MiB) | error | MemTracker real (MiB) | error | fake s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell, batch_sizes in sizes.items():
        workload = recurrent_workload(cell)
        fake = FakeDevice(workload, device_type="cpu")
        for b in batch_sizes:
            estimate, _, seconds = fake_increase(fake, b)
            measured = cpu_increase(workload, b, device)
            tracked = memtracker_increase(workload, b)
            print(
                f"| {workload.name} | {b} | {estimate / MiB:.1f} | {measured / MiB:.1f} | {pct(estimate, measured)} "
                f"| {tracked / MiB:.1f} | {pct(estimate, tracked)} | {seconds:.2f} |"
            )
    print(
        "\n| workload | plan for 1 GiB (CPU) | estimated peak (MiB) | MemTracker real at that batch (MiB) | budget (MiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for cell in sizes:
        workload = recurrent_workload(cell)
        result = plan(workload, "1GiB", device_type="cpu")
        before = sum(p.numel() * p.element_size() for p in workload.model.parameters())
        real = memtracker_increase(workload, result.batch_size) + before
        print(
            f"| {workload.name} | {result.batch_size} | {result.peak_bytes / MiB:.1f} | {real / MiB:.1f} "
            f"| {result.budget_bytes / MiB:.1f} |"
        )
    if not with_cuda:
        return
    if not torch.cuda.is_available():
        print("--cuda: no CUDA device here; skipped")
        return
    print(
        "\n| workload | batch | fake CPU estimate (MiB) | max_allocated (MiB) | max_reserved (MiB) | fake CUDA run |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for cell, batch_sizes in sizes.items():
        workload, cpu_workload = recurrent_workload(cell, "cuda"), recurrent_workload(cell)
        try:
            FakeDevice(workload, device_type="cuda").estimate(batch_sizes[0])
            refused = "ran"
        except FakeTensorError as exc:
            refused = f"refused: {exc.op}"
        for b in batch_sizes:
            estimate, _, _ = fake_increase(FakeDevice(cpu_workload, device_type="cpu"), b)
            allocated, reserved, _ = cuda_increase(workload, b)
            print(
                f"| {workload.name} | {b} | {estimate / MiB:.1f} | {allocated / MiB:.1f} | {reserved / MiB:.1f} "
                f"| {refused} |"
            )
        del workload
        torch.cuda.empty_cache()


def seeded_search_real(quick: bool, reps: int = 2) -> None:
    """find_batch_size on the CPU with and without the fake estimate, same budget, same process.

    The two are interleaved (none, line, line, none, ...) and the median wall time is quoted; "samples run"
    (the probed sizes times their two steps) is the load-independent cost: CPU step time grows with the batch.
    """
    cases = {"cnn": 500 * MiB, "gpt": 600 * MiB} if not quick else {"cnn": 250 * MiB}
    print(
        "| workload | budget room | estimate | probes | sizes probed | answer | samples run | search s (median) | line s |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    device = CPUDevice()
    for name, room in cases.items():
        workload = load_workload(name, device="cpu")
        budget = int((device.in_use_bytes() + room) / 0.9)  # the default fraction (0.9) applies to the budget
        started = time.perf_counter()
        line = estimate_memory_line(workload, device_type="cpu")
        line_seconds = time.perf_counter() - started
        runs: dict[str, list] = {"none": [], "fake line": []}
        for rep in range(reps):
            order = ("none", "fake line") if rep % 2 == 0 else ("fake line", "none")
            for label in order:
                estimate = line if label == "fake line" else None
                runs[label].append(
                    find_batch_size(workload, device=device, memory_budget=budget, estimate=estimate)
                )
        for label, results in runs.items():
            result = results[0]
            sizes = ", ".join(str(p.batch_size) for p in result.probes)
            samples = sum(p.batch_size * p.steps for p in result.probes)
            seconds = statistics.median(r.search_seconds for r in results)
            print(
                f"| {name} | {room / MiB:.0f} MiB | {label} | {len(result.probes)} | {sizes} | {result.batch_size} "
                f"| {samples} | {seconds:.1f} | {line_seconds if label == 'fake line' else 0:.1f} |"
            )


def seeded_search_simulated(shapes: int = 300, seed: int = 0) -> None:
    """Probe counts over random simulated memory shapes, the estimate's slope off by a known factor."""
    rng = random.Random(seed)
    results: dict[str, list[int]] = {"none": []}
    factors = (0.9, 0.95, 1.0, 1.05, 1.1)
    for factor in factors:
        results[f"x{factor:.2f}"] = []
    for _ in range(shapes):
        capacity = 80 * GiB
        fixed = rng.uniform(0.05, 0.6) * capacity
        per_sample = math.exp(rng.uniform(math.log(1e-6), math.log(0.05))) * capacity
        memory = lambda b, f=fixed, s=per_sample: math.ceil((f + s * b) / (2 * MiB)) * 2 * MiB  # noqa: E731
        if memory(2) > 0.9 * capacity:
            continue
        for label in results:
            factor = 1.0 if label == "none" else float(label[1:])
            estimate = None if label == "none" else MemoryLine(0.0, per_sample * factor)
            result = find_batch_size(
                lambda b: None, device=SimulatedDevice(memory, capacity), estimate=estimate
            )
            results[label].append(len(result.probes))
    print("| estimate slope | shapes | median probes | max probes |")
    print("|---|---:|---:|---:|")
    for label, counts in results.items():
        what = "none" if label == "none" else f"true slope {label}"
        print(f"| {what} | {len(counts)} | {statistics.median(counts):.0f} | {max(counts)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("accuracy", "search", "recurrent", "all"), default="all")
    parser.add_argument(
        "--cuda", action="store_true", help="also compare against the CUDA allocator (GPU needed)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes and cases")
    args = parser.parse_args()
    print(
        f"# plan_accuracy -- {time.strftime('%Y-%m-%d')} -- {machine_line('cuda' if args.cuda else 'cpu')}\n"
    )
    if args.part in ("accuracy", "all"):
        accuracy(QUICK_SIZES if args.quick else SIZES, args.cuda)
    if args.part in ("search", "all"):
        print()
        seeded_search_real(args.quick)
        print()
        seeded_search_simulated()
    if args.part in ("recurrent", "all"):
        print()
        recurrent(QUICK_RECURRENT_SIZES if args.quick else RECURRENT_SIZES, args.cuda)


if __name__ == "__main__":
    main()
