"""batchlab's errors arrive whole across a process boundary (a Ray trial, a process pool): each pickles with
its fields, where ``Exception``'s own pickling called the class with the message alone and failed."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

from batchlab import errors

RAISED = [
    errors.DoesNotFitError(
        "batch 1 needs 3.0 GiB of 2.0 GiB", batch_size=1, needed_bytes=3 << 30, budget_bytes=2 << 30
    ),
    errors.PeerFailureError("rank 1 ran out of memory", ranks=[1], out_of_memory=True),
    errors.ProcessGroupFailedError("the group timed out", reports=["OutOfMemoryError: ...", None]),
    errors.FakeTensorError("aten.nonzero needs real data", op="aten.nonzero", workload="detector"),
    errors.WorkloadError("no workload named 'mlp-digit'"),
]


@pytest.mark.parametrize("error", RAISED, ids=lambda e: type(e).__name__)
def test_each_error_pickles_with_its_message_and_fields(error):
    error.add_note("a note the caller added")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back.args == error.args and str(back) == str(error)
    assert vars(back) == vars(error) and back.__notes__ == ["a note the caller added"]


def _search_within_one_mebibyte(_: int) -> None:
    """A real search that cannot fit: the process alone holds more than the budget."""
    import torch

    import batchlab

    model = torch.nn.Linear(4, 2)
    workload = batchlab.Workload(
        model,
        lambda b: (torch.randn(b, 4), torch.randn(b, 2)),
        torch.nn.functional.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
    )
    batchlab.find_batch_size(workload, device="cpu", memory_budget="1MiB")


def test_a_search_in_a_process_pool_raises_the_error_itself_in_the_parent():
    # before errors pickled, the parent could not rebuild DoesNotFitError and the whole pool broke
    # (BrokenProcessPool: "a process in the process pool was terminated abruptly")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        with pytest.raises(errors.DoesNotFitError, match="batch 1 does not fit") as info:
            pool.submit(_search_within_one_mebibyte, 0).result()
    assert info.value.batch_size == 1 and info.value.budget_bytes < 1 << 20 < info.value.needed_bytes
