"""The fake device: estimates against the CPU's measured step, the breakdown, the user's state, and what fakes cannot run."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from batchlab import CPUDevice, StepFunction, Workload, WorkloadError, find_batch_size
from batchlab.devices.fake import (
    BLOCK_BYTES,
    MID_SEGMENT_BYTES,
    SMALL_SEGMENT_BYTES,
    FakeDevice,
    FakeTensorError,
    MemoryBreakdown,
    _CachingAllocatorModel,
    _torch_internals,
)
from batchlab.targets import CUBLAS_WORKSPACE_BYTES_SM90
from batchlab.workloads import load_workload
from conftest import tiny_bn_workload
from test_cpu import assert_bitwise_equal, state_of

MiB = 2**20


@pytest.fixture(scope="module")
def cnn():
    return load_workload("cnn", device="cpu")


def test_cnn_estimate_matches_the_cpu_devices_measured_step_at_three_sizes(cnn):
    # Compared with the CPU device's measured step-memory increase (VmHWM peak minus the resident memory
    # before, mmap threshold fixed): what a real search holds against its budget. The fake side is its peak
    # minus the tensors that existed before (parameters). Tolerance: 5% + 1 MiB -- RSS also holds oneDNN's
    # per-shape primitives and heap slack, measured here at -0.3%..-3.8% (benchmarks/RESULTS.md). Sizes are
    # small to keep the test fast; the benchmark runs larger ones.
    device, fake, snapshot = CPUDevice(), FakeDevice(cnn, device_type="cpu"), cnn.snapshot()
    device.run(cnn.step, 2, 2)  # warm-up: the first step ever also pays oneDNN's and torch's one-time set-up
    snapshot.restore()
    for batch_size in (2, 4, 8):
        measured = device.run(cnn.step, batch_size, 2)
        snapshot.restore()
        estimate = fake.estimate(batch_size)
        real_step = measured.peak_bytes - measured.baseline_bytes
        fake_step = estimate.peak_bytes - estimate.baseline_bytes
        assert abs(fake_step - real_step) <= 0.05 * real_step + MiB, (batch_size, fake_step, real_step)


def test_breakdown_sums_to_the_peak_and_counts_optimizer_state(cnn):
    estimate = FakeDevice(cnn, device_type="cpu").estimate(8)
    parts = estimate.breakdown
    assert isinstance(parts, MemoryBreakdown)
    assert sum(parts.to_dict().values()) == parts.total == estimate.peak_bytes
    params = sum(p.numel() * p.element_size() for p in cnn.model.parameters())
    assert parts.parameters == params == estimate.baseline_bytes
    # Adam's two moments (the second step runs with them) and one float32 step count per parameter tensor.
    assert parts.optimizer_state == 2 * params + 4 * len(list(cnn.model.parameters()))
    assert parts.activations > 0 and parts.allocator_rounding == parts.cuda_workspace == 0
    assert estimate.steps == 2 and estimate.emulated_on == "cpu"


def test_bf16_autocast_shrinks_the_activations(cnn):
    bf16 = Workload(cnn.model, cnn.make_batch, cnn.loss_fn, cnn.optimizer, amp="bf16")
    fp32_parts, bf16_parts = (FakeDevice(w).estimate(8).breakdown for w in (cnn, bf16))
    assert bf16_parts.activations < 0.75 * fp32_parts.activations
    assert bf16_parts.parameters == fp32_parts.parameters  # autocast keeps fp32 weights


def test_cuda_target_adds_allocator_rounding_and_the_cublas_workspace(cnn):
    cpu = FakeDevice(cnn, device_type="cpu").estimate(8)
    cuda = FakeDevice(cnn, device_type="cuda").estimate(8)
    parts = cuda.breakdown
    assert parts.total == cuda.peak_bytes
    assert parts.cuda_workspace == CUBLAS_WORKSPACE_BYTES_SM90  # generation unknown: the larger workspace
    assert parts.allocator_rounding > 0
    assert cuda.peak_bytes >= cpu.peak_bytes + parts.cuda_workspace
    assert cuda.allocated_bytes <= cuda.peak_bytes  # allocated blocks never exceed the reserved segments


def test_allocator_model_rounds_blocks_and_packs_segments():
    model = _CachingAllocatorModel()
    small = [torch.empty(100, dtype=torch.uint8) for _ in range(3)]
    for tensor in small:
        model.track(tensor)
    assert (model.allocated, model.reserved) == (3 * BLOCK_BYTES, SMALL_SEGMENT_BYTES)
    mid = torch.empty(5 * MiB, dtype=torch.uint8)  # 1-10 MiB: packed into 20 MiB segments
    large = torch.empty(11 * MiB + 1, dtype=torch.uint8)  # > 10 MiB: its own segment, rounded up to 2 MiB
    model.track(mid)
    model.track(large)
    model.track(mid[:MiB])  # a view: same storage, counted once
    assert model.reserved == SMALL_SEGMENT_BYTES + MID_SEGMENT_BYTES + 12 * MiB
    del large
    assert model.reserved == SMALL_SEGMENT_BYTES + MID_SEGMENT_BYTES  # freed storages leave the count
    assert model.peak_reserved == SMALL_SEGMENT_BYTES + MID_SEGMENT_BYTES + 12 * MiB


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_the_users_model_and_optimizer_stay_bitwise_unchanged(device_type):
    workload = tiny_bn_workload()
    for _ in range(2):  # gradients, Adam moments and BatchNorm running stats exist and must survive
        workload.step(16)
    before = state_of(workload)
    estimate = FakeDevice(workload, device_type=device_type).estimate(32)
    assert_bitwise_equal(before, state_of(workload))
    tensors = [*workload.model.parameters(), *workload.model.buffers()]
    tensors += [p.grad for p in workload.model.parameters()]
    tensors += [v for s in workload.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)  # nothing swapped for a fake
    assert estimate.baseline_bytes > sum(
        p.numel() * 4 for p in workload.model.parameters()
    )  # grads and state


class _Gated(nn.Module):
    """Uses a value-dependent op in forward: fine for real tensors, impossible for fake ones."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        out = self.linear(x)
        if self.op == "nonzero":
            return out + 0 * torch.nonzero(x[:, 0] > 0).shape[0]
        return out / (1 + x.abs().max().item())


def _gated_workload(op: str) -> Workload:
    torch.manual_seed(0)
    return Workload(
        _Gated(op),
        lambda b: (torch.randn(b, 8), torch.randint(0, 3, (b,))),
        nn.functional.cross_entropy,
        lambda params: torch.optim.SGD(params, lr=0.1),
        name=f"gated-{op}",
    )


@pytest.mark.parametrize(
    ("op", "named"), [("nonzero", "aten.nonzero.default"), ("item", "aten._local_scalar_dense.default")]
)
def test_a_value_dependent_op_names_itself_and_the_real_search_still_works(op, named):
    workload = _gated_workload(op)
    with pytest.raises(
        FakeTensorError, match=rf"cannot run workload 'gated-{op}': {named} .*batchlab fit"
    ) as info:
        FakeDevice(workload).estimate(8)
    assert info.value.op == named
    result = find_batch_size(
        workload, device="cpu", memory_budget=CPUDevice().in_use_bytes() + 256 * MiB, max_batch_size=64
    )
    assert result.fits and result.batch_size == 64


def test_a_custom_kernel_without_a_fake_implementation_names_the_op():
    @torch.library.custom_op("batchlab_test::square", mutates_args=())
    def square(x: torch.Tensor) -> torch.Tensor:
        return x * x

    model = nn.Linear(4, 2)
    workload = Workload(
        model,
        lambda b: (torch.randn(b, 4), torch.randn(b, 2)),
        lambda out, y: square(out - y).mean(),
        lambda params: torch.optim.SGD(params, lr=0.1),
        name="custom",
    )
    with pytest.raises(FakeTensorError, match=r"batchlab_test::square has no fake \(meta\) kernel"):
        FakeDevice(workload).estimate(4)


def test_gradient_accumulation_and_a_meta_device_model_run_on_fakes():
    # grad_accum calls the root module twice per step (MemTracker needs its module stats reset in between).
    workload = tiny_bn_workload()
    one = FakeDevice(workload).estimate(64)
    accumulated = Workload(
        workload.model, workload.make_batch, workload.loss_fn, workload.optimizer, grad_accum=2
    )
    assert FakeDevice(accumulated).estimate(64).peak_bytes >= one.peak_bytes
    # A model on the meta device never had weights: the estimate needs none (plan a model you cannot load).
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    meta = Workload(
        big,
        lambda b: (torch.randn(b, 4096), torch.randint(0, 10, (b,))),
        nn.functional.cross_entropy,
        lambda params: torch.optim.AdamW(params),
    )
    estimate = FakeDevice(meta).estimate(8)
    assert estimate.breakdown.parameters == sum(p.numel() * 4 for p in big.parameters())
    assert (
        estimate.breakdown.optimizer_state >= 2 * estimate.breakdown.parameters
    )  # moments (+ step temporaries)


def test_run_is_a_measurement_and_never_calls_the_step(cnn):
    device = FakeDevice(cnn, target="24GiB")
    calls = []
    measurement = device.run(calls.append, 8)
    assert calls == [] and measurement.ok and measurement.steps == 2
    assert measurement.peak_bytes == device.estimates[8].peak_bytes
    assert device.capacity_bytes() == 24 * 2**30 and device.in_use_bytes() == 0
    with pytest.raises(ValueError, match="has no target"):
        FakeDevice(cnn).capacity_bytes()


def test_bad_arguments_fail_before_anything_runs(cnn):
    with pytest.raises(TypeError, match="needs a batchlab.Workload"):
        FakeDevice(StepFunction(lambda b: None))
    with pytest.raises(ValueError, match="invalid device_type 'tpu'"):
        FakeDevice(cnn, device_type="tpu")
    with pytest.raises(ValueError, match="invalid batch_size 0"):
        FakeDevice(cnn).estimate(0)
    locked = tiny_bn_workload()
    locked.model.lock = (
        threading.Lock()
    )  # deepcopy cannot copy a lock: a clear WorkloadError, not a traceback
    with pytest.raises(WorkloadError, match="cannot copy workload 'tiny-bn'.*measure on the device instead"):
        FakeDevice(locked).estimate(4)


def test_private_torch_pieces_are_where_the_adapter_expects_them():
    # The one place batchlab reaches into torch internals: fail here, not in a user's plan, when they move.
    from torch.distributed._tools import mem_tracker

    from batchlab.devices.fake import _CATEGORIES

    names = _torch_internals()
    assert all(callable(value) for value in names.values())
    assert {member.value for member in mem_tracker._MemRefType} == set(_CATEGORIES)
    assert hasattr(names["MemTracker"], "reset_mod_stats") and hasattr(names["MemTracker"], "track_external")
