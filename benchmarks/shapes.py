"""The shape search against one search per shape and against the true maximum of each shape (issue 12, item 1).

Usage (from the repository root, with the project's virtualenv)::

    python benchmarks/shapes.py                       # 5 lengths 128..2048, ~10-20 min on a shared 2-core CPU
    python benchmarks/shapes.py --room-mib 300 --shapes 128,256,512

The workload: a small byte-level transformer language model (vocabulary 256, width 64, 2 pre-norm blocks of
2-head causal self-attention from ``nn.MultiheadAttention``, context 2048, AdamW, next-token loss) whose
``make_batch(b, shape=L)`` draws random bytes of length ``L``. Its memory per sample has both terms the peak
model fits: activations linear in ``L`` and attention scores in ``L^2``.

The budget is the process as it stands plus ``--room-mib`` of step memory, at the default fraction (0.90),
held against the whole process's peak resident memory -- exactly what ``find_batch_size(memory_budget=...)``
does on the CPU (no emulated out-of-memory error: an over-budget probe is a measured miss).

Three measurements, in this order, in one process:

1. **table**: ``find_batch_size(workload, shapes=[...], memory_budget=B)``, its probes in all;
2. **single**: ``find_batch_size(workload.with_shape(L), memory_budget=B)`` once per shape -- the search a user
   would otherwise run per shape, its probes each;
3. **truth** per shape, found independently: from the larger of the two answers, one more sample at a time, a
   fixed-batch check (``batch=b``, two real steps from the user's state, the same budget) until one does not
   fit; the truth is the last size that fit (and if the larger answer itself does not fit again, the walk
   goes down instead).

With ``--estimate`` both are also run seeded from fake tensors, like for like: first
``batchlab.planning.estimate_memory_lines`` (its time and the resident memory it adds are recorded, and the budget
is set after it, so every search and the truth see the same process), then the **seeded table**
(``estimate=lines``) before the plain one, and per shape the **seeded single** search
(``estimate=lines[L]``) after the plain one.

Targets (issue 12): the table's probes <= 2x one single-shape search, every entry >= 0.97 of its truth.
Writes ``benchmarks/results/shapes.json`` and prints the table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a source tree, no install

from batchlab import Workload, find_batch_size  # noqa: E402
from batchlab.devices import CPUDevice  # noqa: E402
from batchlab.planning import estimate_memory_lines  # noqa: E402
from provenance import machine_line  # noqa: E402

MiB = 2**20
FRACTION = 0.9  # find_batch_size's default: the budget is 0.9 x the memory_budget given
SHAPES = (128, 256, 512, 1024, 2048)
VOCAB, WIDTH, DEPTH, HEADS, CONTEXT = 256, 64, 2, 2, 2048


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (eager: its L x L scores are kept for backward) and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def workload() -> Workload:
    torch.manual_seed(0)

    def make_batch(batch_size: int, shape: int = CONTEXT):
        if shape > CONTEXT:
            raise ValueError(f"the context is {CONTEXT} tokens, shorter than {shape}")
        tokens = torch.randint(0, VOCAB, (batch_size, shape + 1))
        return tokens[:, :-1], tokens[:, 1:]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    return Workload(ByteLM(), make_batch, loss_fn, lambda p: torch.optim.AdamW(p, lr=3e-4), name="byte-lm")


def fits(work: Workload, batch_size: int, budget: int) -> bool:
    """A fixed-batch check at the search's own budget (fixed checks hold the budget itself, no fraction)."""
    return find_batch_size(work, device="cpu", batch=batch_size, memory_budget=budget).fits


def truth(work: Workload, start: int, budget: int) -> tuple[int, int]:
    """(the largest size that fits, checks run), walking one sample at a time from ``start``."""
    checks = 1
    if fits(work, start, budget):
        size = start
        while True:
            checks += 1
            if not fits(work, size + 1, budget):
                return size, checks
            size += 1
    size = start - 1
    while size > 1:
        checks += 1
        if fits(work, size, budget):
            return size, checks
        size -= 1
    return size, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(map(str, SHAPES)))
    parser.add_argument("--room-mib", type=float, default=400.0, help="step memory above the process (MiB)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "shapes.json"))
    parser.add_argument(
        "--estimate", action="store_true", help="also run the table and singles seeded by a plan"
    )
    args = parser.parse_args()
    shapes = [int(s) for s in args.shapes.split(",")]
    torch.set_num_threads(2)
    work = workload()
    cpu = CPUDevice()
    lines, plan = None, {}
    if args.estimate:
        before, started = cpu.in_use_bytes(), time.perf_counter()
        lines = estimate_memory_lines(work, shapes, device_type="cpu")
        plan = {"seconds": time.perf_counter() - started, "resident_mib": (cpu.in_use_bytes() - before) / MiB}
        print(f"plan: {plan['seconds']:.1f} s, +{plan['resident_mib']:.1f} MiB resident", flush=True)
    memory_budget = int((cpu.in_use_bytes() + args.room_mib * MiB) / FRACTION)

    def timed_table(estimate):
        started = time.perf_counter()
        table = find_batch_size(
            work, device="cpu", memory_budget=memory_budget, shapes=shapes, estimate=estimate
        )
        print(table.summary(), flush=True)
        return table, time.perf_counter() - started

    seeded, seeded_seconds = timed_table(lines) if lines else (None, None)
    table, table_seconds = timed_table(None)
    budget = table.budget_bytes

    rows = []
    for index, entry in enumerate(table.entries):
        shaped = work.with_shape(entry.shape)
        started = time.perf_counter()
        single = find_batch_size(shaped, device="cpu", memory_budget=memory_budget)
        single_seconds = time.perf_counter() - started
        row = {
            "shape": entry.shape,
            "table_batch": entry.batch_size,
            "predicted": entry.predicted_batch_size,
            "table_probes": len(entry.result.probes),
            "table_sizes": [p.batch_size for p in entry.result.probes],
            "single_batch": single.batch_size,
            "single_probes": len(single.probes),
            "single_sizes": [p.batch_size for p in single.probes],
            "single_seconds": single_seconds,
        }
        answers = [entry.batch_size, single.batch_size]
        if seeded is not None:
            seeded_entry = seeded.entries[index]
            single_seeded = find_batch_size(
                shaped, device="cpu", memory_budget=memory_budget, estimate=lines[entry.shape]
            )
            row.update(
                seeded_batch=seeded_entry.batch_size,
                seeded_predicted=seeded_entry.predicted_batch_size,
                seeded_probes=len(seeded_entry.result.probes),
                seeded_sizes=[p.batch_size for p in seeded_entry.result.probes],
                single_seeded_batch=single_seeded.batch_size,
                single_seeded_probes=len(single_seeded.probes),
                single_seeded_sizes=[p.batch_size for p in single_seeded.probes],
            )
            answers += [seeded_entry.batch_size, single_seeded.batch_size]
        true_max, checks = truth(shaped, max(answers), budget)
        row.update(truth=true_max, truth_checks=checks, table_vs_truth=entry.batch_size / true_max,
                   single_vs_truth=single.batch_size / true_max)  # fmt: skip
        if seeded is not None:
            row.update(seeded_vs_truth=row["seeded_batch"] / true_max)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)

    singles = [row["single_probes"] for row in rows]
    summary = {
        "machine": machine_line(),
        "memory_budget": memory_budget,
        "budget_bytes": budget,
        "room_mib": args.room_mib,
        "shapes": shapes,
        "table_probes": table.probes,
        "table_seconds": table_seconds,
        "single_probes_median": statistics.median(singles),
        "single_probes_mean": statistics.mean(singles),
        "single_probes_total": sum(singles),
        "ratio_to_mean_single": table.probes / statistics.mean(singles),
        "ratio_to_median_single": table.probes / statistics.median(singles),
        "worst_table_vs_truth": min(row["table_vs_truth"] for row in rows),
        "model": table.model.to_dict() if table.model else None,
        "order": table.order,
        "rows": rows,
    }
    if seeded is not None:
        singles_seeded = [row["single_seeded_probes"] for row in rows]
        summary.update(
            plan=plan,
            seeded_table_probes=seeded.probes,
            seeded_table_seconds=seeded_seconds,
            single_seeded_probes_mean=statistics.mean(singles_seeded),
            single_seeded_probes_total=sum(singles_seeded),
            seeded_ratio_to_mean_single=seeded.probes / statistics.mean(singles),
            seeded_ratio_to_mean_single_seeded=seeded.probes / statistics.mean(singles_seeded),
            worst_seeded_vs_truth=min(row["seeded_vs_truth"] for row in rows),
            seeded_model=seeded.model.to_dict() if seeded.model else None,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print()
    print(
        "| shape | table batch | predicted | table probes | single batch | single probes | truth | table/truth |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['shape']} | {row['table_batch']} | {row['predicted'] if row['predicted'] else '-'} | "
            f"{row['table_probes']} | {row['single_batch']} | {row['single_probes']} | {row['truth']} | "
            f"{row['table_vs_truth']:.3f} |"
        )
    print(
        f"\ntable: {table.probes} probes in {table_seconds:.0f} s; one search per shape: {sum(singles)} probes "
        f"(median {statistics.median(singles)} per shape); ratio to one search (mean) "
        f"{summary['ratio_to_mean_single']:.2f}; worst entry/truth {summary['worst_table_vs_truth']:.3f}"
    )
    if seeded is not None:
        print(
            f"seeded table: {seeded.probes} probes in {seeded_seconds:.0f} s after a {plan['seconds']:.0f} s plan "
            f"(+{plan['resident_mib']:.0f} MiB resident); seeded singles: {summary['single_seeded_probes_total']} "
            f"probes; ratio to the mean single {summary['seeded_ratio_to_mean_single']:.2f}, to the mean seeded "
            f"single {summary['seeded_ratio_to_mean_single_seeded']:.2f}; worst entry/truth "
            f"{summary['worst_seeded_vs_truth']:.3f}"
        )


if __name__ == "__main__":
    main()
