"""The evaluation batch: find_batch_size(mode="eval") runs forward and loss under no_grad in eval mode, leaves
every bit of state as it was (training flags included), creates no optimizer state, and finds a larger batch
than training; a plain step callable is refused in one line."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from batchlab import find_batch_size
from batchlab.devices import SimulatedDevice
from batchlab.devices.base import Measurement
from batchlab.workload import EvalStep
from conftest import tiny_bn_workload
from test_cpu import assert_bitwise_equal, state_of

MiB = 2**20


class GradAwareDevice(SimulatedDevice):
    """A simulated device whose step memory depends on what the step ran: a forward with gradients enabled (a
    training step) needs 10 MiB per sample, one under no_grad (an evaluation) 2 MiB -- no activations kept."""

    def __init__(self, model: nn.Module, capacity_bytes: int):
        super().__init__(lambda b: 0, capacity_bytes)
        self.grad_enabled: list[bool] = []
        for module in model.modules():  # a LightningModule's training_step may call a submodule, not forward
            module.register_forward_pre_hook(
                lambda m, args: self.grad_enabled.append(torch.is_grad_enabled())
            )

    def run(self, step, batch_size, steps=2):
        self.runs.append(batch_size)
        self.grad_enabled.clear()
        for _ in range(steps):
            step(batch_size)
        peak = 100 * MiB + (10 if any(self.grad_enabled) else 2) * MiB * batch_size
        if peak > self.capacity_bytes():
            return Measurement(batch_size, False, None, 0, 1e-3, steps, None, "simulated out of memory")
        return Measurement(batch_size, True, peak, 0, 1e-3, steps, None)


def test_eval_mode_finds_a_larger_batch_and_runs_no_backward():
    workload = tiny_bn_workload()
    device = GradAwareDevice(workload.model, 600 * MiB)  # 0.9 x 600 MiB: train 44, eval 220
    train = find_batch_size(workload, device=device)
    evaluation = find_batch_size(workload, device=device, mode="eval")
    assert (train.batch_size, evaluation.batch_size) == (44, 220)
    assert (train.step_mode, evaluation.step_mode) == ("train", "eval")
    assert evaluation.summary().startswith("largest evaluation batch that fits: 220")


def test_eval_search_on_the_cpu_is_bitwise_clean_and_creates_no_optimizer_state():
    workload = tiny_bn_workload()
    workload.step(8)  # mid-training: gradients and Adam's moments exist
    workload.model[1].eval()  # a module the user left in eval mode stays so; the rest stays in training
    before = state_of(workload)
    result = find_batch_size(
        workload, device="cpu", mode="eval", memory_budget=psutil.Process().memory_info().rss + 512 * MiB
    )
    assert result.fits and result.peak_bytes <= result.budget_bytes
    assert_bitwise_equal(before, state_of(workload))
    assert [p.optimizer_steps for p in result.probes] == [None] * len(result.probes)
    assert result.memory_breakdown.optimizer_state == before_bytes(before)


def before_bytes(state):
    return sum(
        v.numel() * v.element_size()
        for s in state["opt_state"].values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def test_the_eval_step_runs_in_eval_mode_without_gradients_and_restores_flags_on_failure():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    seen = []

    def forward(b):
        seen.append((model.training, model[1].training, torch.is_grad_enabled()))
        if b > 2:
            raise RuntimeError("a shape bug at 3")
        return model(torch.randn(b, 4))

    step = EvalStep(forward, [model])
    step.step(2)
    assert seen == [(False, False, False)]
    with pytest.raises(RuntimeError, match="a shape bug at 3"):
        step.step(3)
    assert model.training and model[1].training and torch.is_grad_enabled()


def test_eval_mode_refuses_a_plain_step_callable_and_bad_modes():
    with pytest.raises(ValueError, match="mode='eval' needs a Workload: a plain step"):
        find_batch_size(lambda b: None, device=SimulatedDevice(lambda b: b, 100), mode="eval")
    with pytest.raises(ValueError, match="invalid mode 'test': expected one of 'train', 'eval'"):
        find_batch_size(tiny_bn_workload(), device="cpu", mode="test")
    with pytest.raises(TypeError, match="EvalStep needs the nn.Module"):
        EvalStep(lambda b: None, [])


@pytest.mark.parametrize("trained", ["one shape", "a table"])
def test_an_evaluation_table_beside_the_training_state_on_the_cpu(trained):
    """SearchOptions.run(beside=..., shapes=...): the evaluation budget is computed once from the training
    result (one search, or a training table), every shape is searched under it in eval mode, and the table's
    notes say what room it left."""
    from batchlab.fit import SearchOptions
    from batchlab.fit.options import eval_memory_budget, training_result
    from batchlab.fit.shapes import ShapeTable
    from test_shapes import tiny_attention_workload

    workload = tiny_attention_workload()
    budget = int((psutil.Process().memory_info().rss + 48 * MiB) / 0.9)  # 48 MiB of room at 0.9
    options = SearchOptions(device="cpu", memory_budget=budget)
    train = options.run(workload, shapes=[64] if trained == "one shape" else [64, 128])
    if trained == "one shape":
        train = train.entries[0].result
    before = state_of(workload)
    evaluation = options.with_changes(mode="eval").run(workload, beside=train, shapes=[64, 128])
    assert_bitwise_equal(before, state_of(workload))
    assert isinstance(evaluation, ShapeTable)
    held = training_result(train).memory_breakdown
    assert held.gradients > 0 and held.optimizer_state > 0  # the training state, measured
    capacity = eval_memory_budget(training_result(train), workload.tensor_bytes())
    assert capacity < budget  # room left for it
    assert evaluation.budget_bytes == int(0.9 * capacity)
    for entry in evaluation.entries:  # every shape under the one budget, as an evaluation, verified
        assert entry.result.step_mode == "eval" and entry.result.budget_bytes == evaluation.budget_bytes
        assert entry.fits and entry.result.peak_bytes <= evaluation.budget_bytes
    train_64 = train.batch_size if trained == "one shape" else train.max_batch_by_shape()[64]
    # no gradients, no optimizer step (at 128 not so: the eval-mode fast path of nn.MultiheadAttention keeps
    # the 2 x 128^2 scores that training's scaled_dot_product_attention does not, about as much per sample)
    assert evaluation.max_batch_by_shape()[64] > train_64
    assert any("room for the training state" in note for note in evaluation.notes)


def test_beside_names_what_it_cannot_use():
    from batchlab.fit import SearchOptions

    with pytest.raises(TypeError, match="beside must be a FitResult or a ShapeTable, got int"):
        SearchOptions(device="cpu", mode="eval").run(tiny_bn_workload(), beside=3)
