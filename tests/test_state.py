"""State restore, bitwise, in the cases users hit (issue 10 item 5) and the GradScaler's hidden state."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from batchlab import BatchlabError, find_batch_size
from batchlab.devices import SimulatedDevice
from batchlab.workload import StateSnapshot
from batchlab.workload.state import RNGState, copy_storage
from conftest import tiny_bn_workload


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_a_step_that_reassigns_a_parameter_or_buffer_gets_the_original_objects_back():
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight, running_mean = model[0].weight, model[1].running_mean
    before = {name: value.clone() for name, value in model.state_dict().items()}

    def step(batch_size):
        model(torch.randn(batch_size, 4)).sum().backward()
        optimizer.step()
        model[0].weight = nn.Parameter(model[0].weight.detach() * 2)  # a new object, not an in-place update
        model[1].running_mean = torch.full((8,), 7.0)  # a buffer reassigned
        model[1].register_buffer("extra", torch.ones(3))  # and one that did not exist

    find_batch_size(step, device=SimulatedDevice(lambda b: 1000 * b, capacity_bytes=10**6), batch=4,
                    preserve=(model, optimizer))  # fmt: skip
    assert model[0].weight is weight and model[1].running_mean is running_mean
    assert "extra" not in dict(model[1].named_buffers())
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_an_lr_scheduler_in_preserve_gets_its_epoch_and_lrs_back():
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()  # the user's loop has run one step: the scheduler is at epoch 1
    scheduler.step()
    before = (scheduler.last_epoch, scheduler.get_last_lr(), optimizer.param_groups[0]["lr"])
    before_state = scheduler.state_dict()

    def step(batch_size):
        optimizer.zero_grad()
        model(torch.randn(batch_size, 4)).sum().backward()
        optimizer.step()
        scheduler.step()

    find_batch_size(step, device=SimulatedDevice(lambda b: 1000 * b, capacity_bytes=10**6),
                    preserve=(model, optimizer, scheduler))  # fmt: skip
    assert (scheduler.last_epoch, scheduler.get_last_lr(), optimizer.param_groups[0]["lr"]) == before
    assert scheduler.state_dict() == before_state


def test_the_optimizers_scheduler_mark_is_restored_so_no_spurious_warning_follows():
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # wraps optimizer.step to mark _opt_called
    assert "_opt_called" not in vars(optimizer)  # its warning reads "scheduler stepped before the optimizer"

    def step(batch_size):
        model(torch.randn(batch_size, 4)).sum().backward()
        optimizer.step()  # the scheduler's wrapper sets _opt_called = True

    find_batch_size(step, device=SimulatedDevice(lambda b: 10 * b, capacity_bytes=10**6), batch=2,
                    preserve=(model, optimizer))  # fmt: skip
    assert "_opt_called" not in vars(optimizer)


def test_gradients_are_restored_into_the_original_grad_tensors():
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()  # the user holds gradients (DDP: views into its buckets)
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]

    def step(batch_size):
        optimizer.zero_grad()  # set_to_none: the probe makes new gradient tensors
        model(torch.randn(batch_size, 4)).sum().backward()
        optimizer.step()

    find_batch_size(step, device=SimulatedDevice(lambda b: 10 * b, capacity_bytes=10**6), batch=2,
                    preserve=(model, optimizer))  # fmt: skip
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(g, v) for g, v in zip(grads, values))


class _StandInCUDA:
    """The CUDA RNG calls RNGState makes, scripted: a generator is (seed, offset); init applies a queued seed."""

    def __init__(self, queued_seed: int):
        self.initialized = False
        self.queued_seed = queued_seed
        self.generators: list[list[int]] = []
        self.current = 0

    def initialize(self):  # what torch.cuda._lazy_init does: create generators, run the queued seed
        self.initialized = True
        self.generators = [[self.queued_seed, 0], [self.queued_seed, 0]]

    def draw(self):
        self.generators[self.current][1] += 4

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.generators))
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [list(g) for g in self.generators])
        monkeypatch.setattr(cuda, "initial_seed", lambda: self.generators[self.current][0])
        monkeypatch.setattr(
            cuda,
            "manual_seed",
            lambda seed: self.generators[self.current].__setitem__(slice(None), [seed, 0]),
        )

        stand_in = self

        class _Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.previous, stand_in.current = stand_in.current, self.index

            def __exit__(self, *exc):
                stand_in.current = self.previous

        monkeypatch.setattr(cuda, "device", _Device)


def test_cuda_rng_first_initialised_during_the_probe_is_left_as_a_first_initialisation_leaves_it(monkeypatch):
    cuda = _StandInCUDA(queued_seed=1234)  # e.g. torch.manual_seed(1234) queued before CUDA existed
    cuda.install(monkeypatch)
    state = RNGState.capture()
    assert state.torch_cuda is None  # nothing to copy yet
    cuda.initialize()  # the probe's first CUDA op
    cuda.draw()
    cuda.current = 1
    cuda.draw()
    cuda.current = 0
    state.restore()
    assert cuda.generators == [[1234, 0], [1234, 0]]  # as if the probe had never run


def test_the_snapshot_size_is_in_the_fit_result_and_a_disk_copy_restores_bitwise_and_is_deleted(tmp_path):
    workload = tiny_bn_workload()
    before = {name: value.clone() for name, value in workload.model.state_dict().items()}
    expected = sum(
        t.numel() * t.element_size() for t in [*workload.model.parameters(), *workload.model.buffers()]
    )
    os.environ["BATCHLAB_STATE_DIR"] = str(tmp_path)
    try:
        result = find_batch_size(workload, device="cpu", batch=8, state_copy="disk")
    finally:
        del os.environ["BATCHLAB_STATE_DIR"]
    assert result.fits and result.state_copy_storage == "disk" and result.state_copy_bytes == expected
    assert any("kept on disk" in note for note in result.notes)
    assert all(torch.equal(before[name], value) for name, value in workload.model.state_dict().items())
    assert list(tmp_path.iterdir()) == []  # the copy's folder is gone
    in_ram = find_batch_size(workload, device="cpu", batch=8, state_copy="memory")
    assert in_ram.state_copy_storage == "memory" and in_ram.state_copy_bytes == expected


def test_a_copy_that_would_not_fit_in_host_ram_is_refused_before_copying(tmp_path):
    with pytest.raises(
        BatchlabError, match=r"the state copy needs 8.00 GiB of host RAM and only 4.00 GiB is free"
    ):
        copy_storage(8 << 30, 4 << 30, requested="memory")
    assert copy_storage(8 << 30, 4 << 30, directory=tmp_path) == str(tmp_path)  # auto: to disk instead
    assert copy_storage(1 << 30, 4 << 30) is None  # small enough: RAM
    assert copy_storage(1 << 30, 4 << 30, must_leave_ram=True, directory=tmp_path) == str(tmp_path)
    with pytest.raises(BatchlabError, match=r"more than the host RAM can spare .* and the .* free in"):
        copy_storage(1 << 62, 4 << 30, directory=tmp_path)
    with pytest.raises(
        ValueError, match="invalid state_copy 'ram': expected one of 'auto', 'memory', 'disk'"
    ):
        copy_storage(1, 1, requested="ram")
    with pytest.raises(ValueError, match="invalid state_copy 'ram'"):
        find_batch_size(tiny_bn_workload(), device="cpu", batch=4, state_copy="ram")


def test_a_grad_scaler_is_restored_with_its_lazy_scale_and_no_stage_left_by_a_failed_step():
    scaler = torch.amp.GradScaler("cpu")
    assert scaler._scale is None  # never used: the scale tensor is created on first use
    model = nn.Linear(4, 4)
    optimizer = torch.optim.Adam(model.parameters())
    snapshot = StateSnapshot.capture([model], [optimizer], [scaler])
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    scaler.unscale_(optimizer)  # a probe that fails right after this leaves the stage "unscaled" behind
    snapshot.restore()
    assert scaler._scale is None and scaler.state_dict() == torch.amp.GradScaler("cpu").state_dict()
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    scaler.unscale_(optimizer)  # would raise "unscale_() has already been called" without the restore
    scaler.step(optimizer)
    scaler.update()
