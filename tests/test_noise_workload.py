"""measure_noise_scale: a real short training run through a Workload, leaving the user's state bitwise intact."""

from __future__ import annotations

import re

import pytest
import torch

from batchlab import Workload
from batchlab.noise.measure import measure_noise_scale, noise_collector
from conftest import assert_same_state, tiny_bn_workload, workload_state

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _no_hooks(workload: Workload) -> bool:
    """Bare as before the measurement: no hook dict at all, since an empty one still costs a Python call per
    parameter per backward (benchmarks/removed_hooks.py)."""
    return all(getattr(p, "_backward_hooks", None) is None for p in workload.model.parameters())


def _trained(workload: Workload) -> Workload:
    """Give the workload non-trivial state: Adam moments, gradients, moved BatchNorm stats, eval mode."""
    workload.step(16)
    workload.model.eval()
    return workload


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_state_is_bitwise_unchanged_and_hooks_removed(grad_accum):
    base = tiny_bn_workload(seed=1)
    work = _trained(
        Workload(base.model, base.make_batch, base.loss_fn, base.optimizer, grad_accum=grad_accum, name="t")
    )
    before = workload_state(work)
    est = measure_noise_scale(work, 16, steps=12)
    assert_same_state(before, workload_state(work))
    assert _no_hooks(work)
    kind = "accumulation" if grad_accum > 1 else "split"
    assert noise_collector(work) == kind
    assert est.updates == 12 and est.samples == 12 * 16 * grad_accum
    assert f"collector: {'accumulation' if grad_accum > 1 else 'split batch'}" in est.note


def test_training_actually_happens_during_the_measurement():
    work = tiny_bn_workload(seed=2)
    seen = []
    original = work.make_batch

    def watching(b):
        if b == 8:  # the host-room check probes batch 2 first (check_host_room), from the same state
            seen.append([p.detach().clone() for p in work.model.parameters()][0])
        return original(b)

    work.make_batch = watching
    measure_noise_scale(work, 8, steps=3, on_step=lambda i, pair: None)
    assert len(seen) == 3 and not torch.equal(seen[0], seen[2])  # the weights moved between steps


def test_a_failure_mid_run_restores_state_and_removes_hooks():
    work = _trained(tiny_bn_workload(seed=3))
    before = workload_state(work)
    original, calls = work.make_batch, []

    def flaky(b):
        calls.append(b)
        if len(calls) == 4:
            raise RuntimeError("loader died")
        return original(b)

    work.make_batch = flaky
    with pytest.raises(RuntimeError, match="loader died"):  # the user's error surfaces as itself
        measure_noise_scale(work, 8, steps=10)
    work.make_batch = original
    assert_same_state(before, workload_state(work))
    assert _no_hooks(work)


def test_on_step_sees_every_pair():
    work = tiny_bn_workload(seed=4)
    pairs = []
    measure_noise_scale(work, 10, steps=5, on_step=lambda i, pair: pairs.append((i, pair)))
    assert [i for i, _ in pairs] == list(range(5))
    assert all(p.b_big == 10 and p.b_small == 5 for _, p in pairs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "invalid batch_size 0: expected an int >= 1"),
        ({"batch_size": 1}, "the split collector needs batch_size >= 2"),
        ({"batch_size": 8, "steps": 0}, "invalid steps 0: expected an int >= 1"),
        (
            {"batch_size": 8, "collector": "ddp"},
            "invalid collector 'ddp': expected one of 'auto', 'accumulation', 'split'",
        ),
        (
            {"batch_size": 8, "collector": "accumulation"},
            "collector 'accumulation' needs a workload with grad_accum >= 2",
        ),
        ({"batch_size": 8, "beta": 1.0}, "invalid beta 1.0: expected a number in [0, 1)"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(kwargs, message):
    work = tiny_bn_workload(seed=5)
    before = workload_state(work)
    with pytest.raises(ValueError, match=re.escape(message)):
        measure_noise_scale(work, **kwargs)
    assert_same_state(before, workload_state(work))


def test_a_plain_step_callable_is_refused():
    with pytest.raises(ValueError, match="needs a batchlab.Workload"):
        measure_noise_scale(lambda b: None, 8)
