"""batchlab's errors arrive whole across a process boundary (a Ray trial, a process pool): each pickles with
its fields, where ``Exception``'s own pickling called the class with the message alone and failed."""

from __future__ import annotations

import pickle

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
