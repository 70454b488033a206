"""batchlab under ``torch.distributed`` (torchrun; DDP and FSDP2): one job per module.

- :mod:`~batchlab.integrations.distributed.agreement` -- the ranks' exchange of answers and the checks that
  keep gradient averaging right (equal micro-batch and accumulation on every rank);
- :mod:`~batchlab.integrations.distributed.fit` -- :func:`find_batch_size_distributed`, independent or in
  lockstep (FSDP2), with mixed budgets and a target global batch.

The pieces below them live where their layer is: the process group's facts in :mod:`batchlab.devices.ranks`,
the out-of-memory agreement in :mod:`batchlab.devices.agreement`, the lockstep device in
:mod:`batchlab.devices.lockstep`, the plan for N cards in :mod:`batchlab.planning.sharded`.
"""

from batchlab.devices.ranks import all_gather_ints
from batchlab.integrations.distributed.agreement import GRADIENT_AVERAGING, agree_on_batch_size
from batchlab.integrations.distributed.fit import DistributedFitResult, find_batch_size_distributed

__all__ = [
    "GRADIENT_AVERAGING",
    "DistributedFitResult",
    "agree_on_batch_size",
    "all_gather_ints",
    "find_batch_size_distributed",
]
