"""The token-budget batch sampler and the padding collator: within the budget, padding counted, seeded,
usable with a DataLoader; a sample longer than the searched lengths is refused with its index. And issue 12
item 3 on real text: one full epoch of a byte-level LM on the standard library's source, with the budget taken
from a measured shape table (``find_batch_size(..., shapes=...)``) -- no step over the memory budget, batches filled to >= 85% of the budget."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from batchlab.fit.tokens import token_budget
from batchlab.training.sampler import PadCollator, TokenBudgetBatchSampler
from batchlab.workloads.text import IGNORE_INDEX
from conftest import in_a_fresh_process

LENGTHS = [5, 70, 12, 33, 100, 64, 7, 90, 41, 18, 55, 99, 3, 27, 80]


def test_every_batch_keeps_to_the_budget_and_the_cap_and_every_sample_comes_once():
    sampler = TokenBudgetBatchSampler(LENGTHS, 200, max_batch_size=4, buckets=3, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    for batch in batches:
        assert len(batch) * max(LENGTHS[i] for i in batch) <= 200 and len(batch) <= 4
    assert len(batches) == len(TokenBudgetBatchSampler(LENGTHS, 200, max_batch_size=4, buckets=3, seed=1))


def test_shuffling_is_seeded_its_own_and_new_each_epoch():
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    a = TokenBudgetBatchSampler(LENGTHS, 200, buckets=3, seed=7)
    b = TokenBudgetBatchSampler(LENGTHS, 200, buckets=3, seed=7)
    first, second = list(a), list(a)
    assert first == list(b) and second == list(b)  # the same seed, the same epochs
    assert first != second  # the next epoch is shuffled anew
    a.set_epoch(0)
    assert list(a) == first
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG was not drawn from
    ordered = list(TokenBudgetBatchSampler(LENGTHS, 10_000, shuffle=False))  # all 15 fit in one batch
    assert ordered == [sorted(range(len(LENGTHS)), key=LENGTHS.__getitem__)]  # short to long, unshuffled


def test_with_a_dataloader_and_the_padding_collator():
    data = [(torch.arange(n), torch.arange(n) + 1, n % 3) for n in LENGTHS]
    sampler = TokenBudgetBatchSampler([len(x) for x, _, _ in data], 200, buckets=2)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=PadCollator(pad_values={1: IGNORE_INDEX}))
    seen = 0
    for inputs, targets, labels in loader:
        assert inputs.shape == targets.shape and inputs.shape[0] * inputs.shape[1] <= 200
        assert labels.shape == (inputs.shape[0],)
        assert (targets == IGNORE_INDEX).sum() == (inputs == 0).sum() - inputs.shape[0]  # padded positions
        seen += inputs.shape[0]
    assert seen == len(data) and len(loader) == len(sampler.batches(sampler.epoch - 1))
    batch = PadCollator()([{"ids": torch.ones(2)}, {"ids": torch.ones(4)}])
    assert batch["ids"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_a_sample_longer_than_the_searched_lengths_is_an_error_naming_it():
    budget = token_budget({32: 8, 64: 4})
    with pytest.raises(
        ValueError,
        match=r"sample 1 has length 70, longer than the longest searched length \(max_length\) 64 \(5 such samples\)",
    ):
        TokenBudgetBatchSampler.from_budget(LENGTHS, budget)
    with pytest.raises(ValueError, match="sample 4 has length 100, longer than max_tokens 99"):
        TokenBudgetBatchSampler(LENGTHS, 99)
    with pytest.raises(ValueError, match="invalid length of sample 2 0: expected an int >= 1"):
        TokenBudgetBatchSampler([3, 4, 0], 99)
    with pytest.raises(ValueError, match=r"invalid lengths \[\]"):
        TokenBudgetBatchSampler([], 99)
    with pytest.raises(TypeError, match="budget must be a batchlab.fit.tokens.TokenBudget"):
        TokenBudgetBatchSampler.from_budget(LENGTHS, 200)


ONE_EPOCH = """
import json

import psutil
import torch
from torch.utils.data import DataLoader

from batchlab import find_batch_size
from batchlab.devices import CPUDevice
from batchlab.fit.tokens import token_budget
from batchlab.training.sampler import PadCollator, TokenBudgetBatchSampler
from batchlab.workloads.corpus import stdlib_corpus
from batchlab.workloads.text import IGNORE_INDEX, DocumentDataset, text_lm

torch.manual_seed(0)
workload = text_lm(max_length=512, max_files=12, width=16, depth=1, heads=1)
budget = int((psutil.Process().memory_info().rss + 48 * 2**20) / 0.9)  # 48 MiB above now, at 0.9
table = find_batch_size(workload, device="cpu", memory_budget=budget, shapes=[256, 512])
tokens = token_budget(table.max_batch_by_shape())
data = DocumentDataset(stdlib_corpus(max_files=12).train, max_length=512)
sampler = TokenBudgetBatchSampler.from_budget(data.lengths, tokens, seed=0)
loader = DataLoader(data, batch_sampler=sampler, collate_fn=PadCollator(pad_values={1: IGNORE_INDEX}))
device, peaks, costs = CPUDevice(), [], []
for inputs, targets in loader:  # one full epoch

    def step(_, batch=(inputs, targets)):
        workload.begin_step()
        workload.backward(workload.loss(batch))
        workload.finish_step()

    peaks.append(device.run(step, len(inputs), 1).peak_bytes)
    costs.append(inputs.numel())
print(json.dumps({"max_tokens": tokens.max_tokens, "memory_budget": table.budget_bytes, "peaks": peaks,
                  "costs": costs, "samples": len(data), "sampled": sum(len(b) for b in sampler.batches(0))}))
"""


def test_one_epoch_of_real_text_stays_within_the_measured_budget_and_fills_it():
    """In a fresh process (conftest.in_a_fresh_process): the table, the budget and the epoch as a user runs them."""
    run = in_a_fresh_process(ONE_EPOCH)
    assert run["sampled"] == run["samples"]  # every document once
    assert max(run["costs"]) <= run["max_tokens"]
    assert [p for p in run["peaks"] if p > run["memory_budget"]] == []  # no step over the memory budget
    mean = sum(run["costs"]) / len(run["costs"])
    assert mean >= 0.85 * run["max_tokens"]  # the mean batch uses >= 85% of the budget
