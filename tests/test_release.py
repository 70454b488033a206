"""The one release path after an out-of-memory error (batchlab.devices.release), on real CPU tensors.

``BranchNet`` is the case pytorch/pytorch#82218 describes: an out-of-memory error raised inside ``backward()``
in one branch leaves the other branch's queued nodes, and the tensors they saved, alive after the error has
gone -- ``gc`` cannot reach them. Each forward records a weak reference to one such saved tensor, so a test
can say exactly when it is freed. tests/test_guard.py and tests/test_integration_hf.py use it too.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchlab.devices.release as release_module
from batchlab.devices.base import flush_failed_backward as flush_from_base
from batchlab.devices.release import devices_of, flush_failed_backward, release_after_oom

INJECTED = "DefaultCPUAllocator: can't allocate memory: injected in backward"


class _SavesInput(torch.autograd.Function):
    """Doubles its input and keeps the input itself for backward (``ctx.save_for_backward``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 + x * 0


class _FailsInBackward(torch.autograd.Function):
    """Identity forward; when told to, its backward runs out of memory, as a branch running out would."""

    @staticmethod
    def forward(ctx, x, fail):
        ctx.fail = fail
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        if ctx.fail:
            raise torch.OutOfMemoryError(INJECTED)
        return grad, None


class BranchNet(nn.Module):
    """A trunk and two heads. The short head is built last, so its backward runs first; when
    ``fails(batch_size)`` is true it raises, while the long head's nodes -- holding the tensor whose weak
    reference ``saved[-1]`` is -- are still queued."""

    def __init__(self, fails=lambda batch_size: False, features: int = 8):
        super().__init__()
        self.trunk = nn.Linear(features, 32)
        self.long = nn.Linear(32, 3)
        self.short = nn.Linear(32, 3)
        self.fails = fails
        self.saved: list[weakref.ref] = []

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        kept = h * 1.0
        self.saved.append(weakref.ref(kept))
        long = self.long(_SavesInput.apply(kept))
        short = self.short(_FailsInBackward.apply(h, self.fails(len(x))))
        return long + short

    def alive(self) -> int:
        """How many of the tensors saved by earlier forwards are still alive."""
        return sum(ref() is not None for ref in self.saved)


def _failing_step(model: nn.Module) -> None:
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()


def test_a_failed_backward_keeps_its_graph_past_gc_until_release():
    model = BranchNet(fails=lambda b: True)
    with pytest.raises(torch.OutOfMemoryError, match="injected in backward"):
        _failing_step(model)
    gc.collect()
    assert model.alive() == 1  # pytorch#82218: gc alone leaves the failed graph's saved tensor alive
    release_after_oom("cpu")
    assert model.alive() == 0


def test_inside_the_except_block_the_traceback_still_holds_the_step():
    """The contract: released inside the ``except`` block, nothing is freed -- the traceback's frames hold the
    loss and through it the graph; after the block, the same call frees it."""
    model = BranchNet(fails=lambda b: True)
    try:
        _failing_step(model)
    except torch.OutOfMemoryError:
        release_after_oom("cpu")
        assert model.alive() == 1
    release_after_oom("cpu")
    assert model.alive() == 0


def test_release_collects_reference_cycles_and_never_initialises_cuda():
    class Cycle:
        pass

    cycle = Cycle()
    cycle.self, cycle.tensor = cycle, torch.ones(4)
    ref = weakref.ref(cycle.tensor)
    del cycle
    was_initialised = torch.cuda.is_initialized()
    release_after_oom("cpu", torch.device("cuda", 0))  # a CUDA device named while CUDA is not initialised
    assert ref() is None
    assert torch.cuda.is_initialized() == was_initialised


def test_the_cuda_cache_is_emptied_only_when_cuda_is_initialised(monkeypatch):
    emptied = []
    monkeypatch.setattr(release_module.torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(release_module.torch.cuda, "is_initialized", lambda: False)
    release_after_oom("cpu")
    assert emptied == []
    monkeypatch.setattr(release_module.torch.cuda, "is_initialized", lambda: True)
    release_after_oom("cpu")
    assert emptied == [True]


def test_devices_of_modules_and_optimizers_each_once():
    model = nn.Linear(2, 2)
    meta = nn.Linear(2, 2, device="meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert devices_of(model, optimizer, meta) == [torch.device("cpu"), torch.device("meta")]
    assert devices_of(object()) == []


def test_flush_failed_backward_stays_importable_from_base():
    assert flush_from_base is flush_failed_backward
