"""Tools that run inside a user's training loop: :class:`OOMGuard` recovers from an out-of-memory error;
:class:`TokenBudgetBatchSampler` and :class:`PadCollator` batch variable-length data within a token budget."""

from batchlab.training.guard import GuardEvent, OOMGuard
from batchlab.training.sampler import PadCollator, TokenBudgetBatchSampler

__all__ = ["GuardEvent", "OOMGuard", "PadCollator", "TokenBudgetBatchSampler"]
