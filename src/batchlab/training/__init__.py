"""Tools that run inside a user's training loop.

- :class:`OOMGuard` recovers from an out-of-memory error (:mod:`~batchlab.training.guard`);
- :func:`carry_over` moves a live optimizer's hyper-parameters across a batch change, with an audit
  (:mod:`~batchlab.training.carry`; the rules in :mod:`batchlab.advice.transfer`);
- :class:`BatchRamp` grows the batch with the measured noise scale, each change through :func:`carry_over`
  (:mod:`~batchlab.training.ramp`; the decision in :mod:`batchlab.advice.ramp`);
- :class:`TokenBudgetBatchSampler` and :class:`PadCollator` batch variable-length data within a token budget
  (:mod:`~batchlab.training.sampler`; the budget in :mod:`batchlab.fit.tokens`).
"""

from batchlab.training.carry import carry_over
from batchlab.training.guard import GuardEvent, OOMGuard
from batchlab.training.ramp import BatchRamp, RampEvent
from batchlab.training.sampler import PadCollator, TokenBudgetBatchSampler

__all__ = [
    "BatchRamp",
    "GuardEvent",
    "OOMGuard",
    "PadCollator",
    "RampEvent",
    "TokenBudgetBatchSampler",
    "carry_over",
]
