"""Issue 12 items 2-3: one epoch of real variable-length text with the token-budget sampler vs a fixed batch.

The data: the standard library's own source cut into documents (batchlab.workloads.corpus), each cut at
``--max-length`` bytes (2048 by default: a context limit; about one document in five is longer). The model: a
byte-level TinyGPT with AdamW (batchlab.workloads.text). Side by side, in one process:

1. The shape table: the largest batch per padded length (``--lengths``), one real CPU search over shapes,
   ``find_batch_size(workload, shapes=lengths)``, against one memory budget (``--headroom`` above the
   process's memory now, at 0.9); each entry verified by real steps, within 3% of its length's own maximum.
2. The token budget from the table (batchlab.fit.tokens.token_budget), and two loaders over the same documents:
   - ``sampler``: TokenBudgetBatchSampler (length buckets, padding counted) + PadCollator;
   - ``fixed``: the batch sized for the longest document (the table's entry at ``--max-length``), shuffled,
     each batch padded to its own longest sample (dynamic padding, as Hugging Face's DataCollatorWithPadding).
3. One full epoch of each, interleaved step by step on two copies of the model (same initial weights; the
   copy's Adam state is created before the search so the search sees the process as the epoch will), every step's
   peak memory read as the search reads it (the process's peak resident memory, batchlab.devices.CPUDevice),
   and its time.

Reported: steps per epoch, real tokens per second (padding not counted), the mean batch's share of the token
budget, padding, and steps whose peak went over the memory budget (0 expected).

    nice -n 5 python benchmarks/token_budget.py --json benchmarks/results/token_budget.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import datetime, timezone

import psutil
import torch
from torch.utils.data import DataLoader

from batchlab import Workload, find_batch_size
from batchlab.devices import CPUDevice
from batchlab.fit.tokens import token_budget
from batchlab.training.sampler import PadCollator, TokenBudgetBatchSampler
from batchlab.workloads.corpus import stdlib_corpus
from batchlab.workloads.text import IGNORE_INDEX, DocumentDataset, text_lm
from provenance import machine_line

MiB = 2**20


def shape_table(workload: Workload, lengths: list[int], memory_budget: int) -> dict[int, dict]:
    """The largest batch per padded length: one ``find_batch_size(..., shapes=lengths)`` (issue 12, item 1)."""
    table = find_batch_size(workload, device="cpu", memory_budget=memory_budget, shapes=lengths)
    rows = {}
    for entry in table.entries:
        result = entry.result
        rows[entry.shape] = {
            "batch_size": result.batch_size,
            "predicted": entry.predicted_batch_size,
            "peak_mib": result.peak_bytes / MiB,
            "budget_mib": result.budget_bytes / MiB,
            "budget_bytes": result.budget_bytes,
            "probes": len(result.probes),
            "sizes": [probe.batch_size for probe in result.probes],
            "seconds": result.search_seconds,
        }
        print(
            f"  length {entry.shape}: largest batch {result.batch_size} ({len(result.probes)} probes)",
            flush=True,
        )
    print(f"  {table.probes} probes in all, {table.search_seconds:.0f} s (order {table.order})", flush=True)
    return rows


def prepare_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create the copy's Adam state now (one tiny step), then put its weights back and zero the state in
    place: Adam from zero moments at step 0 updates exactly as a fresh Adam does."""
    initial = copy.deepcopy(model.state_dict())
    inputs = torch.randint(0, 256, (1, 16))
    logits = model(inputs)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs.reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.load_state_dict(initial)
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


class Run:
    """One training run over a loader: its steps measured one at a time."""

    def __init__(self, name: str, workload: Workload, loader: DataLoader, max_tokens: int, budget_bytes: int):
        self.name, self.workload, self.iterator = name, workload, iter(loader)
        self.max_tokens, self.budget_bytes = max_tokens, budget_bytes
        self.device = CPUDevice()
        self.steps: list[dict] = []

    def step(self) -> bool:
        try:
            inputs, targets = next(self.iterator)
        except StopIteration:
            return False
        work = self.workload
        losses = []

        def train(_: int) -> None:
            work.begin_step()
            loss = work.loss((inputs, targets))
            work.backward(loss)
            work.finish_step()
            losses.append(float(loss.detach()))

        measurement = self.device.run(train, len(inputs), 1)
        self.steps.append(
            {
                "batch": len(inputs),
                "padded_length": inputs.shape[1],
                "padded_tokens": inputs.numel(),
                "real_tokens": int((targets != IGNORE_INDEX).sum()),
                "seconds": measurement.seconds,
                "peak_bytes": measurement.peak_bytes,
                "loss": losses[0],
            }
        )
        return True

    def summary(self) -> dict:
        steps = self.steps
        seconds = sum(s["seconds"] for s in steps)
        real = sum(s["real_tokens"] for s in steps)
        padded = sum(s["padded_tokens"] for s in steps)
        return {
            "steps": len(steps),
            "samples": sum(s["batch"] for s in steps),
            "real_tokens": real,
            "padded_tokens": padded,
            "padding_share": 1 - real / padded,
            "seconds": seconds,
            "real_tokens_per_second": real / seconds,
            "mean_batch": statistics.mean(s["batch"] for s in steps),
            "mean_budget_share": statistics.mean(s["padded_tokens"] for s in steps) / self.max_tokens,
            "max_padded_tokens": max(s["padded_tokens"] for s in steps),
            "max_peak_mib": max(s["peak_bytes"] for s in steps) / MiB,
            "steps_over_budget": sum(s["peak_bytes"] > self.budget_bytes for s in steps),
            "last_tenth_mean_loss": statistics.mean(s["loss"] for s in steps[-max(len(steps) // 10, 1) :]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-files", type=int, default=40, help="standard-library files to read")
    parser.add_argument("--max-length", type=int, default=2048, help="documents are cut at this many bytes")
    parser.add_argument(
        "--lengths",
        default="256,384,512,768,1024,1536,2048",
        help="padded lengths to search (x1.5 apart: the budget is about min B_i L_{i-1})",
    )
    parser.add_argument(
        "--headroom-mib", type=int, default=96, help="the memory budget above the process now"
    )
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    started = time.perf_counter()
    workload = text_lm(
        max_length=args.max_length, max_files=args.max_files, width=args.width, depth=args.depth
    )
    fixed_model = copy.deepcopy(workload.model)
    fixed_optimizer = torch.optim.AdamW(fixed_model.parameters(), lr=1e-3)
    prepare_copy(fixed_model, fixed_optimizer)
    fixed_workload = Workload(
        fixed_model, workload.make_batch, workload.loss_fn, fixed_optimizer, name="fixed"
    )
    data = DocumentDataset(stdlib_corpus(max_files=args.max_files).train, args.max_length)

    memory_budget = int((psutil.Process().memory_info().rss + args.headroom_mib * MiB) / 0.9)
    print(f"shape table ({len(data)} documents, {sum(data.lengths)} tokens):", flush=True)
    table = shape_table(workload, lengths, memory_budget)
    budget_bytes = min(entry["budget_bytes"] for entry in table.values())
    tokens = token_budget({length: entry["batch_size"] for length, entry in table.items()})
    fixed_batch = table[args.max_length]["batch_size"]
    print(
        f"token budget {tokens.max_tokens} (cap {tokens.max_batch_size}); fixed batch {fixed_batch}",
        flush=True,
    )

    collate = PadCollator(pad_values={1: IGNORE_INDEX})
    sampler = TokenBudgetBatchSampler.from_budget(data.lengths, tokens, seed=0)
    runs = [
        Run("sampler", workload, DataLoader(data, batch_sampler=sampler, collate_fn=collate), tokens.max_tokens,
            budget_bytes),
        Run("fixed", fixed_workload, DataLoader(data, batch_size=fixed_batch, shuffle=True, collate_fn=collate,
            generator=torch.Generator().manual_seed(0)), fixed_batch * args.max_length, budget_bytes),
    ]  # fmt: skip
    epoch_started = time.perf_counter()
    active = list(runs)
    while active:  # interleaved: one step of each in turn, so both see the same machine load
        active = [run for run in active if run.step()]
    summaries = {run.name: run.summary() for run in runs}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_line(),
        "args": vars(args),
        "documents": len(data),
        "document_tokens": sum(data.lengths),
        "documents_cut": sum(length == args.max_length for length in data.lengths),
        "memory_budget_mib": budget_bytes / MiB,
        "table": table,
        "token_budget": tokens.to_dict(),
        "bucket_batch_size": tokens.lhotse_buckets(),
        "fixed_batch": fixed_batch,
        "runs": summaries,
        "speedup_real_tokens_per_second": summaries["sampler"]["real_tokens_per_second"]
        / summaries["fixed"]["real_tokens_per_second"],
        "epoch_seconds": time.perf_counter() - epoch_started,
        "total_seconds": time.perf_counter() - started,
        "steps": {run.name: run.steps for run in runs},
    }
    for name, summary in summaries.items():
        print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    print(
        f"speedup (real tokens/s): {results['speedup_real_tokens_per_second']:.2f}x; total {results['total_seconds']:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
