"""A step the host cannot hold is refused before it runs (``batchlab.fit.search.check_host_room``): on the CPU
a step past the RAM is killed by the kernel, not raised. ``batchlab noise --workload cnn --batch 20000`` was
killed on this 22 GiB machine; the noise measurement, the branched runs and a sweep of a Workload now refuse.

The workload draws 1 MiB of input per sample, so at 10^8 samples the line through the probes at 2 and 16
predicts ~100 TiB: more than any host has, on every machine the tests run on. Nothing runs at that size."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import batchlab
from batchlab.sweeps import WorkloadFactory
from batchlab.sweeps.store import SweepStore
from batchlab.workloads.tasks import ConfiguredFactory
from conftest import assert_same_state, workload_state

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = 1 << 18  # 2^18 float32 inputs: 1 MiB per sample
HUGE = 10**8


def _workload() -> batchlab.Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 2))
    workload = batchlab.Workload(
        model,
        lambda b: (torch.randn(b, FEATURES), torch.randint(0, 2, (b,))),
        nn.functional.cross_entropy,
        lambda params: torch.optim.SGD(params, lr=1e-3),  # no optimizer state: the input sets the peak
        name="wide",
    )
    workload.validation = (torch.randn(8, FEATURES), torch.randint(0, 2, (8,)))
    return workload


def test_the_noise_measurement_refuses_a_batch_the_ram_cannot_hold_and_leaves_the_state():
    workload = _workload()
    before = workload_state(workload)
    with pytest.raises(
        batchlab.DoesNotFitError,
        match=r"the noise measurement at batch 100000000 would need about [\d.]+ TiB of RAM, above the "
        r"[\d.]+ [GMT]iB this process can use: a CPU step past it is killed, not raised, so it did not run",
    ) as info:
        batchlab.measure_noise_scale(workload, HUGE, steps=3)
    assert info.value.batch_size == HUGE and info.value.needed_bytes > 50 * 2**40 > info.value.budget_bytes
    assert_same_state(before, workload_state(workload))


def test_a_batch_the_ram_holds_is_measured_as_before():
    estimate = batchlab.measure_noise_scale(
        _workload(), 16, steps=3
    )  # the check probes 2 and 4, then it runs
    assert estimate.updates == 3


def test_the_branched_runs_refuse_their_largest_micro_batch_first():
    workload = _workload()
    with pytest.raises(batchlab.DoesNotFitError, match=r"the branched runs at batch 100000000 would need"):
        batchlab.branch_critical_batch(workload, [8, 16, HUGE], base_batch=8, reference_steps=2)
    with pytest.raises(batchlab.DoesNotFitError, match=r"the branched runs at batch 50000000 would need"):
        batchlab.branch_critical_batch(workload, [8, 16, HUGE], base_batch=8, max_micro_batch=HUGE // 2)


def test_a_sweep_refuses_before_it_writes_its_directory(tmp_path):
    with pytest.raises(batchlab.DoesNotFitError, match=r"the sweep's run at batch 100000000 would need"):
        batchlab.sweep(
            WorkloadFactory(_workload), [8, HUGE], lr=1e-3, budget=2, directory=tmp_path, tracking_uri=False
        )
    assert not list(tmp_path.rglob(SweepStore.CONFIG))  # nothing trained, nothing written
    accumulating = ConfiguredFactory(WorkloadFactory(_workload), accumulation=4)  # --accumulation 4
    with pytest.raises(
        batchlab.DoesNotFitError,
        match=r"the sweep's run \(batch 400000000 as 4 x 100000000\) at batch 100000000 would",
    ):
        batchlab.sweep(accumulating, [8, 4 * HUGE], lr=1e-3, budget=2, directory=tmp_path, tracking_uri=False)


def test_the_check_leaves_the_allocator_as_fast_as_it_found_it():
    # In a fresh process: glibc's thresholds are process-wide, and a test must not leave them changed.
    code = """
import batchlab
from batchlab.devices import cpu
from batchlab.fit.search import check_host_room
from batchlab.workloads import load_workload
states = [cpu._allocator]
check_host_room(load_workload("mlp-digits"), 64, what="a check")  # untouched: measured, then the speed back
states.append(cpu._allocator)
batchlab.find_batch_size(load_workload("mlp-digits"), device="cpu")  # the user measures ...
check_host_room(load_workload("mlp-digits"), 64, what="a check")  # ... and the exact readings stay theirs
states.append(cpu._allocator)
print("|".join(map(str, states)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "None|fast|exact after fast"
