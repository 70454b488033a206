"""The largest batch that fits, found with few probes and verified by real steps.

- :mod:`~batchlab.fit.records`: :class:`Probe`, :class:`MemoryLine`, :class:`FitResult`, the outcomes and limits.
- :mod:`~batchlab.fit.decision`: the pure decision -- which size next, from the probes so far.
- :mod:`~batchlab.fit.probe`: one probe run on a device, and the memory of one that fit by what holds it.
- :mod:`~batchlab.fit.search`: :func:`find_batch_size`, which runs the decision against a device.
- :mod:`~batchlab.fit.options`: :class:`SearchOptions`, the search's options as the integrations pass them.
- :mod:`~batchlab.fit.tokens`: :func:`token_budget`, the token budget a shape table allows at every length.
"""

from batchlab.fit.decision import Decision, fit_memory_line, next_candidate
from batchlab.fit.options import SearchOptions
from batchlab.fit.records import FitResult, Limit, MemoryLine, Outcome, Probe
from batchlab.fit.search import find_batch_size
from batchlab.fit.tokens import TokenBudget, token_budget

__all__ = [
    "Decision",
    "FitResult",
    "Limit",
    "MemoryLine",
    "Outcome",
    "Probe",
    "SearchOptions",
    "TokenBudget",
    "find_batch_size",
    "fit_memory_line",
    "next_candidate",
    "token_budget",
]
