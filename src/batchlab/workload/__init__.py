"""A training step to measure, and everything it must leave as it found it.

- :mod:`~batchlab.workload.workload`: :class:`Workload` (one full training step) and :class:`StepFunction`
  (any ``step(batch_size)`` callable).
- :mod:`~batchlab.workload.evaluation`: :class:`EvalStep`, the evaluation step (no gradients, eval mode).
- :mod:`~batchlab.workload.state`: :class:`StateSnapshot`, the bitwise copy restored after every probe.
- :mod:`~batchlab.workload.skipped_steps`: a step a GradScaler skips still creates the optimizer state.
- :mod:`~batchlab.workload.checkpointing`: activation checkpointing switched on for a step, and back off.
"""

from batchlab.workload.checkpointing import activation_checkpointing
from batchlab.workload.evaluation import EvalStep, StepMode
from batchlab.workload.state import StateSnapshot
from batchlab.workload.workload import StepFunction, Workload, as_workload

__all__ = [
    "EvalStep",
    "StateSnapshot",
    "StepMode",
    "StepFunction",
    "Workload",
    "activation_checkpointing",
    "as_workload",
]
