"""What the profile's interleaved timing rounds cost (issue 13 item 6): each extra round repeats every fitting
size's ``WARMUP_STEPS`` dropped steps and a state restore.

Per data set (the built-in tasks advise_check.py checks), the sizes advise profiles (one fit search, reused),
then ``--pairs`` pairs of :func:`batchlab.profile` at advise's 0.2 s a size with ``rounds=1`` and ``rounds=4`` on
those sizes, the order within a pair alternating. Per profile: its wall time, the seconds in its timed steps, and
the rest (warm-ups, restores, bookkeeping) -- the overhead the extra rounds add is the rest's difference -- and
each size's reading as advise takes it on the CPU (the 10th percentile of its timed steps, ms), so the same pairs
also compare the two timings' readings under whatever load the machine has. Medians over the pairs; the machine's
1-minute load at the start and end. One torch thread; run with ``nice -n 5``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from batchlab.advice.pipeline import CPU_STEP_QUANTILE
from batchlab.profiling.analysis import sample_quantile
from batchlab.profiling.api import profile
from batchlab.workloads.tasks import Task

HERE = Path(__file__).resolve().parent
SECONDS_PER_POINT = 0.2  # advise's (advice.pipeline.ADVISE_SECONDS_PER_POINT)


def one(workload, sizes: list[int], rounds: int) -> dict:
    started = time.perf_counter()
    result = profile(
        workload, device="cpu", batch_sizes=sizes, seconds_per_point=SECONDS_PER_POINT, rounds=rounds
    )
    wall = time.perf_counter() - started
    timed = sum(sum(p.step_times) for p in result.points)
    steps = sum(len(p.step_times) for p in result.points)
    readings = {
        str(p.batch_size): 1e3 * sample_quantile(p.step_times, CPU_STEP_QUANTILE) for p in result.points
    }
    return {"rounds": rounds, "wall": wall, "timed": timed, "rest": wall - timed, "timed_steps": steps,
            "reading_ms": readings}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mlp-digits,mnist1d")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "rounds_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {"load_average_start": os.getloadavg()[0], "seconds_per_point": SECONDS_PER_POINT, "datasets": {}}
    for name in args.datasets.split(","):
        workload = Task(name, noise_every=0)(32, 1e-3, 0).workload()
        first = profile(workload, device="cpu", seconds_per_point=SECONDS_PER_POINT, rounds=1)
        sizes = [p.batch_size for p in first.points if p.fits and p.step_times]
        runs = []
        for pair in range(args.pairs):
            for rounds in (1, 4) if pair % 2 == 0 else (4, 1):
                runs.append(one(workload, sizes, rounds))
        summary = {}
        for rounds in (1, 4):
            mine = [r for r in runs if r["rounds"] == rounds]
            summary[str(rounds)] = {
                k: statistics.median(r[k] for r in mine) for k in ("wall", "timed", "rest", "timed_steps")
            }
            summary[str(rounds)]["reading_ms"] = {
                str(b): statistics.median(r["reading_ms"][str(b)] for r in mine) for b in sizes
            }
        extra = summary["4"]["rest"] - summary["1"]["rest"]
        out["datasets"][name] = {"sizes": sizes, "runs": runs, "median": summary, "extra_rest_seconds": extra,
                                 "extra_per_size_round_ms": 1e3 * extra / (3 * len(sizes))}  # fmt: skip
        print(
            json.dumps({"dataset": name, "sizes": sizes, **summary, "extra_rest_seconds": extra}), flush=True
        )
    out["load_average_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
