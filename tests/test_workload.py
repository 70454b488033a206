"""Workload: every batch form, optimizer form, AMP and accumulation run a real step; bad input is named."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from batchlab import StepFunction, Workload, WorkloadError, find_batch_size
from batchlab.workload.workload import as_workload
from conftest import tiny_bn_workload


class DictModel(nn.Module):
    """Hugging Face style: keyword inputs, an output with .loss."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, input_ids, labels):
        logits = self.linear(input_ids)
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def test_tuple_batch_with_optimizer_factory_creates_optimizer_state():
    workload = tiny_bn_workload()
    assert workload.tensor_bytes().optimizer_state == 0
    loss = workload.step(8)
    assert loss.ndim == 0 and torch.isfinite(loss)
    sizes = workload.tensor_bytes()
    assert sizes.optimizer_state >= 2 * sizes.parameters  # Adam's two moments
    assert sizes.gradients == sizes.parameters


def test_dict_batch_uses_output_loss():
    model = DictModel()
    workload = Workload(model, lambda b: {"input_ids": torch.randn(b, 4), "labels": torch.randint(0, 2, (b,))}, None,
                        torch.optim.SGD(model.parameters(), lr=0.1))  # fmt: skip
    before = model.linear.weight.clone()
    workload.step(4)
    assert not torch.equal(before, model.linear.weight)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_runs_on_cpu(amp):
    workload = Workload(nn.Linear(8, 2), lambda b: (torch.randn(b, 8), torch.randint(0, 2, (b,))),
                        nn.functional.cross_entropy, lambda p: torch.optim.AdamW(p), amp=amp)  # fmt: skip
    assert (workload.scaler is not None) == (amp == "fp16")
    assert torch.isfinite(workload.step(4))


def test_fp16_search_restores_the_grad_scaler():
    workload = Workload(nn.Linear(8, 2), lambda b: (torch.randn(b, 8), torch.randint(0, 2, (b,))),
                        nn.functional.cross_entropy, lambda p: torch.optim.AdamW(p), amp="fp16")  # fmt: skip
    scale_before = workload.scaler.state_dict()
    find_batch_size(workload, device="cpu", batch=4)
    assert workload.scaler.state_dict() == scale_before


def test_gradient_accumulation_runs_micro_batches_then_one_step():
    calls = []
    model = nn.Linear(4, 1)

    def make_batch(b):
        calls.append(b)
        return torch.randn(b, 4), torch.randn(b, 1)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    Workload(model, make_batch, nn.functional.mse_loss, optimizer, grad_accum=3).step(5)
    assert calls == [5, 5, 5] and steps == [1]


def test_amp_argument_of_the_search_wraps_the_workload():
    workload = tiny_bn_workload()
    result = find_batch_size(workload, device="cpu", batch=4, amp="bf16")
    assert result.fits
    with pytest.raises(ValueError, match="amp='fp16' conflicts with the workload's amp='bf16'"):
        bf16 = Workload(nn.Linear(2, 2), lambda b: (torch.randn(b, 2), torch.randn(b, 2)), nn.functional.mse_loss,
                        lambda p: torch.optim.SGD(p, lr=0.1), amp="bf16")  # fmt: skip
        find_batch_size(bf16, device="cpu", batch=4, amp="fp16")


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"model": "not a model"}, TypeError, "model must be a torch.nn.Module, got str"),
        ({"make_batch": 3}, TypeError, "make_batch must be callable"),
        ({"loss_fn": "mse"}, TypeError, "loss_fn must be callable or None"),
        ({"optimizer": None}, TypeError, "optimizer must be a torch.optim.Optimizer or a factory"),
        ({"optimizer": lambda p: "adam"}, TypeError, "optimizer factory returned str"),
        ({"grad_accum": 0}, ValueError, "invalid grad_accum 0"),
        ({"grad_accum": True}, ValueError, "invalid grad_accum True"),
        ({"dataset_size": -3}, ValueError, "invalid dataset_size -3"),
        ({"amp": "int8"}, ValueError, "invalid amp 'int8'"),
    ],
)
def test_bad_construction_is_named(kwargs, error, pattern):
    args = {"model": nn.Linear(2, 2), "make_batch": lambda b: (torch.randn(b, 2), torch.randn(b, 2)),
            "loss_fn": nn.functional.mse_loss, "optimizer": lambda p: torch.optim.SGD(p, lr=0.1)}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        Workload(
            args.pop("model"), args.pop("make_batch"), args.pop("loss_fn"), args.pop("optimizer"), **args
        )


def test_bad_batches_are_named():
    model = nn.Linear(2, 2)
    workload = Workload(
        model,
        lambda b: torch.randn(b, 2),
        nn.functional.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
    )
    with pytest.raises(
        WorkloadError, match="make_batch returned Tensor; expected \\(inputs, targets\\) or a dict"
    ):
        workload.step(2)
    workload.make_batch = lambda b: {"x": torch.randn(b, 2)}
    with pytest.raises(TypeError):  # the user's own model error, unchanged
        workload.step(2)


def test_step_callable_escape_hatch_restores_what_it_is_told_to():
    model = nn.Linear(4, 4)
    optimizer = torch.optim.Adam(model.parameters())
    before = model.weight.clone()

    def train_step(batch_size):
        optimizer.zero_grad()
        model(torch.randn(batch_size, 4)).square().mean().backward()
        optimizer.step()

    result = find_batch_size(train_step, device="cpu", batch=16, preserve=(model, optimizer))
    assert result.fits and result.memory_breakdown is None  # a callable's tensors are out of sight
    assert result.peak_bytes - result.probes[-1].baseline_bytes >= 0  # its step's memory, as a whole
    assert torch.equal(model.weight, before) and len(optimizer.state) == 0
    assert isinstance(as_workload(train_step), StepFunction)
    with pytest.raises(
        TypeError, match="preserve accepts nn.Module, Optimizer, GradScaler and LR scheduler objects, got str"
    ):
        find_batch_size(train_step, device="cpu", batch=16, preserve=(model, "x"))


def test_device_mismatch_is_an_error_not_a_move():
    with pytest.raises(ValueError, match="does not match the workload's model, which is on cpu"):
        find_batch_size(tiny_bn_workload(), device="cuda:0")
