"""Split a batch along its first dimension into micro-batches, and put per-sample outputs back together.

Batches are tensors, tuples/lists (named tuples too) or dicts of tensors; anything else in them is passed to
every part unchanged. Used by :class:`~batchlab.training.OOMGuard` for training micro-batches and evaluation
chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for value in values:
        length = batch_len(value)
        if length is not None:
            return length
    return None


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: slice_batch(value, start, stop) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(value, start, stop) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(value, start, stop) for value in batch)
    return batch


def check_per_sample(output: Any, samples: int) -> None:
    """Raise TypeError unless every leaf of ``output`` is a tensor with ``samples`` rows along dimension 0."""
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != samples:
            raise TypeError(
                f"OOMGuard.evaluate needs per-sample outputs, {samples} rows for a chunk of {samples}, got a "
                f"tensor of shape {tuple(output.shape)}; return e.g. F.cross_entropy(..., reduction='none') and "
                "reduce the result"
            )
    elif isinstance(output, (Mapping, list, tuple)):
        for value in output.values() if isinstance(output, Mapping) else output:
            check_per_sample(value, samples)
    else:
        raise TypeError(
            f"OOMGuard.evaluate needs tensors, or tuples/lists/dicts of tensors, from its function; got "
            f"{type(output).__name__}"
        )


def concat(parts: list[Any]) -> Any:
    """Join chunk outputs of the same structure along dimension 0 (the inverse of :func:`_slice`)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if len(parts) > 1 else first
    if isinstance(first, Mapping):
        return type(first)({key: concat([part[key] for part in parts]) for key in first})
    columns = [concat([part[i] for part in parts]) for i in range(len(first))]
    return type(first)(*columns) if hasattr(first, "_fields") else type(first)(columns)


def evaluate_chunks(batch: Any, fn: Callable[[Any], Any], length: int, chunk: int) -> list[Any]:
    outputs = []
    with torch.no_grad():
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            output = fn(slice_batch(batch, start, stop))
            check_per_sample(output, stop - start)
            outputs.append(output)
    return outputs
