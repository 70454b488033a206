"""The largest batch that fits: the pure decision, the records it keeps, and the search that runs it."""

from batchlab.fit.search import FitResult, MemoryLine, Probe, find_batch_size

__all__ = ["FitResult", "MemoryLine", "Probe", "find_batch_size"]
