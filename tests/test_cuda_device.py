"""CUDADevice tested without a GPU, against a scripted stand-in for the ``torch.cuda`` memory API (issue 10
item 6). The card run itself remains for a machine with a GPU (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from batchlab import Workload, find_batch_size
from batchlab.devices import CUDADevice
from batchlab.devices import release as release_module

MiB = 2**20
BLOCK = 2 * MiB  # the caching allocator reserves large allocations in 2 MiB-rounded segments


class ScriptedCUDA:
    """The calls CUDADevice and the release path make on ``torch.cuda``, over a scripted caching allocator.

    ``allocate``/``free`` stand for tensors: allocated bytes are exact, reserved bytes grow in 2 MiB segments
    and stay cached after a free until ``empty_cache``; an allocation whose segment would pass the card (or the
    per-process fraction) raises torch's OutOfMemoryError, as the real allocator does, after freeing the cache
    once and retrying (CUDACachingAllocator's ``release_cached_blocks`` before giving up).
    """

    def __init__(self, total: int, other_processes: int = 0):
        self.total, self.other_processes = total, other_processes
        self.fraction = 1.0
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.empty_cache_calls = 0
        self.initialized = True

    # -- the API
    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def current_device(self):
        return 0

    def mem_get_info(self, device=None):
        return self.total - self.other_processes - self.reserved, self.total

    def memory_reserved(self, device=None):
        return self.reserved

    def memory_allocated(self, device=None):
        return self.allocated

    def max_memory_reserved(self, device=None):
        return self.peak_reserved

    def max_memory_allocated(self, device=None):
        return self.peak_allocated

    def reset_peak_memory_stats(self, device=None):
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def empty_cache(self):
        self.empty_cache_calls += 1
        self.reserved = -(-self.allocated // BLOCK) * BLOCK  # segments still holding live tensors stay

    def synchronize(self, device=None):
        pass

    def get_per_process_memory_fraction(self, device=None):
        return self.fraction

    def set_per_process_memory_fraction(self, fraction, device=None):
        self.fraction = fraction

    # -- the script
    def _limit(self):
        return min(self.total - self.other_processes, int(self.fraction * self.total))

    def allocate(self, nbytes: int) -> None:
        needed = -(-(self.allocated + nbytes) // BLOCK) * BLOCK
        if needed > self.reserved and needed > self._limit():
            self.empty_cache()
            needed = -(-(self.allocated + nbytes) // BLOCK) * BLOCK
            if needed > self._limit():
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes / MiB:.2f} MiB. GPU 0 has a total capacity "
                    f"of {self.total / 2**30:.2f} GiB (scripted stand-in)"
                )
        self.allocated += nbytes
        self.reserved = max(self.reserved, needed)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes


@pytest.fixture
def flushed(monkeypatch):
    """Record the release path's failed-backward flushes (a real one would need a card)."""
    calls = []
    monkeypatch.setattr(
        release_module, "flush_failed_backward", lambda device="cpu": calls.append(str(device))
    )
    return calls


def _step(cuda: ScriptedCUDA, per_sample: int, fixed: int = 0, workspace=None):
    """A training step's allocations: ``fixed`` (state) kept, ``per_sample`` x b freed after the step."""
    seen_shapes = set()

    def step(batch_size):
        if fixed and cuda.allocated < fixed:
            cuda.allocate(fixed)  # parameters' gradients and optimizer state: created once, kept
        cuda.allocate(per_sample * batch_size)  # activations, alive until backward
        if workspace is not None and torch.backends.cudnn.benchmark and batch_size not in seen_shapes:
            seen_shapes.add(
                batch_size
            )  # cuDNN's autotuner, inside a convolution: candidates' workspaces, once
            cuda.allocate(workspace)
            cuda.free(workspace)
        cuda.free(per_sample * batch_size)

    return step


def test_capacity_is_free_memory_plus_what_torch_holds_capped_by_the_process_fraction():
    cuda = ScriptedCUDA(total=16 << 30, other_processes=3 << 30)
    cuda.allocate(1 << 30)
    device = CUDADevice(0, cuda=cuda)
    assert device.capacity_bytes() == (16 << 30) - (3 << 30)  # other processes' memory is not ours
    cuda.set_per_process_memory_fraction(0.5)
    assert device.capacity_bytes() == 8 << 30
    assert device.in_use_bytes() == 1 << 30


def test_peak_is_reserved_with_allocated_alongside_and_the_overhead_is_reported_apart(flushed):
    cuda = ScriptedCUDA(total=8 << 30)
    device = CUDADevice(0, cuda=cuda)
    per_sample = 3 * MiB + 12345  # not a multiple of the segment: the allocator rounds up
    measurement = device.run(_step(cuda, per_sample), 100, 2)
    assert measurement.ok
    assert measurement.allocated_bytes == 100 * per_sample
    assert measurement.peak_bytes == -(-(100 * per_sample) // BLOCK) * BLOCK

    # A Workload (its tensors known) whose step also allocates on the stand-in card: the split names the
    # allocator's overhead (reserved - allocated) apart from the activations.
    class OnTheStandIn(Workload):
        def step(self, batch_size):
            loss = super().step(batch_size)
            _step(cuda, per_sample)(batch_size)
            return loss

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    workload = OnTheStandIn(model, lambda b: (torch.randn(b, 4), torch.randn(b, 4)), torch.nn.functional.mse_loss,
                            torch.optim.Adam(model.parameters()))  # fmt: skip
    result = find_batch_size(workload, device=device, batch=100)
    split, probe = result.memory_breakdown, result.probes[-1]
    assert (
        split.allocator_overhead == probe.peak_bytes - probe.allocated_bytes
        and 0 < split.allocator_overhead < BLOCK
    )
    assert split.optimizer_state == 2 * (16 + 4) * 4 + 2 * 4  # Adam's moments and step counters, apart
    assert (
        split.activations
        == probe.peak_bytes
        - probe.baseline_bytes
        - split.allocator_overhead
        - split.gradients
        - split.optimizer_state
    )
    assert split.total == result.peak_bytes


def test_an_earlier_probes_cache_is_emptied_before_the_next_probe_is_read(flushed):
    cuda = ScriptedCUDA(total=8 << 30)
    device = CUDADevice(0, cuda=cuda)
    device.run(_step(cuda, 10 * MiB), 200, 2)  # leaves 2 GiB cached
    assert cuda.reserved >= 2000 * MiB
    small = device.run(_step(cuda, 10 * MiB), 10, 2)
    assert small.peak_bytes == 100 * MiB and small.baseline_bytes == 0


def test_an_oom_mid_step_is_a_failed_measurement_and_the_memory_is_released_after_it(flushed):
    cuda = ScriptedCUDA(total=1 << 30)
    device = CUDADevice(0, cuda=cuda)

    def step(batch_size):
        cuda.allocate(400 * MiB)  # forward: kept until backward
        try:
            cuda.allocate(batch_size * MiB)  # backward's buffer: runs out at large b
            cuda.free(batch_size * MiB)
        finally:
            cuda.free(400 * MiB)  # the step's tensors die as the exception leaves its frames

    calls = cuda.empty_cache_calls
    failed = device.run(step, 800, 2)
    assert not failed.ok and failed.error.startswith("CUDA out of memory") and failed.peak_bytes >= 400 * MiB
    # The device released after leaving the except block: the cache emptied (once more than _begin's and the
    # allocator's own retry), the failed backward's graph flushed on the CPU and on the card.
    assert cuda.empty_cache_calls == calls + 3 and cuda.reserved == 0
    assert flushed == ["cpu", "cuda:0"]
    assert device.run(step, 100, 2).ok  # and the next probe has the whole card


def test_a_search_on_the_stand_in_answers_within_the_budget_and_records_the_allocator_settings(
    flushed, monkeypatch
):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda = ScriptedCUDA(total=4 << 30)
    result = find_batch_size(_step(cuda, 5 * MiB, fixed=512 * MiB), device=CUDADevice(0, cuda=cuda))
    assert result.fits and result.peak_bytes <= result.budget_bytes == int(0.9 * (4 << 30))
    truth = (int(0.9 * (4 << 30)) - 512 * MiB) // (5 * MiB)
    assert 0.97 * truth <= result.batch_size <= truth
    assert result.device_settings == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "cudnn_benchmark": False,
        "per_process_memory_fraction": 1.0,
    }


def test_with_cudnn_benchmark_on_the_autotuners_workspace_is_in_the_measured_peak(flushed, monkeypatch):
    cuda = ScriptedCUDA(total=4 << 30)
    device = CUDADevice(0, cuda=cuda)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with_autotune = find_batch_size(_step(cuda, 5 * MiB, workspace=900 * MiB), device=device, batch=100)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    without = find_batch_size(_step(cuda, 5 * MiB, workspace=900 * MiB), device=device, batch=100)
    assert with_autotune.peak_bytes == 900 * MiB + 500 * MiB and without.peak_bytes == 500 * MiB
    assert with_autotune.device_settings["cudnn_benchmark"] is True


def test_no_cuda_is_a_clear_error():
    class NoCUDA(ScriptedCUDA):
        def is_available(self):
            return False

    with pytest.raises(RuntimeError, match=r"CUDA is not available in this process"):
        CUDADevice(0, cuda=NoCUDA(1))
    with pytest.raises(ValueError, match="CUDADevice needs a cuda device, got cpu"):
        CUDADevice("cpu", cuda=ScriptedCUDA(1))
