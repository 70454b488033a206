"""Tools that run inside a user's training loop: :class:`OOMGuard` recovers from an out-of-memory error."""

from batchlab.training.guard import GuardEvent, OOMGuard

__all__ = ["GuardEvent", "OOMGuard"]
