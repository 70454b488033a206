"""The fake device: estimates against the CPU's measured step, the breakdown, the user's state, and what fakes cannot run."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from batchlab import StepFunction, Workload, WorkloadError, find_batch_size
from batchlab.devices import CPUDevice
from batchlab.errors import FakeTensorError
from batchlab.memory import MemoryBreakdown
from batchlab.planning.allocator import (
    BLOCK_BYTES,
    MID_SEGMENT_BYTES,
    SMALL_SEGMENT_BYTES,
    CachingAllocatorModel,
)
from batchlab.planning.cards import CUBLAS_WORKSPACE_BYTES_SM90
from batchlab.planning.fake import FakeDevice, _torch_internals
from batchlab.planning.kernels import onednn_lstm_workspace_bytes
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
    assert parts.activations > 0 and parts.allocator_overhead == parts.cuda_workspace == 0
    assert estimate.steps == 2 and estimate.emulated_on == "cpu"


def test_bf16_autocast_shrinks_the_activations(cnn):
    bf16 = Workload(cnn.model, cnn.make_batch, cnn.loss_fn, cnn.optimizer, amp="bf16")
    fp32_parts, bf16_parts = (FakeDevice(w).estimate(8).breakdown for w in (cnn, bf16))
    assert bf16_parts.activations < 0.75 * fp32_parts.activations
    assert bf16_parts.parameters == fp32_parts.parameters  # autocast keeps fp32 weights


def test_cuda_target_adds_allocator_overhead_and_the_cublas_workspace(cnn):
    cpu = FakeDevice(cnn, device_type="cpu").estimate(8)
    cuda = FakeDevice(cnn, device_type="cuda").estimate(8)
    parts = cuda.breakdown
    assert parts.total == cuda.peak_bytes
    assert parts.cuda_workspace == CUBLAS_WORKSPACE_BYTES_SM90  # generation unknown: the larger workspace
    assert parts.allocator_overhead > 0
    assert cuda.peak_bytes >= cpu.peak_bytes + parts.cuda_workspace
    assert cuda.allocated_bytes <= cuda.peak_bytes  # allocated blocks never exceed the reserved segments


def test_allocator_model_rounds_blocks_and_packs_segments():
    model = CachingAllocatorModel()
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


class RecurrentClassifier(nn.Module):
    """Tokens -> embedding -> a stacked ``cell`` (nn.LSTM / nn.GRU) -> the last step's logits."""

    def __init__(
        self, cell: type[nn.RNNBase], vocab: int, embed: int, hidden: int, layers: int, classes: int
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = cell(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def recurrent_workload(cell: type[nn.RNNBase], *, hidden: int = 96, steps: int = 16) -> Workload:
    """A small 2-layer recurrent classifier with Adam: the issue's shape (embed < hidden), scaled down for speed."""
    torch.manual_seed(0)
    return Workload(
        RecurrentClassifier(cell, vocab=500, embed=48, hidden=hidden, layers=2, classes=5),
        lambda b: (torch.randint(0, 500, (b, steps)), torch.randint(0, 5, (b,))),
        nn.functional.cross_entropy,
        lambda params: torch.optim.Adam(params, lr=1e-3),
        name=f"{cell.__name__.lower()}-classifier",
    )


def memtracker_peak(workload: Workload, batch_size: int, steps: int = 2) -> int:
    """torch's MemTracker over ``steps`` real steps: the count the fake run is held to, on real tensors."""
    tracker = _torch_internals()["MemTracker"]()
    tracker.track_external(workload.model, workload.optimizer)
    snapshot = workload.snapshot()
    with tracker:
        for _ in range(steps):
            tracker.reset_mod_stats()  # as FakeDevice does: a second root forward needs it
            workload.step(batch_size)
    snapshot.restore()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return int(next(value for key, value in peak.items() if getattr(key, "value", key) == "Total"))


class _RealWorkspaces(TorchDispatchMode):
    """Records the training workspace each real aten.mkldnn_rnn_layer call allocates."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mkldnn_rnn_layer.default:
            self.sizes.append(out[3].nbytes)
        return out


@pytest.mark.parametrize(
    ("embed", "hidden", "steps", "batch", "bidirectional", "dtype"),
    [
        (24, 40, 7, 5, False, torch.float32),  # nothing aligned: every part padded to a page
        (48, 64, 16, 8, False, torch.float32),  # 4 * 64 gates: a multiple of 256, padded by get_good_ld
        (100, 100, 10, 3, True, torch.float32),  # the reverse direction and a wider second-layer input
        (256, 512, 8, 32, False, torch.float32),  # the layer widths
        (24, 40, 7, 5, False, torch.bfloat16),  # 2-byte data, f32 diff states
    ],
)
def test_the_onednn_lstm_workspace_formula_matches_the_real_kernel_byte_for_byte(
    embed, hidden, steps, batch, bidirectional, dtype
):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels: torch runs bf16 LSTMs step by step")
    torch.manual_seed(0)
    lstm = nn.LSTM(embed, hidden, num_layers=2, bidirectional=bidirectional).to(dtype)
    real = _RealWorkspaces()
    with real:
        lstm(torch.randn(steps, batch, embed, dtype=dtype))
    directions = 2 if bidirectional else 1
    second_input = hidden * directions
    expected = [
        onednn_lstm_workspace_bytes(
            steps, batch, width, hidden, itemsize=dtype.itemsize, cell_itemsize=dtype.itemsize
        )
        for width in [embed] * directions + [second_input] * directions
    ]
    assert real.sizes == expected


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_classifiers_estimate_what_memtracker_counts_on_real_tensors(cell):
    # The fake run against torch's MemTracker on real tensors: the same counter, so the stated tolerance is
    # 1% (measured equal to the byte here, LSTM and GRU, fp32 and bf16). Before oneDNN's LSTM workspace was
    # put back, the LSTM read -73% (benchmarks/RESULTS.md); the GRU runs as per-step ops and always matched.
    workload = recurrent_workload(cell)
    fake = FakeDevice(workload, device_type="cpu")
    for batch_size in (8, 32):
        estimate, real = fake.estimate(batch_size).peak_bytes, memtracker_peak(workload, batch_size)
        assert abs(estimate - real) <= 0.01 * real, (batch_size, estimate, real)
    if cell is nn.LSTM:  # both layers' workspaces are live at the peak, counted as activations
        workspaces = onednn_lstm_workspace_bytes(16, 32, 48, 96) + onednn_lstm_workspace_bytes(16, 32, 96, 96)
        assert fake.estimate(32).breakdown.activations > workspaces


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_estimates_are_never_below_the_cpu_devices_measured_step(cell):
    # The process's resident peak (VmHWM) can sit below the tensors' bytes: Linux backs the parts of oneDNN's
    # workspace that only the backward pass writes (the diff states) when it writes them, and the backward of
    # the upper layer frees its workspace before the lower layer's diff states are touched. Measured on the
    # issue's 2-layer LSTM: -28% at batch 128. It must never sit above beyond the CNN test's 5% + 1 MiB.
    workload, device = recurrent_workload(cell), CPUDevice()
    snapshot = workload.snapshot()
    device.run(workload.step, 8, 2)  # warm-up: oneDNN's primitives and torch's one-time set-up
    snapshot.restore()
    measured = device.run(workload.step, 64, 2)
    snapshot.restore()
    estimate = FakeDevice(workload, device_type="cpu").estimate(64)
    real_step = measured.peak_bytes - measured.baseline_bytes
    assert real_step <= 1.05 * (estimate.peak_bytes - estimate.baseline_bytes) + MiB


class _CudnnLSTM(nn.LSTM):
    """An LSTM that calls cuDNN's kernel itself, as ``nn.LSTM`` does on fake CUDA tensors."""

    def forward(self, x):
        zeros = x.new_zeros(1, x.shape[1], self.hidden_size)
        weights = [self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0]
        args = (
            x,
            weights,
            4,
            None,
            zeros,
            zeros,
            2,
            self.hidden_size,
            0,
            1,
            False,
            0.0,
            self.training,
            False,
            [],
            None,
        )
        return torch.ops.aten._cudnn_rnn.default(*args)[0].sum(0)


def test_a_gpu_rnn_kernel_whose_reserve_space_fakes_cannot_size_is_refused_naming_it():
    # torch's fake _cudnn_rnn returns an empty reserve space ("TODO: Query cudnnGetRNNTrainingReserveSize"):
    # counting it would under-estimate every recurrent layer on a GPU, so the estimate refuses in one line.
    workload = Workload(
        _CudnnLSTM(8, 16),
        lambda b: (torch.randn(5, b, 8), torch.randint(0, 16, (b,))),
        nn.functional.cross_entropy,
        lambda params: torch.optim.SGD(params, lr=0.1),
        name="cudnn-lstm",
    )
    with pytest.raises(
        FakeTensorError,
        match=r"^[^\n]*'cudnn-lstm': aten\._cudnn_rnn\.default \(a recurrent layer on the GPU\)",
    ) as info:
        FakeDevice(workload).estimate(4)
    assert info.value.op == "aten._cudnn_rnn.default"


def test_a_cuda_target_emulated_on_the_cpu_says_recurrent_layers_are_counted_as_the_cpu_runs_them():
    if torch.cuda.is_available():
        pytest.skip("with CUDA the fake run uses fake CUDA tensors and cuDNN's kernel, which is refused")
    lstm = recurrent_workload(nn.LSTM)
    cuda, cpu = (FakeDevice(lstm, device_type=kind).estimate(8) for kind in ("cuda", "cpu"))
    assert any("cuDNN sizes its own reserve space" in note for note in cuda.notes)
    assert cuda.breakdown.activations == cpu.breakdown.activations  # oneDNN's workspace counted on both
    plain = FakeDevice(tiny_bn_workload(), device_type="cuda").estimate(8)
    assert not any("reserve space" in note for note in plain.notes)


def test_private_torch_pieces_are_where_the_adapter_expects_them():
    # The one place batchlab reaches into torch internals: fail here, not in a user's plan, when they move.
    from torch.distributed._tools import mem_tracker

    from batchlab.planning.fake import _CATEGORIES

    names = _torch_internals()
    assert all(callable(value) for value in names.values())
    assert {member.value for member in mem_tracker._MemRefType} == set(_CATEGORIES)
    assert hasattr(names["MemTracker"], "reset_mod_stats") and hasattr(names["MemTracker"], "track_external")
    # The RNN kernels' arguments KernelWorkspaces reads by name.
    aten = torch.ops.aten
    for op, wanted in [
        (aten.mkldnn_rnn_layer.default, {"input", "weight0", "cx_", "hidden_size"}),
        (aten._cudnn_rnn.default, {"train"}),
        (aten.miopen_rnn.default, {"train"}),
    ]:
        assert wanted <= {argument.name for argument in op._schema.arguments}, op
