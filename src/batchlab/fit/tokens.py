"""A token (or pixel) budget from a table of the largest batch per padded length: pure arithmetic over numbers.

A shape search answers, for a few padded lengths ``L_1 < ... < L_n``, the largest batch ``B_i`` whose whole
step fits (``max_batch_by_shape()``: ``{L_i: B_i}``). A length-bucketing sampler needs one number instead:
``max_tokens``, the most ``batch size x padded length`` a batch may cost (fairseq's ``--max-tokens``,
lhotse's ``max_duration``), and a cap on the samples in a batch (fairseq's ``--batch-size``, lhotse's
``max_cuts``). :func:`token_budget` derives both from the table so that *every* batch within them fits, at any
padded length up to ``L_n`` -- not only at the lengths that were searched.

What is assumed between table points, and why: the step's peak memory never falls when the batch grows or the
padded length grows (more samples or longer samples only add activations: ``fixed + b (alpha L + beta L^2)``
for a transformer). Then a batch of ``b`` samples padded to ``l`` fits wherever ``b <= B_i`` for the next table
length ``L_i >= l``. A budget ``T`` lets a batch of padded length ``l`` hold ``T // l`` samples, and the
shortest length of each interval ``(L_{i-1}, L_i]`` holds the most, so ``T`` is safe exactly when
``T // (L_{i-1} + 1) <= B_i`` for each ``i >= 2`` and ``T // L_1 <= B_1``: the largest safe budget is

    T = min( (B_1 + 1) L_1 - 1,  min_{i >= 2} (B_i + 1)(L_{i-1} + 1) - 1 ).

Below ``L_1`` the table says nothing but ``B_1``, so the samples per batch are capped at ``B_1``
(``max_batch_size``); with that cap a token budget would otherwise let a batch of length 1 hold ``T`` samples.
Nothing about how memory grows *between* points is assumed beyond monotonicity, which costs budget: on a table
that doubles its lengths ``T`` is about ``min B_i L_{i-1}``, half of ``min B_i L_i``. More table lengths close
that gap (NeMo's OOMptimizer searches 30 buckets); no fitted curve is trusted instead, because an answer here is
never one that was not measured.

Pixels work the same way: pass ``{h * w: B}``, and a batch's cost is its samples times its padded area.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchlab import checks


def _checked_table(max_batch_by_length: Mapping[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(max_batch_by_length, Mapping) or not max_batch_by_length:
        raise ValueError(
            f"invalid max_batch_by_length {max_batch_by_length!r}: expected a non-empty mapping "
            "{padded_length: largest_batch}, e.g. {128: 64, 256: 30}"
        )
    lengths = tuple(sorted(checks.integer("padded length", key) for key in max_batch_by_length))
    batches = tuple(
        checks.integer(f"largest batch at length {length}", max_batch_by_length[length]) for length in lengths
    )
    return lengths, batches


@dataclass(frozen=True)
class TokenBudget:
    """The budget a batch must keep to: at most ``max_tokens`` (samples x padded length), at most
    ``max_batch_size`` samples, no sample longer than ``max_length`` (the longest length searched).

    ``lengths``/``max_batches`` are the table it came from; ``limiting_length`` the table length whose entry
    set ``max_tokens``.
    """

    max_tokens: int
    max_batch_size: int
    max_length: int
    lengths: tuple[int, ...]
    max_batches: tuple[int, ...]
    limiting_length: int

    def batch_size_at(self, length: int) -> int:
        """The samples a batch padded to ``length`` may hold under this budget (0: none of that length)."""
        length = checks.integer("length", length)
        if length > self.max_length:
            return 0
        return min(self.max_tokens // length, self.max_batch_size)

    def bucket_batch_sizes(self, bins: Sequence[int] | None = None) -> list[int]:
        """The largest batch for each bucket whose samples are at most ``bins[k]`` long (upper edges, ascending).

        This is lhotse's / NeMo's ``bucket_batch_size`` for ``bucket_duration_bins=bins`` (lengths in tokens):
        each entry is the table's own measured batch at the next searched length ``>= bins[k]``, which by the
        monotonicity above is never less than the token budget allows there. Default bins: the table's lengths.
        """
        bins = list(self.lengths if bins is None else bins)
        if not bins:
            raise ValueError("invalid bins []: expected ascending upper edges, e.g. [128, 256, 512]")
        edges = [checks.integer("bucket edge", edge) for edge in bins]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"invalid bins {bins!r}: expected strictly ascending upper edges")
        if edges[-1] > self.max_length:
            raise ValueError(
                f"invalid bins {bins!r}: the last edge {edges[-1]} is longer than the longest searched length "
                f"{self.max_length}; search up to it first"
            )
        return [self.max_batches[bisect.bisect_left(self.lengths, edge)] for edge in edges]

    def lhotse_buckets(self, bins: Sequence[int] | None = None) -> dict[str, list[int]]:
        """``{"bucket_duration_bins": bins, "bucket_batch_size": sizes}``: the keys NeMo/lhotse configs take."""
        edges = list(self.lengths if bins is None else bins)
        return {"bucket_duration_bins": edges, "bucket_batch_size": self.bucket_batch_sizes(edges)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_budget(max_batch_by_length: Mapping[int, int]) -> TokenBudget:
    """The largest token budget under which every batch of padded length up to the longest searched fits.

    ``max_batch_by_length`` is ``{padded_length: largest_batch}``, e.g. a shape table's
    ``max_batch_by_shape()``; every entry must have fit (a largest batch >= 1). See the module docstring for
    the rule and what it assumes.
    """
    lengths, batches = _checked_table(max_batch_by_length)
    candidates = [((batches[0] + 1) * lengths[0] - 1, lengths[0])]
    candidates += [((batches[i] + 1) * (lengths[i - 1] + 1) - 1, lengths[i]) for i in range(1, len(lengths))]
    max_tokens, limiting = min(candidates)
    return TokenBudget(
        max_tokens=max_tokens,
        max_batch_size=batches[0],
        max_length=lengths[-1],
        lengths=lengths,
        max_batches=batches,
        limiting_length=limiting,
    )
