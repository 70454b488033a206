"""The user's input pipeline as a step's batches: a DataLoader rebuilt at each batch size, one batch a call.

The profile times each fitting size a second time with its batches drawn from the user's loader, to show
what the input pipeline costs; this module adapts a ``DataLoader`` (or a ``make_loader(batch_size)``
callable) to the ``make_batch(b)`` a :class:`~batchlab.Workload` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from batchlab.errors import WorkloadError
from batchlab.workload.workload import Workload


class LoaderBatches:
    """``make_batch(b)`` drawn from ``make_loader(b)``: one live iterator, restarted when it runs out."""

    def __init__(self, make_loader: Callable[[int], Iterable[Any]]):
        self.make_loader = make_loader
        self._batch_size: int | None = None
        self._iterator: Iterator[Any] | None = None

    def __call__(self, batch_size: int) -> Any:
        if self._iterator is None or self._batch_size != batch_size:
            self._restart(batch_size)
        try:
            return next(self._iterator)
        except StopIteration:
            self._restart(batch_size)
            try:
                return next(self._iterator)
            except StopIteration:
                raise WorkloadError(f"the loader for batch {batch_size} yields no batch") from None

    def _restart(self, batch_size: int) -> None:
        self.close()
        self._batch_size = batch_size
        self._iterator = iter(self.make_loader(batch_size))

    def close(self) -> None:
        """Drop the iterator (a DataLoader's worker processes shut down with it)."""
        self._iterator = None
        self._batch_size = None


def loader_factory(loader: Any) -> Callable[[int], Iterable[Any]]:
    """``make_loader(b)`` from a DataLoader (rebuilt at batch size b, workers and collate kept) or a callable."""
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(loader, DataLoader):
        if loader.batch_size is None:
            raise ValueError(
                "a DataLoader with a batch_sampler or batch_size=None cannot be rebuilt at another batch "
                "size; pass make_loader=lambda b: DataLoader(..., batch_size=b) instead"
            )

        def make_loader(batch_size: int) -> DataLoader:
            return DataLoader(
                loader.dataset,
                batch_size=batch_size,
                shuffle=isinstance(loader.sampler, RandomSampler),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                drop_last=True,  # every timed step sees a full batch
                worker_init_fn=loader.worker_init_fn,
                prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
                multiprocessing_context=loader.multiprocessing_context,
            )

        return make_loader
    if callable(loader):
        return loader
    raise TypeError(
        f"loader must be a torch DataLoader or a make_loader(batch_size) callable, got {type(loader).__name__}"
    )


def with_loader(
    variant: Workload, make_loader: Callable[[int], Iterable[Any]]
) -> tuple[Workload, LoaderBatches]:
    """The same step (model, optimizer, precision) with batches drawn from ``make_loader``, and those batches
    (close them after timing: a DataLoader's workers end with its iterator)."""
    batches = LoaderBatches(make_loader)
    loaded = Workload(
        variant.model,
        batches,
        variant.loss_fn,
        variant.optimizer,
        amp=variant.amp,
        grad_accum=variant.grad_accum,
        dataset_size=variant.dataset_size,
        name=variant.name,
    )
    return loaded, batches
