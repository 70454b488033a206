"""Profiling: throughput and peak memory over batch sizes, precisions and activation checkpointing; the knee.

One job per module, each using only those above it in this list:

- ``records``   the results: ProfilePoint, VariantSummary, Profile; PointOutcome and MemorySource (str enums)
- ``analysis``  pure math over numbers: the knee (the project's one), memory per sample, how many steps to
                time, a variant's summary
- ``findings``  the findings and warnings in plain words (pure)
- ``timing``    one batch size timed on a device: warm-up steps dropped, each step between synchronisations
- ``loaders``   the user's DataLoader as a step's batches
- ``api``       :func:`profile`: per variant, one fit search, then every planned size timed and summarised
- ``plots``     PNGs of a Profile (matplotlib, the ``plot`` extra; imported when drawn)

The package is a noun so that nothing shadows the one-line call :func:`batchlab.profile`.
"""

from batchlab.profiling.analysis import knee_batch_size
from batchlab.profiling.api import profile
from batchlab.profiling.records import MemorySource, PointOutcome, Profile, ProfilePoint, VariantSummary

__all__ = [
    "MemorySource",
    "PointOutcome",
    "Profile",
    "ProfilePoint",
    "VariantSummary",
    "knee_batch_size",
    "profile",
]
