"""The CPU device and the search on real models: bitwise state, repeatable and linear readings, OOM hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from batchlab import BatchlabError, DoesNotFitError, find_batch_size
from batchlab.defaults import DEFAULT_FRACTION
from batchlab.devices import CPUDevice
from batchlab.devices.base import Measurement
from batchlab.workload.state import copy_storage
from batchlab.workloads import load_workload
from conftest import in_a_fresh_process, tiny_bn_workload

MiB = 2**20


def state_of(workload):
    """Everything a probe could change, as plain tensors/values for a bitwise comparison."""
    model, optimizer = workload.model, workload.optimizer
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "opt_state": {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for i, p in enumerate(model.parameters())
            if p in optimizer.state
        },
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "rng": torch.get_rng_state().clone(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def assert_bitwise_equal(before, after):
    assert len(before["params"]) == len(after["params"])
    for a, b in zip(before["params"] + before["buffers"], after["params"] + after["buffers"]):
        assert torch.equal(a, b) and a.dtype == b.dtype
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["training"] == after["training"]
    assert before["opt_state"].keys() == after["opt_state"].keys()
    for i, state in before["opt_state"].items():
        for key, value in state.items():
            assert (
                torch.equal(value, after["opt_state"][i][key])
                if torch.is_tensor(value)
                else value == after["opt_state"][i][key]
            )
    assert before["groups"] == after["groups"]
    assert torch.equal(before["rng"], after["rng"])
    assert np.array_equal(before["np_rng"], after["np_rng"])


@pytest.mark.parametrize("trained_first", [False, True], ids=["fresh optimizer", "after real steps"])
def test_batchnorm_adam_model_is_bitwise_unchanged_after_a_cpu_search(trained_first):
    workload = tiny_bn_workload()
    if trained_first:  # existing Adam moments, gradients and running stats must survive too
        for _ in range(3):
            workload.step(16)
    workload.model.eval()  # a non-default mode must come back as it was
    before = state_of(workload)
    result = find_batch_size(
        workload,
        device="cpu",
        memory_budget=int((CPUDevice().in_use_bytes() + 64 * MiB) / DEFAULT_FRACTION),
        max_batch_size=4096,
    )
    assert result.fits and len(result.probes) >= 3
    assert_bitwise_equal(before, state_of(workload))
    # The search ran real steps: running stats moved during probes, so this test can fail.
    assert any(p.tensor_bytes.optimizer_state > 0 for p in result.probes if p.fits)


def test_state_is_restored_when_a_probe_fails_mid_step():
    workload = tiny_bn_workload()
    before = state_of(workload)
    original_step = workload.step
    calls = []

    def step_then_bug(batch_size):
        calls.append(batch_size)
        original_step(batch_size)  # the optimizer has stepped and BatchNorm has updated...
        if len(calls) == 5:
            raise KeyError("a bug in the user's loop")  # ...then the user's code fails

    workload.step = step_then_bug
    with pytest.raises(KeyError, match="a bug in the user's loop"):
        find_batch_size(workload, device="cpu", max_batch_size=4096)
    workload.step = original_step
    assert_bitwise_equal(before, state_of(workload))


def _peaks(workload, device, sizes, repeats=1):
    snapshot = workload.snapshot()
    readings = {}
    try:
        for b in sizes:
            for _ in range(repeats):
                m = device.run(workload.step, b, steps=2)
                snapshot.restore()
                readings.setdefault(b, []).append((m.peak_bytes, m.peak_bytes - m.baseline_bytes))
    finally:
        snapshot.restore()
    return readings


CNN_READINGS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from batchlab.devices import CPUDevice
from batchlab.workloads import load_workload
from test_cpu import _peaks

workload, device = load_workload("cnn"), CPUDevice()
assert device.glibc  # the 64 KiB mmap threshold is in effect
# Warm-up, excluded: a process's first step also creates oneDNN/OpenMP pools (~10 MiB here), which stay.
_peaks(workload, device, [8])
print(json.dumps(_peaks(workload, device, [8, 16, 32, 48], repeats=3)))
"""


def test_cpu_readings_repeat_within_two_percent_and_grow_linearly_on_the_cnn():
    """In a fresh process (conftest.in_a_fresh_process): late in the full suite, on a loaded machine, one of
    three step readings at batch 8 came out 7% under the other two (29.2 against 31.3 MB), while the test alone
    passed 3 of 3 -- the heap the earlier tests left behind, not the device's reading."""
    readings = {int(b): values for b, values in in_a_fresh_process(CNN_READINGS).items()}
    for b, values in readings.items():
        peaks = [peak for peak, _ in values]
        steps = [step for _, step in values]
        assert max(peaks) / min(peaks) < 1.02, (b, peaks)
        assert max(steps) / min(steps) < 1.02, (b, steps)
    sizes = np.array(sorted(readings))
    peaks = np.array([np.median([p for p, _ in readings[b]]) for b in sizes])
    slope, intercept = np.polyfit(sizes, peaks, 1)
    residual = np.abs(peaks - (slope * sizes + intercept)).max()
    assert 3.0 * MiB < slope < 4.5 * MiB  # ~3.5-3.8 MiB per 64x64 image (DESIGN.md)
    assert residual < 0.01 * (peaks[-1] - peaks[0]), (residual / MiB, slope / MiB)


def test_twenty_ooms_on_the_cpu_leave_memory_at_its_starting_level():
    device = CPUDevice()
    hold = []

    def step_that_runs_out(batch_size):
        activations = torch.ones(batch_size, 256, 1024)  # real, touched memory: 1 MiB per sample
        hold.append(activations.sum())
        torch.empty(2**62, dtype=torch.uint8)  # the allocator refuses: a real CPU out-of-memory error

    start = device.in_use_bytes()
    for _ in range(20):
        result = find_batch_size(step_that_runs_out, device=device, batch=50)
        assert not result.fits and result.probes[-1].outcome == "oom"
        assert "DefaultCPUAllocator" in result.probes[-1].error
    assert device.in_use_bytes() - start < 16 * MiB  # 50 MiB was held at each of the 20 failures

    # And a tiny budget: every probe is over budget; nothing accumulates either. The first search is a
    # warm-up, excluded: a process's first steps create oneDNN/OpenMP pools that stay (~20 MiB here).
    workload = load_workload("cnn")
    with pytest.raises(DoesNotFitError):
        find_batch_size(workload, device=device, memory_budget=device.in_use_bytes() // 2)
    start = device.in_use_bytes()
    for _ in range(20):
        with pytest.raises(DoesNotFitError, match="batch 1 does not fit"):
            find_batch_size(workload, device=device, memory_budget=start // 2)
    assert device.in_use_bytes() - start < 16 * MiB


def test_a_shape_error_in_the_model_surfaces_unchanged():
    workload = load_workload("cnn")
    workload.make_batch = lambda b: (torch.randn(b, 3, 64), torch.randint(0, 10, (b,)))  # wrong rank
    with pytest.raises(RuntimeError) as info:
        find_batch_size(workload, device="cpu")
    assert "Expected 3D" in str(info.value) or "expected" in str(info.value).lower()
    assert "fit" not in str(info.value)


def test_fixed_batch_on_cpu_reports_what_it_needs():
    workload = load_workload("mlp-digits")
    result = find_batch_size(workload, device="cpu", batch=64)
    assert result.fits and result.mode == "fixed" and result.batch_size == 64
    assert result.peak_bytes > 0 and result.memory_breakdown.optimizer_state > 0


def test_cpu_never_runs_a_fixed_batch_predicted_above_ram():
    workload = load_workload("cnn")
    result = find_batch_size(workload, device="cpu", batch=10_000_000)  # ~35 TiB: would be killed, not raised
    assert not result.fits
    assert result.probes[-1].outcome == "skipped" and result.probes[-1].batch_size == 10_000_000
    assert [p.batch_size for p in result.probes[:-1]] == [2, 4]


def test_batchnorm_error_at_batch_one_propagates_unchanged_with_a_note_that_batch_two_did_not_fit():
    # A non-OOM error of the user's model surfaces as itself (errors.py), also at the batch-1 fallback.
    workload = tiny_bn_workload()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as info:
        find_batch_size(workload, device="cpu", memory_budget=CPUDevice().in_use_bytes() // 2)
    assert not isinstance(info.value, DoesNotFitError)
    assert any("batch 2 did not fit" in note for note in getattr(info.value, "__notes__", []))


class _FailInBackward(torch.autograd.Function):
    """Identity forward; its backward raises an out-of-memory error, as a branch running out would."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory: injected in backward")


def test_an_oom_inside_backward_does_not_leave_the_failed_graph_in_memory():
    # pytorch#82218: a backward that raised keeps its saved tensors until the next backward runs.
    weight = torch.nn.Parameter(torch.randn(512, 512))

    def step(batch_size, fail):
        h = torch.randn(batch_size, 512) @ weight
        for _ in range(8):
            h = torch.tanh(h @ weight)
        main = torch.tanh(h @ weight)
        short = _FailInBackward.apply(h) if fail else h * 1  # the failing branch runs after the main one
        (main + short).sum().backward()
        weight.grad = None

    device = CPUDevice()
    device.run(lambda b: step(b, False), 4096, 1)  # warm-up
    start = device.in_use_bytes()
    failed = device.run(lambda b: step(b, True), 4096, 1)
    assert not failed.ok and "injected in backward" in failed.error
    assert device.in_use_bytes() - start < 24 * MiB  # ~80 MiB of saved activations stay without the flush


def test_cpu_readings_are_net_of_the_searchs_own_state_copy():
    class Recording(CPUDevice):
        def run(self, step, batch_size, steps=2):
            measurement = super().run(step, batch_size, steps)
            raw.append(measurement)
            return measurement

    raw = []
    workload = load_workload("gpt")  # parameters only, no gradients or optimizer state yet: the copy is exact
    copy_bytes = sum({id(p): p.numel() * p.element_size() for p in workload.model.parameters()}.values())
    result = find_batch_size(workload, device=Recording(), batch=4)
    assert [p.peak_bytes for p in result.probes] == [m.peak_bytes - copy_bytes for m in raw]
    assert [p.baseline_bytes for p in result.probes] == [m.baseline_bytes - copy_bytes for m in raw]
    assert any("net of batchlab's own state copy" in note for note in result.notes)


def test_an_oom_that_the_state_copy_may_cause_sends_the_copy_to_disk_and_runs_that_size_again(
    tmp_path, monkeypatch
):
    # A limit that raises and counts the whole process (RLIMIT_AS, a raising allocator, the benchmark's emulated
    # budget) also counts the search's own state copy, which the user's run will not hold.
    monkeypatch.setenv("BATCHLAB_STATE_DIR", str(tmp_path))
    try:
        copy_storage(1, 1 << 40, requested="disk")
    except BatchlabError as exc:
        pytest.skip(f"a state copy on disk is not possible here: {exc}")
    model = torch.nn.Linear(4096, 4096)  # 64 MiB of parameters: a 64 MiB copy while it is in RAM

    class Wall(CPUDevice):
        """Step memory 100 MiB + 20 MiB per sample above the process as built; out of memory past the budget,
        counting whatever else the process holds by then (the search's copy, while it is in RAM)."""

        def __init__(self, room: int):
            super().__init__()
            self.start = self.in_use_bytes()
            self.budget = self.start + room  # the wall: the search's own budget, as in the benchmark

        def capacity_bytes(self) -> int:
            return int(self.budget / DEFAULT_FRACTION) + 1

        def run(self, step, batch_size, steps=2):
            held = self.in_use_bytes()
            for _ in range(steps):
                step(batch_size)
            peak = held + (100 + 20 * batch_size) * MiB
            if peak > self.budget:
                return Measurement(
                    batch_size, False, None, held, 0.0, steps, None, "DefaultCPUAllocator: wall"
                )
            return Measurement(batch_size, True, peak, held, 0.0, steps)

    device = Wall(room=475 * MiB)  # net of the copy 18 samples fit (460 MiB + a few of the search's own)
    result = find_batch_size(lambda b: None, preserve=(model,), device=device)
    assert result.budget_bytes == device.budget
    tries = [(p.batch_size, p.outcome) for p in result.probes]
    # The growth scout at 16 ran out with the copy in RAM (64 + 420 MiB) and fit once the copy had gone to disk;
    # 19, one past the prediction, ran out as the line expected, and 18 then ran in full after it.
    assert tries == [(2, "fits"), (16, "oom"), (16, "fits"), (19, "oom"), (18, "fits")]
    assert result.batch_size == 18 and result.state_copy_storage == "disk"
    want = "batch 16 ran out of memory with batchlab's state copy (64.02 MiB) in the process"
    assert any(note.startswith(want) and note.endswith("batch 16 ran again") for note in result.notes)


class _Shifting(CPUDevice):
    """Step memory ``fixed + per_sample * b`` MiB (+6 MiB read at 16: noise that steepens the first line) above
    the process; ``shift`` MiB more for good after the first out-of-memory error, as torch's unwinder pages in;
    out of memory past ``room`` MiB."""

    def __init__(self, fixed: float, per_sample: float, room: float, shift: float):
        super().__init__()
        self.start = self.in_use_bytes()
        self.budget = self.start + int(room * MiB)
        self.fixed, self.per_sample, self.shift, self.shifted = fixed, per_sample, shift, 0.0

    def capacity_bytes(self) -> int:
        return int(self.budget / DEFAULT_FRACTION) + 1

    def run(self, step, batch_size, steps=2):
        for _ in range(steps):
            step(batch_size)
        mib = self.fixed + self.per_sample * batch_size + 6 * (batch_size == 16) + self.shifted
        peak = self.start + int(mib * MiB)
        if peak > self.budget:
            self.shifted = self.shift
            return Measurement(batch_size, False, None, self.start, 0.0, steps, None, "DefaultCPUAllocator")
        return Measurement(batch_size, True, peak, self.start, 0.0, steps)


def test_the_answer_runs_in_full_after_the_searchs_last_out_of_memory_error():
    # On the CPU the first out-of-memory error pages in ~4 MiB of torch's unwinder for good: the answer must fit
    # the process as the search leaves it.
    result = find_batch_size(lambda b: None, device=_Shifting(100, 10, room=305, shift=6))
    tries = [(p.batch_size, p.outcome, p.verified) for p in result.probes]
    # 20 fit in full (300 MiB) and 21 then ran out; after that error 20 read 306 MiB: the answer is 19, run in
    # full after the error (18 was a scout in the bracket it left).
    assert tries == [
        (2, "fits", True),
        (16, "fits", False),
        (20, "fits", True),
        (21, "oom", True),
        (20, "oom", True),
        (18, "fits", False),
        (19, "fits", True),
    ]
    assert result.batch_size == 19


def test_fast_allocator_gives_training_its_thresholds_back_and_later_readings_stay_conservative():
    # In a fresh process: the threshold is process-wide. A reading after fast_allocator() must not read low
    # (freed chunks in the fast heap would serve the step's tensors unread): each reading trims the heap first.
    code = textwrap.dedent(
        """
        import json
        from batchlab.devices.cpu import CPUDevice, fast_allocator
        from batchlab.workloads import load_workload
        device, workload = CPUDevice(), load_workload("cnn")
        snapshot = workload.snapshot()
        def step_mib(b):
            m = device.run(workload.step, b, 2); snapshot.restore()
            return (m.peak_bytes - m.baseline_bytes) / 2**20
        step_mib(4)  # warm-up: oneDNN's one-time set-up
        exact = step_mib(4)
        settings_exact = device.settings()["allocator"]
        assert fast_allocator()
        for _ in range(3):
            workload.step(16)  # training at speed: the heap keeps large freed chunks
        snapshot.restore()
        after = step_mib(4)
        print(json.dumps([exact, after, settings_exact, device.settings()["allocator"]]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    exact, after, before_text, after_text = json.loads(out.stdout.strip().splitlines()[-1])
    assert exact > 1 and after >= exact  # conservative: never below the exact reading
    assert before_text == "glibc, mmap threshold 64 KiB (exact readings)"
    assert after_text.startswith("glibc, mmap threshold 64 KiB after fast_allocator()")


def test_the_training_twin_runs_with_the_speed_back_and_reads_high_never_low():
    # In a fresh process: the allocator is process-wide. A sweep's runs train on for_training(): glibc's speed
    # back (fast_allocator), the heap trimmed before each run so the reading is of this run; the exact device
    # sets its threshold again for its next reading, which then reads high, never low (as after fast_allocator).
    code = textwrap.dedent(
        """
        import json
        from batchlab.devices import cpu
        from batchlab.workloads import load_workload
        device, workload = cpu.CPUDevice(), load_workload("cnn")
        snapshot = workload.snapshot()
        def step_mib(dev, b):
            m = dev.run(workload.step, b, 2); snapshot.restore()
            return (m.peak_bytes - m.baseline_bytes) / 2**20
        step_mib(device, 4)  # warm-up: oneDNN's one-time set-up
        exact = step_mib(device, 16)
        trainer = device.for_training()
        fast, during = step_mib(trainer, 16), cpu._allocator
        again, after = step_mib(device, 16), cpu._allocator
        print(json.dumps([exact, fast, again, during, after, trainer is device.for_training(),
                          trainer.for_training() is trainer, trainer.settings()["allocator"]]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    exact, fast, again, during, after, same, own, text = json.loads(out.stdout.strip().splitlines()[-1])
    assert during == "fast" and after == "exact after fast" and same and own
    assert fast >= 0.98 * exact and again >= 0.98 * exact  # readings repeat within 2%: high, never low
    assert text.startswith("glibc as training runs it (fast_allocator)")
