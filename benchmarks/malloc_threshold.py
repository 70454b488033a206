"""What glibc's mmap threshold costs a CPU training step: untouched, batchlab's exact 64 KiB, and fast_allocator().

Usage (from the repository root, with the project's virtualenv; ~2 minutes):

    python benchmarks/malloc_threshold.py                # cnn at 32, gpt at 8; 3 interleaved rounds

Each measurement is a fresh interpreter (the threshold is process-wide and cannot be unset), one thread, three
warm-up steps dropped, the median of 15 timed steps. The three modes run interleaved, round after round, so
that the machine's drift lands on all of them alike; the table gives each mode's median over rounds and its
ratio to the untouched process. Readings of one CNN step at batch 2 are printed beside it (MiB above the
baseline), to show what each mode's memory readings are worth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, torch
from batchlab.devices.cpu import CPUDevice, fast_allocator
from batchlab.workloads import load_workload
mode, name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
device = CPUDevice() if mode != "untouched" else None  # making the device sets the exact allocator
workload = load_workload(name)
snapshot = workload.snapshot()
if mode == "fast after exact":
    device.run(workload.step, batch, 2); snapshot.restore()  # a measurement, as a search makes
    fast_allocator()
for _ in range(3):
    workload.step(batch)
times = []
for _ in range(15):
    start = time.perf_counter(); workload.step(batch); times.append(time.perf_counter() - start)
snapshot.restore()
reading = None
if device is not None:
    cnn = load_workload("cnn"); copy = cnn.snapshot()
    measured = device.run(cnn.step, 2, 2); copy.restore()
    reading = (measured.peak_bytes - measured.baseline_bytes) / 2**20
print(json.dumps({"seconds": statistics.median(times), "reading_mib": reading}))
"""

MODES = ("untouched", "exact", "fast after exact")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="cnn:32,gpt:8", help="name:batch,...")
    args = parser.parse_args(argv)
    cases = [(name, int(batch)) for name, batch in (item.split(":") for item in args.workloads.split(","))]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name, batch in cases:
            for mode in MODES:
                out = subprocess.run([sys.executable, "-c", CHILD, mode, name, str(batch)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                results.setdefault((name, mode), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| workload | mode | step (s, median of rounds) | vs untouched | CNN b=2 reading (MiB) |")
    print("|---|---|---:|---:|---:|")
    for name, batch in cases:
        base = statistics.median(r["seconds"] for r in results[(name, "untouched")])
        for mode in MODES:
            runs = results[(name, mode)]
            seconds = statistics.median(r["seconds"] for r in runs)
            readings = [r["reading_mib"] for r in runs if r["reading_mib"] is not None]
            reading = f"{statistics.median(readings):.2f}" if readings else "n/a"
            print(f"| {name} b={batch} | {mode} | {seconds:.3f} | {seconds / base:.2f} | {reading} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
