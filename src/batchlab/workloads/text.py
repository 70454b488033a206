"""A byte-level language model on real variable-length text: the standard library's own source (offline).

The model is :class:`~batchlab.workloads.examples.TinyGPT` over byte tokens (vocabulary 256); the data are the
documents of :func:`~batchlab.workloads.corpus.stdlib_corpus`, each cut at ``max_length + 1`` bytes (a
context limit, as every language model has one; the documents' tail is long -- a few reach hundreds of KB).
A document of ``n + 1`` bytes is one sample of length ``n``: inputs its first ``n`` bytes, targets its last
``n``. Padded positions get the target ``-100``, which cross-entropy ignores, and the attention is causal, so
right padding never changes a real position's loss: a padded batch trains exactly as its samples would alone.

- :func:`text_lm` is the :class:`~batchlab.Workload` a shape search probes: ``make_batch(b, shape=L)`` is
  ``b`` windows of ``L`` real bytes from the training stream (default ``L = max_length``, so commands that
  know no shapes probe the worst case).
- :class:`DocumentDataset` is the map-style dataset an epoch runs over, with the ``lengths`` a
  :class:`~batchlab.training.sampler.TokenBudgetBatchSampler` groups by.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from batchlab import checks
from batchlab.workload.workload import Workload
from batchlab.workloads.corpus import VOCAB_SIZE, stdlib_corpus
from batchlab.workloads.examples import TinyGPT

IGNORE_INDEX = -100  # cross-entropy's default ignore_index: the target of a padded position
MAX_LENGTH = 2048  # the context limit documents are cut at
TEXT_FILES = 200  # standard-library files the built-in reads: ~1,200 documents, ~1M tokens once cut at 2048


class DocumentDataset(torch.utils.data.Dataset):
    """Documents as ``(inputs, targets)`` byte samples, each cut at ``max_length + 1`` bytes."""

    def __init__(self, documents: Sequence[torch.Tensor], max_length: int = MAX_LENGTH):
        self.max_length = checks.integer("max_length", max_length)
        self.documents = [doc[: self.max_length + 1] for doc in documents if len(doc) >= 2]
        self.lengths = [len(doc) - 1 for doc in self.documents]

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        doc = self.documents[index]
        return doc[:-1], doc[1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every real position (padding, ``-100``, ignored)."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def text_lm(
    device: str = "cpu",
    *,
    max_length: int = MAX_LENGTH,
    max_files: int | None = TEXT_FILES,
    width: int = 64,
    depth: int = 2,
    heads: int = 2,
) -> Workload:
    """A byte-level TinyGPT (width 64, 2 layers) with AdamW on standard-library source, batches of any length.

    ``make_batch(b, shape=L)``: ``b`` windows of ``L`` consecutive bytes at random offsets (torch's global RNG,
    which every search restores); ``L`` at most ``max_length``.
    """
    max_length = checks.integer("max_length", max_length)
    stream = stdlib_corpus(max_files=max_files).stream("train").to(device)
    model = TinyGPT(vocab=VOCAB_SIZE, context=max_length, width=width, depth=depth, heads=heads).to(device)

    def make_batch(batch_size: int, shape: int = max_length) -> tuple[torch.Tensor, torch.Tensor]:
        length = checks.integer("shape", shape)
        if length > max_length:
            raise ValueError(
                f"invalid shape {shape!r}: expected a length <= the model's context {max_length}"
            )
        starts = torch.randint(0, len(stream) - length - 1, (batch_size, 1), device=device)
        windows = stream[starts + torch.arange(length + 1, device=device)]
        return windows[:, :-1], windows[:, 1:]

    return Workload(
        model,
        make_batch,
        lm_loss,
        lambda params: torch.optim.AdamW(params, lr=1e-3),
        name="text-lm",
    )
