"""Batches of variable-length samples that keep to a token budget: a ``torch.utils.data`` batch sampler and the
padding collator that goes with it.

::

    from batchlab.fit.tokens import token_budget
    from batchlab.training.sampler import PadCollator, TokenBudgetBatchSampler

    budget = token_budget({128: 64, 256: 30, 512: 14, 1024: 6, 2048: 2})   # a shape search's table
    sampler = TokenBudgetBatchSampler.from_budget(lengths, budget, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PadCollator(pad_values={1: -100}))

A batch costs its samples times its longest sample (the collator pads every sample to that length, so padding
counts), and no batch costs more than ``max_tokens`` or holds more than ``max_batch_size`` samples. Samples
are grouped by length into buckets with equal numbers of samples (lhotse estimates its duration bins the same
way, from quantiles), shuffled within each bucket by a seeded generator of the sampler's own -- the global RNG
is never drawn from -- packed greedily from the shortest bucket to the longest, and the batches are shuffled. A sample longer than
``max_length`` (the longest length searched) or costing more than ``max_tokens`` alone is refused at
construction with its index and length: it would otherwise be an out-of-memory error mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from batchlab import checks
from batchlab.fit.tokens import TokenBudget

# 30 buckets, as NeMo's bucketing default (num_buckets=30): narrow enough that padding within a bucket stays
# small on real text (the fill test in tests/test_sampler.py), wide enough to shuffle within.
DEFAULT_BUCKETS = 30


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yield lists of sample indices whose ``len(batch) x longest length`` stays within ``max_tokens``.

    Args:
        lengths: the length (tokens, or pixels) of every sample, in dataset order.
        max_tokens: the budget a batch's padded cost may reach (:func:`batchlab.fit.tokens.token_budget`).
        max_batch_size: at most this many samples per batch (default: no cap beyond the budget).
        max_length: refuse samples longer than this -- the longest length the budget was searched for.
        buckets: how many length buckets (equal numbers of samples each); 1 sorts nothing.
        shuffle: shuffle within buckets and the order of batches, anew each epoch; False keeps dataset order
            within buckets and buckets from short to long.
        seed: the sampler's own generator seed; epoch ``e`` draws from ``seed + e``.
        drop_last: drop the epoch's last batch, the one that can be partly filled.

    Each ``iter()`` is the next epoch (``set_epoch`` sets it, as ``DistributedSampler`` does); ``len()`` is the
    number of batches of the epoch the next ``iter()`` will yield.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        buckets: int = DEFAULT_BUCKETS,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.max_tokens = checks.integer("max_tokens", max_tokens)
        self.max_batch_size = checks.integer("max_batch_size", max_batch_size, none=True)
        self.max_length = checks.integer("max_length", max_length, none=True)
        self.buckets = checks.integer("buckets", buckets)
        self.shuffle = checks.flag("shuffle", shuffle)
        self.seed = checks.integer("seed", seed, minimum=0)
        self.drop_last = checks.flag("drop_last", drop_last)
        self.lengths = [checks.integer(f"length of sample {i}", n) for i, n in enumerate(lengths)]
        if not self.lengths:
            raise ValueError("invalid lengths []: expected the length of every sample")
        limit, what = min(
            (self.max_length or self.max_tokens, "the longest searched length (max_length)"),
            (self.max_tokens, "max_tokens"),
        )
        too_long = [(i, n) for i, n in enumerate(self.lengths) if n > limit]
        if too_long:
            index, length = too_long[0]
            raise ValueError(
                f"sample {index} has length {length}, longer than {what} {limit}"
                + (f" ({len(too_long)} such samples)" if len(too_long) > 1 else "")
                + "; search up to that length, or cut or drop those samples"
            )
        self.epoch = 0
        self._planned: tuple[int, list[list[int]]] | None = None

    @classmethod
    def from_budget(
        cls, lengths: Sequence[int], budget: TokenBudget, **kwargs: Any
    ) -> TokenBudgetBatchSampler:
        """A sampler that keeps to ``budget``: its tokens, its sample cap and its longest searched length."""
        if not isinstance(budget, TokenBudget):
            raise TypeError(f"budget must be a batchlab.fit.tokens.TokenBudget, got {type(budget).__name__}")
        return cls(
            lengths,
            budget.max_tokens,
            max_batch_size=budget.max_batch_size,
            max_length=budget.max_length,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = checks.integer("epoch", epoch, minimum=0)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the next), in the order they will be yielded."""
        epoch = self.epoch if epoch is None else epoch
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, self._plan(epoch))
        return self._planned[1]

    def _plan(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        by_length = sorted(range(len(self.lengths)), key=self.lengths.__getitem__)
        size = -(-len(by_length) // self.buckets)
        order: list[int] = []
        for start in range(0, len(by_length), size):
            bucket = by_length[start : start + size]
            if self.shuffle:
                bucket = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
            else:
                bucket.sort()
            order += bucket
        batches = self._pack(order)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _pack(self, order: list[int]) -> list[list[int]]:
        """Greedy over the buckets from short to long: a batch closes when one more sample would pass the budget
        or the cap. A bucket's last batch stays open for the next bucket's samples, so only the epoch's very
        last batch can be left part-filled (``drop_last`` drops it)."""
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0
        for index in order:
            length = self.lengths[index]
            grown = max(longest, length)
            full = self.max_batch_size is not None and len(batch) >= self.max_batch_size
            if batch and (full or (len(batch) + 1) * grown > self.max_tokens):
                batches.append(batch)
                batch, grown = [], length
            batch.append(index)
            longest = grown
        if batch and not (self.drop_last and batches):
            batches.append(batch)
        return batches

    def cost(self, batch: Sequence[int]) -> int:
        """A batch's padded cost: its samples times its longest sample."""
        return len(batch) * max(self.lengths[i] for i in batch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


def _pad(values: list[torch.Tensor], pad_value: Any) -> torch.Tensor:
    longest = max(value.shape[0] for value in values)
    out = values[0].new_full((len(values), longest, *values[0].shape[1:]), pad_value)
    for row, value in enumerate(values):
        out[row, : value.shape[0]] = value
    return out


class PadCollator:
    """``collate_fn`` for variable-length samples: pads every sequence to the batch's longest, stacks the rest.

    A sample is a tensor, a tuple/list of fields or a dict of fields. A field whose tensors have at least one
    dimension and differ in their first is padded along it with ``pad_values[field]`` (a position for tuples,
    a key for dicts; default ``pad_value``), e.g. ``PadCollator(pad_values={1: -100})`` pads a language
    model's targets with cross-entropy's ``ignore_index``. Fields of one shape are stacked and numbers become
    tensors, as ``default_collate`` does. The padded length is the longest sample's, as the sampler counts it.
    """

    def __init__(self, pad_value: Any = 0, *, pad_values: Mapping[Any, Any] | None = None):
        self.pad_value = pad_value
        self.pad_values = dict(pad_values or {})

    def _field(self, values: list[Any], key: Any) -> Any:
        if isinstance(values[0], torch.Tensor):
            if values[0].dim() >= 1 and len({value.shape[0] for value in values}) > 1:
                return _pad(values, self.pad_values.get(key, self.pad_value))
            return torch.stack(values)
        if isinstance(values[0], (bool, int, float)):
            return torch.tensor(values)
        return values

    def __call__(self, samples: Sequence[Any]) -> Any:
        if not samples:
            raise ValueError("PadCollator got an empty batch")
        first = samples[0]
        if isinstance(first, Mapping):
            return {key: self._field([s[key] for s in samples], key) for key in first}
        if isinstance(first, (tuple, list)):
            return type(first)(self._field([s[i] for s in samples], i) for i in range(len(first)))
        return self._field(list(samples), None)
