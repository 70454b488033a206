"""What measuring the gradient noise scale costs: step time with and without the tracker, side by side.

Usage (from the repository root, with the project's virtualenv):

    python benchmarks/noise_overhead.py                              # CPU, the four built-ins (~3-5 min)
    python benchmarks/noise_overhead.py --workloads mlp-digits --reps 5   # a quick smoke run
    python benchmarks/noise_overhead.py --append-results             # also append a section to RESULTS.md
    python benchmarks/noise_overhead.py --device cuda                # on a GPU

Per built-in workload, six variants of one optimizer step over the same ``accum x micro`` samples:

- ``a plain``:     gradient accumulation, ``accum`` micro-batches (loss / accum), then ``optimizer.step()``;
- ``a tracked``:   the same with :class:`~batchlab.noise.AccumulationCollector` -- one fused norm per
                   backward (batchlab.noise.backward_norms) plus ``gns.step()`` (one device sync) per optimizer
                   step. Target: <= 3% over plain (issue 13, item 5);
- ``a every``:     the same collector measuring one optimizer step in ``--every`` (hooks removed in between:
                   ``AccumulationCollector(every=k)``); its overhead is a ratio of *mean* step times, since
                   the median would pick only the unmeasured steps;
- ``a before``:    the collector before issue 13 (a norm and a dot product per tensor in each tensor hook,
                   :class:`_HooksBefore` below): the same run's before/after;
- ``c plain``:     one batch of ``accum x micro`` samples, one forward/backward (no accumulation);
- ``c halves``:    the same batch as two plain half micro-batches (what the split costs without the tracker);
- ``c tracked``:   :class:`~batchlab.noise.SplitBatchCollector` -- the batch as two halves with the hooks.
                   Its cost over ``c plain`` is mostly the second, smaller forward/backward, not the hooks.

Method: every variant gets its own copy of the model and optimizer (same starting weights) and the same
pre-built batches (the data pipeline is not in the step, so the ratios are an upper bound for a real loop).
Repetitions are interleaved -- each repetition runs ``--steps`` steps of every variant, in an order rotated
by one each time -- so drift and noisy neighbours hit all variants alike. The first repetition is warm-up and
dropped (allocator, lazy init, Adam's state creation). Each step is timed on its own between device
synchronisations (CUDA: the clock must include queued kernels); the figures are medians over the remaining
steps, and overheads are ratios of medians. On the CPU each step is timed in process CPU time -- with one
torch thread (``--threads``, default 1) that is less sensitive to the neighbours than wall time (not immune: caches and memory bandwidth are
shared), and more threads would oversubscribe a shared machine's cores -- and in wall time beside it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from batchlab.noise import AccumulationCollector, SplitBatchCollector
from batchlab.workload.workload import Workload
from batchlab.workloads import load_workload
from provenance import load_average, machine_line

ACCUM = 4  # micro-batches per optimizer step for collector (a): a common accumulation factor
TARGET_A = 0.03  # the target: collector (a) costs at most 3% of a step
# micro-batch per workload: a CPU step of tens to hundreds of milliseconds (the GPU gets 8x larger micro-batches)
MICRO_CPU = {"mlp-digits": 64, "cnn": 4, "resnet": 4, "gpt": 2}
VARIANTS = ("a plain", "a tracked", "a every", "a before", "c plain", "c halves", "c tracked")
EVERY = 8  # collector (a) sampled: one optimizer step measured in 8 (--every)
RESULTS = Path(__file__).with_name("RESULTS.md")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: the step's kernels must finish before the clock is read


class _HooksBefore:
    """The accumulation collector's norms as they were before issue 13 (git b9bfe84): per tensor per backward,
    |Δ|² and ⟨Δ, .grad⟩ in the tensor hook, summed at step(). Kept here only as the benchmark's reference."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.sq: list[torch.Tensor] = []
        self.cross: list[torch.Tensor] = []
        self.handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            self.sq.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())
            acc = self.params[i].grad
            if acc is not None:
                self.cross.append(torch.dot(g.reshape(-1).float(), acc.detach().reshape(-1).float()))

        return hook

    def step(self) -> list[float]:
        totals = [torch.stack(v).sum() if v else torch.zeros(()) for v in (self.sq, self.cross)]
        self.sq, self.cross = [], []
        return torch.stack(totals).tolist()  # the one sync

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Variant:
    """One way to run the step, with its own model copy, optimizer and (for tracked variants) collector."""

    def __init__(self, name: str, workload: Workload, batches: list, micro: int, every: int = EVERY):
        self.name = name
        # one deepcopy of both keeps the optimizer pointing at the copied parameters (fresh: no state yet)
        self.model, self.optimizer = copy.deepcopy((workload.model, workload.optimizer))
        self.loss_fn = workload.loss_fn
        self.batches = batches  # (inputs, targets) of accum x micro samples each, on the device
        self.micro = micro
        self.times: list[float] = []  # wall seconds per step
        self.cpu_times: list[float] = []  # process CPU seconds per step
        self.rep_cpu: list[list[float]] = []  # process CPU seconds per step, one list per timed repetition
        self.rep_wall: list[list[float]] = []
        self.tensors = sum(1 for p in self.model.parameters() if p.requires_grad)
        self.gns = None
        params = list(self.model.parameters())
        if name == "a tracked":
            self.gns = AccumulationCollector(params, micro)
        elif name == "a every":
            self.gns = AccumulationCollector(params, micro, every=every)
        elif name == "a before":
            self.gns = _HooksBefore(params)
        elif name == "c tracked":
            self.gns = SplitBatchCollector(params)
        self._next = 0

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x), y)

    def step(self) -> None:
        x, y = self.batches[self._next % len(self.batches)]
        self._next += 1
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.name in ("a plain", "a tracked", "a every", "a before"):
            for i in range(ACCUM):
                s = slice(i * self.micro, (i + 1) * self.micro)
                (self._loss(x[s], y[s]) / ACCUM).backward()
            if self.gns is not None:
                self.gns.step()
        elif self.name == "c plain":
            self._loss(x, y).backward()
        elif self.name == "c halves":
            half = (x.shape[0] + 1) // 2
            for s in (slice(0, half), slice(half, None)):
                (self._loss(x[s], y[s]) * (x[s].shape[0] / x.shape[0])).backward()
        else:  # "c tracked"
            self.gns.backward(self._loss, x, y)
        self.optimizer.step()

    def close(self) -> None:
        if self.gns is not None:
            self.gns.close()


def measure(
    name: str,
    device: str,
    micro: int,
    reps: int,
    steps: int,
    log: Callable[[str], None],
    every: int = EVERY,
) -> dict[str, object]:
    """Interleaved repetitions of every variant; medians of per-step times after the warm-up repetition."""
    torch.manual_seed(0)
    workload = load_workload(name, device=device)
    dev = workload.device
    batches = [workload.make_batch(ACCUM * micro) for _ in range(4)]
    variants = [Variant(v, workload, batches, micro, every) for v in VARIANTS]
    try:
        for rep in range(reps):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]  # rotate
            for variant in order:
                variant.rep_cpu.append([])
                variant.rep_wall.append([])
                for _ in range(steps):
                    _sync(dev)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    variant.step()
                    _sync(dev)
                    if rep > 0:  # repetition 0 is warm-up: dropped
                        variant.times.append(time.perf_counter() - start)
                        variant.cpu_times.append(time.process_time() - cpu_start)
                        variant.rep_wall[-1].append(variant.times[-1])
                        variant.rep_cpu[-1].append(variant.cpu_times[-1])
            log(f"  {name}: repetition {rep + 1}/{reps}")
    finally:
        for variant in variants:
            variant.close()
    # On the CPU with one torch thread, process CPU time is what the step itself costs, whatever the
    # neighbours do; wall time is reported beside it. On CUDA only wall time means anything.
    use_cpu_time = dev.type == "cpu"
    wall = {v.name: statistics.median(v.times) for v in variants}
    cpu = {v.name: statistics.median(v.cpu_times) for v in variants}
    med = cpu if use_cpu_time else wall
    by = {v.name: v for v in variants}

    def paired(
        tracked: str, plain: str, clock: str = "cpu" if use_cpu_time else "wall", centre=statistics.median
    ) -> list[float]:
        """Per timed repetition: centre of tracked steps / centre of plain steps of that same repetition - 1."""
        a = getattr(by[tracked], f"rep_{clock}")[1:]  # repetition 0 (warm-up) holds no times
        b = getattr(by[plain], f"rep_{clock}")[1:]
        return sorted(centre(x) / centre(y) - 1 for x, y in zip(a, b))

    a_pairs, a_wall = paired("a tracked", "a plain"), paired("a tracked", "a plain", "wall")
    before_pairs = paired("a before", "a plain")
    every_pairs = paired("a every", "a plain", centre=statistics.fmean)
    added = med["a tracked"] - med["a plain"]
    hook_calls = by["a tracked"].tensors * ACCUM  # hook firings per optimizer step
    return {
        "workload": name,
        "micro": micro,
        "samples": ACCUM * micro,
        "tensors": by["a tracked"].tensors,
        "steps_timed": len(variants[0].times),
        "clock": "process CPU time" if use_cpu_time else "wall time",
        "median_s": med,
        "wall_median_s": wall,
        "overhead_a": statistics.median(a_pairs),
        "overhead_a_iqr": _quartiles(a_pairs),
        "overhead_a_wall": statistics.median(a_wall),
        "every": every,
        "overhead_every": statistics.median(every_pairs),
        "overhead_every_iqr": _quartiles(every_pairs),
        "overhead_before": statistics.median(before_pairs),
        "overhead_before_iqr": _quartiles(before_pairs),
        "added_a_s": added,
        "per_hook_s": added / hook_calls,
        "overhead_c": statistics.median(paired("c tracked", "c plain")),
        "overhead_c_vs_halves": statistics.median(paired("c tracked", "c halves")),
    }


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _hook_cost(rows: list[dict]) -> tuple[float, str]:
    """Seconds per hook call, from the workload with the smallest step: there the hooks' cost stands out of
    the timing noise (on larger steps the difference of two noisy medians is mostly noise)."""
    cheapest = min(rows, key=lambda r: r["median_s"]["a plain"])
    return cheapest["per_hook_s"], cheapest["workload"]


def _predicted(r: dict, per_hook: float) -> float:
    return r["tensors"] * ACCUM * per_hook / r["median_s"]["a plain"]


def table(rows: list[dict]) -> str:
    per_hook, _ = _hook_cost(rows)
    head = (
        "| workload | step samples | param tensors | (a) plain ms | (a) tracked ms | (a) overhead [IQR] "
        "| (a) every k-th step [IQR] | (a) before issue 13 [IQR] "
        "| (a) wall-time overhead | (a) per hook call | (a) predicted | (c) plain ms | (c) halves ms "
        "| (c) tracked ms | (c) vs plain | (c) vs halves |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"| {r['workload']} | {r['samples']} ({ACCUM}x{r['micro']}) | {r['tensors']} | "
            f"{m['a plain'] * 1e3:.2f} | {m['a tracked'] * 1e3:.2f} | {r['overhead_a']:+.1%} "
            f"[{r['overhead_a_iqr'][0]:+.1%}, {r['overhead_a_iqr'][1]:+.1%}] | k={r['every']}: "
            f"{r['overhead_every']:+.1%} [{r['overhead_every_iqr'][0]:+.1%}, {r['overhead_every_iqr'][1]:+.1%}] | "
            f"{r['overhead_before']:+.1%} "
            f"[{r['overhead_before_iqr'][0]:+.1%}, {r['overhead_before_iqr'][1]:+.1%}] | {r['overhead_a_wall']:+.1%} | "
            f"{r['per_hook_s'] * 1e6:.0f} us | {_predicted(r, per_hook):+.1%} | {m['c plain'] * 1e3:.2f} | "
            f"{m['c halves'] * 1e3:.2f} | {m['c tracked'] * 1e3:.2f} | {r['overhead_c']:+.1%} | "
            f"{r['overhead_c_vs_halves']:+.1%} |"
        )
    return head + "\n".join(lines) + "\n"


def _against_target(rows: list[dict], key: str) -> list[str]:
    """Each workload's overhead ``key`` sorted into within / above / not resolved by its IQR against 3%."""
    within, above, unresolved = [], [], []
    for r in rows:
        lo, hi = r[f"{key}_iqr"]
        label = f"{r['workload']} {r[key]:+.1%}"
        (within if hi <= TARGET_A else above if lo > TARGET_A else unresolved).append(label)
    parts = []
    if within:
        parts.append(f"within the {TARGET_A:.0%} target: {', '.join(within)}")
    if above:
        parts.append(f"ABOVE it: {', '.join(above)}")
    if unresolved:
        parts.append(
            f"not resolved at this run's noise (the IQR of paired ratios spans {TARGET_A:.0%}): {', '.join(unresolved)}"
        )
    return parts


def verdict(rows: list[dict]) -> str:
    parts = _against_target(rows, "overhead_a")
    sampled = _against_target(rows, "overhead_every")
    per_hook, source = _hook_cost(rows)
    predicted = ", ".join(f"{r['workload']} {_predicted(r, per_hook):+.1%}" for r in rows)
    a = (
        f"Collector (a) measured -- {'; '.join(parts)}. Its cost is per hooked parameter tensor and "
        f"micro-batch, not per sample: about {per_hook * 1e6:.0f} us a hook call here (on {source}, the "
        f"smallest step, where it stands out of the noise), so the overhead is ~(tensors x accumulation x "
        f"that) / step time; predicted that way: {predicted}. Measuring one step in {rows[0]['every']} "
        f"(every={rows[0]['every']}) -- {'; '.join(sampled)}."
    )
    c_lo = min(r["overhead_c"] for r in rows)
    c_hi = max(r["overhead_c"] for r in rows)
    h_hi = max(r["overhead_c_vs_halves"] for r in rows)
    c = (
        f" Collector (c) costs {c_lo:+.0%}..{c_hi:+.0%} over one full-batch step -- the price of running the "
        f"batch as two halves (a second, smaller forward/backward); over two plain halves its hooks add at "
        f"most {h_hi:+.1%}. Use (a) whenever the loop accumulates; (c) for a short measurement, not every step."
    )
    return a + c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(MICRO_CPU), help="comma-separated built-ins")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions (the first is warm-up)")
    parser.add_argument(
        "--steps", type=int, default=8, help="steps per variant per repetition (a multiple of --every)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--every", type=int, default=EVERY, help=f"the sampled variant's k (default {EVERY})")
    parser.add_argument("--append-results", action="store_true", help=f"append a section to {RESULTS.name}")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if args.reps < 2 or args.steps < 1 or args.every < 1 or args.steps % args.every:
        parser.error(
            "--reps must be >= 2 (the first is warm-up), --steps and --every >= 1, and --steps a multiple of "
            "--every (so that every repetition holds the same share of measured steps)"
        )
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    scale = 8 if args.device.startswith("cuda") else 1
    started_at = datetime.datetime.now().astimezone()
    about = f"{machine_line(args.device)}; load average at start {load_average()}"
    rows = []
    started = time.perf_counter()
    for name in names:
        if name not in MICRO_CPU:
            parser.error(f"unknown workload {name!r}: expected some of {', '.join(MICRO_CPU)}")
        print(f"{name} ...", file=sys.stderr)
        rows.append(
            measure(name, args.device, MICRO_CPU[name] * scale, args.reps, args.steps, print_err, args.every)
        )
    seconds = time.perf_counter() - started
    out = table(rows)
    text = verdict(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": about, "seconds": seconds, "rows": rows}, indent=2))
    print(out)
    print(text)
    if args.append_results:
        command = "python benchmarks/noise_overhead.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        section = (
            f"\n## Noise-scale tracker overhead ({started_at:%Y-%m-%d %H:%M %Z})\n\n"
            f"- Machine: {about}\n- Command: `{command.strip()}` ({seconds:.0f} s)\n"
            f"- Method: per workload, {len(VARIANTS)} step variants over the same samples, each with its own model copy; "
            f"{args.reps} interleaved repetitions x {args.steps} steps (rotated order, the first repetition "
            f"dropped as warm-up); medians of per-step {rows[0]['clock']} (ms columns; on the CPU with one "
            f"torch thread it is less sensitive to the neighbours' load than wall time, not immune: shared caches "
            f"and memory bandwidth still vary); the (a) overhead is the median over repetitions of the paired "
            f"ratio tracked/plain within each repetition - 1, with its interquartile range; the prediction "
            f"column applies the per-hook-call cost measured on the smallest step to each workload's tensor "
            f"count. Batches are "
            f"pre-built (no data pipeline in the step), so the ratios are upper bounds for a real loop.\n\n"
            f"{out}\n**Verdict:** {text}\n"
        )
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n")
        with RESULTS.open("a") as f:
            f.write(section)
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


def print_err(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
