"""What the exact readings' allocator cost a CPU sweep and the profile's timings, and what training's gets back.

Usage (from the repository root, with the project's virtualenv; ~5 min on 2 cores):

    OMP_NUM_THREADS=1 python benchmarks/sweep_allocator.py                 # prints a markdown table
    OMP_NUM_THREADS=1 python benchmarks/sweep_allocator.py --rounds 1      # a quick smoke run

Measuring memory on the CPU sets glibc's mmap threshold to 64 KiB (batchlab.devices.cpu): exact, linear
readings, and a slower step. Until 2026-12-07 a sweep's runs trained on that device, so every CPU sweep ran
under it. Two rows per (task, batch):

- ``sweep``: one run of the built-in sweep task, ``--steps`` steps, its own process (the allocator is
  process-wide). ``exact``: the runner's device as before (``CPUDevice.for_training`` patched to return the
  exact device); ``training``: as shipped (``for_training()``: glibc's speed back). samples/s over the run's
  timed steps, as the sweep reports it.
- ``profile``: ``batchlab.profile`` of the ``mlp-digits`` workload at the same batch sizes, each in its own
  process: ``exact``, the profile before 2026-12-07 16:00 (timed on its measuring device: ``for_training``
  patched as above); ``training``: as shipped (memory read first, exact, then timed on ``for_training()``).
  This is the curve ``advise`` reads on the CPU. Each profile also prints its peaks, which must not move:
  both read every peak before anything runs at speed.

Runs are interleaved (every configuration once per round, modes alternating), ``--rounds`` rounds; the table
gives each mode's median over rounds and the ratio training / exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

SWEEP = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    from batchlab.devices.cpu import CPUDevice
    mode, task, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "exact":
        CPUDevice.for_training = lambda self: self  # the runner's device before 2026-12-07
    torch.set_num_threads(1)
    from batchlab.sweeps import sweep
    from batchlab.workloads.tasks import load_task
    result = sweep(load_task(task), [batch], lr=1e-3, budget=steps, directory=tempfile.mkdtemp(),
                   tracking_uri=False, report=False)
    print(json.dumps(result.runs[0].throughput))
    """
)

PROFILE = textwrap.dedent(
    """
    import json, sys
    import torch
    import batchlab
    from batchlab.devices.cpu import CPUDevice
    from batchlab.workloads import load_workload
    mode, sizes = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
    torch.set_num_threads(1)
    if mode == "exact":
        CPUDevice.for_training = lambda self: self  # the profile's timing device before 2026-12-07 16:00
    result = batchlab.profile(load_workload("mlp-digits"), device="cpu", batch_sizes=sizes, seconds_per_point=1.0)
    print(json.dumps({p.batch_size: [p.samples_per_second, p.peak_bytes] for p in result.points}))
    """
)

MODES = ("exact", "training")


def _run(code: str, *args: str) -> object:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mlp-digits,mnist1d,char-lm")
    parser.add_argument("--batches", default="16,64,256,1024")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tasks, batches = args.tasks.split(","), [int(b) for b in args.batches.split(",")]
    sweeps: dict[tuple[str, int, str], list[float]] = {}
    profiles: dict[tuple[int, str], list[float]] = {}
    peaks: dict[tuple[int, str], list[int]] = {}
    for round_index in range(args.rounds):
        order = MODES if round_index % 2 == 0 else MODES[::-1]
        for task in tasks:
            for b in batches:
                for mode in order:
                    speed = _run(SWEEP, mode, task, str(b), str(args.steps))
                    sweeps.setdefault((task, b, mode), []).append(speed)
                    print(
                        f"round {round_index + 1} sweep {task} b={b} {mode}: {speed:,.0f} samples/s",
                        file=sys.stderr,
                    )
        for mode in order:
            for b, (speed, peak) in _run(PROFILE, mode, args.batches).items():
                profiles.setdefault((int(b), mode), []).append(speed)
                peaks.setdefault((int(b), mode), []).append(peak)
    print("| what | batch | exact samples/s | training samples/s | training / exact |")
    print("|---|---:|---:|---:|---:|")
    for task in tasks:
        for b in batches:
            exact, fast = (statistics.median(sweeps[(task, b, m)]) for m in MODES)
            print(f"| sweep {task} | {b} | {exact:,.0f} | {fast:,.0f} | {fast / exact:.2f}x |")
    for b in batches:
        exact, fast = (statistics.median(profiles[(b, m)]) for m in MODES)
        print(f"| profile mlp-digits | {b} | {exact:,.0f} | {fast:,.0f} | {fast / exact:.2f}x |")
    if "mlp-digits" in tasks:
        print(
            "\n| batch | profile / sweep, exact | profile / sweep, training | peak MiB exact | peak MiB training |"
        )
        print("|---:|---:|---:|---|---|")
        for b in batches:
            ratios = [
                statistics.median(profiles[(b, m)]) / statistics.median(sweeps[("mlp-digits", b, m)])
                for m in MODES
            ]
            mib = [", ".join(f"{p / 2**20:.1f}" for p in peaks[(b, m)]) for m in MODES]
            print(f"| {b} | {ratios[0]:.2f}x | {ratios[1]:.2f}x | {mib[0]} | {mib[1]} |")


if __name__ == "__main__":
    main()
