"""Automatic batch sizes for a sweep (``batch_sizes="auto"``): powers of two up to the largest that fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchlab.defaults import MEASURED_MAX_BATCH
from batchlab.fit import find_batch_size
from batchlab.sweeps.trainable import close_run

__all__ = ["AUTO_MIN_BATCH", "AUTO_MAX_SIZES", "auto_batch_sizes"]

AUTO_MIN_BATCH = 8  # "auto" starts here: below 8 a step is all per-step overhead on any device, and the
# smallest sizes need the most steps -- the slowest runs of a sweep for the least information
AUTO_MAX_SIZES = (
    8  # "auto" keeps the largest 8 powers of two (8..1024 when 1024+ fits): ~1 h budgets stay ~1 h
)


def auto_batch_sizes(
    factory: Callable[[int, float, int], Any], lr: float, *, device: Any = "auto"
) -> list[int]:
    """Powers of two from ``AUTO_MIN_BATCH`` up to the largest batch that fits (``find_batch_size``).

    Builds one run at batch ``AUTO_MIN_BATCH`` and searches its ``workload()`` (the training set caps the
    answer, and :data:`~batchlab.defaults.MEASURED_MAX_BATCH` a workload that gives no dataset size: a small
    model fits ~10^8 samples, and the sweep would train there); keeps the largest ``AUTO_MAX_SIZES`` powers.
    Needs a factory whose runs have ``workload()``.
    """
    probe = factory(AUTO_MIN_BATCH, lr, 0)
    if not hasattr(probe, "workload"):
        close_run(probe)
        raise ValueError(
            'batch_sizes="auto" needs runs with a workload() method (batchlab.sweeps.SupervisedRun and '
            "WorkloadRun have one); pass explicit batch sizes instead"
        )
    try:
        fit = find_batch_size(probe.workload(), device=device, max_batch_size=MEASURED_MAX_BATCH)
    finally:
        close_run(probe)
    top = fit.batch_size
    sizes = [2**k for k in range(AUTO_MIN_BATCH.bit_length() - 1, top.bit_length()) if 2**k <= top]
    return sizes[-AUTO_MAX_SIZES:] if sizes else [top]
