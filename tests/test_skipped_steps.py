"""fp16: the optimizer state is created and counted whatever the GradScaler decides (issue 10 item 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchlab import Workload, find_batch_size
from batchlab.devices import SimulatedDevice


def _overflowing_mlp(amp):
    """The issue's workload: targets x1000 make the scaled fp16 gradients overflow at the starting scale."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 512)
    )
    return Workload(
        model,
        lambda b: (torch.randn(b, 512) * 10, torch.randn(b, 512) * 1000),
        nn.functional.mse_loss,
        torch.optim.Adam(model.parameters()),
        amp=amp,
    )


def test_fp16_counts_the_same_optimizer_state_as_fp32_and_says_the_scaler_skipped():
    fp32 = find_batch_size(_overflowing_mlp(None), device="cpu", batch=64, memory_budget="4GiB")
    workload = _overflowing_mlp("fp16")
    scaler_before = workload.scaler.state_dict()
    fp16 = find_batch_size(workload, device="cpu", batch=64, memory_budget="4GiB")
    adam_moments = 2 * sum(p.numel() * 4 for p in workload.model.parameters())  # fp32 master weights
    assert fp32.memory_breakdown.optimizer_state >= adam_moments
    assert fp16.memory_breakdown.optimizer_state == fp32.memory_breakdown.optimizer_state
    assert fp16.skipped_optimizer_steps >= 1 and fp32.skipped_optimizer_steps == 0
    assert any("skipped optimizer.step()" in note and "65536" in note for note in fp16.notes)
    # The user's GradScaler: scale and growth tracker as before, its scale tensor still not created.
    assert workload.scaler.state_dict() == scaler_before and workload.scaler._scale is None
    assert len(workload.optimizer.state) == 0
    assert "step" not in vars(workload.scaler)  # the patch is gone


def _framework_style_step(model, optimizer, scaler, state_sizes):
    """Like the Lightning and Ultralytics steps: scaler.step, update, zero_grad -- all inside the callable."""

    def step(batch_size):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(torch.randn(batch_size, 8)) * 1e6).square().mean()  # overflows in fp16
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        state_sizes.append(len(optimizer.state))

    return step


def test_a_step_callable_with_its_scaler_in_preserve_creates_the_state_in_every_probe():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    sizes = []
    step = _framework_style_step(model, optimizer, scaler, sizes)
    device = SimulatedDevice(lambda b: 1000 * b, capacity_bytes=10**6)
    result = find_batch_size(step, device=device, batch=4, preserve=(model, optimizer, scaler))
    assert sizes and all(size == 2 for size in sizes)  # weight and bias have Adam state in every probe step
    assert result.skipped_optimizer_steps == len(sizes)
    assert len(optimizer.state) == 0 and scaler._scale is None


def test_a_scaler_batchlab_cannot_see_is_reported_not_ignored():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    sizes = []
    step = _framework_style_step(model, optimizer, torch.amp.GradScaler("cpu"), sizes)
    device = SimulatedDevice(lambda b: 1000 * b, capacity_bytes=10**6)
    result = find_batch_size(step, device=device, batch=4, preserve=(model, optimizer))
    assert sizes and all(size == 0 for size in sizes)  # the skip happened, unseen
    assert any(
        "never stepped during a probe" in note and "pass the scaler in preserve=" in note
        for note in result.notes
    )


@pytest.mark.parametrize("amp", ["bf16", None])
def test_no_scaler_no_patch_and_no_note(amp):
    workload = _small(amp)
    result = find_batch_size(
        workload, device=SimulatedDevice(lambda b: 1000 * b, capacity_bytes=10**6), batch=2
    )
    assert result.skipped_optimizer_steps == 0 and not any("GradScaler" in note for note in result.notes)


def _small(amp):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return Workload(model, lambda b: (torch.randn(b, 4), torch.randn(b, 2)), nn.functional.mse_loss,
                    torch.optim.Adam(model.parameters()), amp=amp)  # fmt: skip
