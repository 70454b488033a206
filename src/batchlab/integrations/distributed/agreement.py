"""The ranks agree on one batch: the exchange of answers, and the checks that keep gradient averaging right.

**What gradient averaging assumes.** DDP all-reduces and FSDP reduce-scatters the gradients and divide by
the world size: every rank's gradient weighs the same. That is the gradient of the global batch's mean loss
only when every rank runs the *same micro-batch* with the *same accumulation steps* (each rank's loss a mean
over the same number of samples). So the micro-batch is the one every rank can run (the minimum), the global
batch is ``micro x accumulation x world size``, and a plan that would need unequal shares -- a target global
batch the world size does not divide, or ranks that ask for different targets -- is refused, never rounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from batchlab import checks
from batchlab.errors import BatchlabError, DoesNotFitError, ProcessGroupFailedError

log = logging.getLogger("batchlab")

GRADIENT_AVERAGING = (
    "DDP/FSDP average gradients over ranks equally, which is the global batch's mean gradient only when every "
    "rank runs the same micro-batch and the same accumulation steps"
)

_DOES_NOT_FIT = 0  # what a rank sends when even the smallest size does not fit
_FAILED = -1  # what a rank sends when its search raised anything else


def agree_on_batch_size(
    local: Callable[[], int], gather: Callable[[int], Sequence[int]], *, rank: int
) -> tuple[int, list[int]]:
    """Run ``local()`` (this rank's search) and agree with the other ranks on the smallest answer.

    ``gather(value)`` must return every rank's value in rank order (``torch.distributed.all_gather``, or a
    framework's, e.g. Lightning's ``strategy.all_gather``). Every rank calls it exactly once, whatever ``local``
    did: a failure is sent as 0 (does not fit) or -1 (any other error) and re-raised after the exchange, and the
    ranks that did not fail raise :class:`~batchlab.BatchlabError` naming the rank that did.

    Taking the minimum of the gathered list is what an all-reduce with ``ReduceOp.MIN`` computes; gathering
    instead keeps each rank's answer for the report.
    """
    error: BaseException | None = None
    try:
        value = int(local())
    except ProcessGroupFailedError:
        raise  # no exchange: every rank raises it, and the group is gone
    except DoesNotFitError as exc:
        value, error = _DOES_NOT_FIT, exc
    except Exception as exc:  # re-raised below, after the collective every rank must reach
        value, error = _FAILED, exc
    values = [int(v) for v in gather(value)]
    if error is not None:
        raise error
    failed = [r for r, v in enumerate(values) if v == _FAILED]
    if failed:
        raise BatchlabError(f"the batch-size search failed on rank(s) {failed}; see their logs")
    too_big = [r for r, v in enumerate(values) if v == _DOES_NOT_FIT]
    if too_big:
        raise BatchlabError(f"even the smallest batch does not fit on rank(s) {too_big}")
    agreed = min(values)
    if agreed < values[rank]:
        log.info("batchlab: rank %d could run %d; all ranks use %d", rank, values[rank], agreed)
    return agreed, values


def check_even_split(target_global_batch: int, world_size: int) -> int:
    """The per-rank share of ``target_global_batch``; a one-line error when ranks would need unequal shares."""
    target = checks.integer("target_global_batch", target_global_batch)
    if target % world_size:
        raise ValueError(
            f"target_global_batch {target} is not a multiple of world size {world_size}: ranks would run "
            f"unequal micro-batches, and {GRADIENT_AVERAGING}; use a multiple of {world_size}"
        )
    return target // world_size


def check_same_everywhere(name: str, values: Sequence[int]) -> None:
    """Refuse a setting the ranks disagree on (``values``: every rank's, in rank order; -1 for None)."""
    if len(set(values)) > 1:
        shown = [None if v == -1 else v for v in values]
        raise ValueError(f"ranks disagree on {name} ({shown} by rank): {GRADIENT_AVERAGING}")


__all__ = ["GRADIENT_AVERAGING", "agree_on_batch_size", "check_even_split", "check_same_everywhere"]
