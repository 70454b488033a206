"""Activation checkpointing from outside: what it wraps, that it computes the same, and that it leaves no trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchlab.workload.checkpointing import activation_checkpointing, find_repeated_blocks, plan_checkpointing
from batchlab.workloads.examples import TinyGPT, resnet, small_cnn


def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=64, context=16, width=32, depth=3, heads=2)


def test_repeated_blocks_of_a_transformer_and_a_resnet():
    model = tiny_gpt()
    assert find_repeated_blocks(model) == list(model.blocks)
    plan = plan_checkpointing(resnet().model)
    assert plan.how == "repeated blocks" and len(plan.blocks) == 4
    assert plan.describe() == "repeated blocks: 4 x _BasicBlock"


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        return x + self.body(x)


def test_stages_are_looked_into_and_groups_are_blocks_when_nothing_repeats_inside():
    # A ResNet-like stack: Sequential stages of residual blocks -> the blocks, not the stages.
    stages = nn.Sequential(nn.Sequential(_Residual(), _Residual()), nn.Sequential(_Residual(), _Residual()))
    assert find_repeated_blocks(stages) == [stages[0][0], stages[0][1], stages[1][0], stages[1][1]]
    # Sequential groups of plain layers: the groups.
    groups = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    )
    assert find_repeated_blocks(groups) == [groups[0], groups[1]]


def test_a_plain_sequential_is_cut_into_sqrt_n_segments():
    plan = plan_checkpointing(small_cnn().model)
    assert plan.sequential is not None and plan.segments == 3  # round(sqrt(11))
    assert plan.describe() == "sequential segments: 11 layers in 3 segments"


def test_nothing_to_checkpoint_asks_for_modules():
    with pytest.raises(ValueError, match="checkpoint_modules="):
        plan_checkpointing(nn.Linear(4, 4))


def test_given_modules_are_wrapped_once_each():
    model = tiny_gpt()
    plan = plan_checkpointing(model, [model.blocks[0], model.blocks[0], model.ln])
    assert plan.blocks == (model.blocks[0], model.ln) and plan.how == "given modules"


def _loss_and_grads(model: nn.Module, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_checkpointed_model_computes_the_same_and_is_untouched_afterwards():
    model = tiny_gpt()
    tokens = torch.randint(0, 64, (4, 17))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads = _loss_and_grads(model, tokens)
    with activation_checkpointing(model) as plan:
        assert all("forward" in block.__dict__ for block in plan.blocks)
        loss_ckpt, grads_ckpt = _loss_and_grads(model, tokens)
        with torch.no_grad():  # no grad: the wrapped blocks run plainly
            model(tokens[:, :-1])
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_patches_come_off_when_the_block_raises_and_own_forwards_are_kept():
    model = tiny_gpt()
    own_forward = model.blocks[1].forward
    model.blocks[1].forward = own_forward  # an instance attribute of the user's own
    with pytest.raises(RuntimeError, match="boom"):
        with activation_checkpointing(model):
            assert model.blocks[1].forward is not own_forward
            raise RuntimeError("boom")
    assert "forward" not in model.blocks[0].__dict__
    assert model.blocks[1].__dict__["forward"] is own_forward


def test_sequential_segments_come_off_too():
    model = small_cnn().model
    images = torch.randn(2, 3, 16, 16)
    expected = model(images)
    with activation_checkpointing(model):
        assert "forward" in model.__dict__
        assert torch.allclose(model(images), expected)
    assert "forward" not in model.__dict__
