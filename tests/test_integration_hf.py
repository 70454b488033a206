"""Hugging Face: fit_trainer keeps the effective batch; the find_executable_batch_size drop-in searches.

Models are tiny BERTs built from a config (no weights). Exact answers come from a SimulatedDevice (memory
100 MiB + 10 MiB per sample), whose probes still run the real training steps; one test of each runs on the
real CPU device.
"""

from __future__ import annotations

import psutil
import pytest
import torch
from torch.nn import functional as F

import batchlab.integrations.hf as hf
from batchlab import find_batch_size
from batchlab.devices import SimulatedDevice
from batchlab.integrations.hf import find_executable_batch_size, fit_trainer, fit_training_args
from test_release import BranchNet

MIB = 2**20
SEQ = 16


def _sim(capacity_mib: int = 600) -> SimulatedDevice:
    return SimulatedDevice(lambda b: 100 * MIB + 10 * MIB * b, capacity_mib * MIB)  # largest at 0.9: 44


def _model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _dataset(n: int = 96):
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1, 100, (SEQ,), generator=gen),
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=gen),
        }
        for _ in range(n)
    ]


def _args(tmp_path, per_device: int, accumulation: int = 1):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def test_fit_trainer_keeps_the_effective_batch_and_trains(tmp_path):
    from transformers import Trainer

    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path, per_device=64), train_dataset=_dataset())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fit_trainer(trainer, device=_sim())
    # at most 44 fits; 64 = 32 x 2 is the exact split with the fewest accumulation steps
    assert plan.largest_fitting == 44
    assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps, plan.devices) == (32, 2, 1)
    assert plan.effective_batch == plan.target_batch == 64
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (32, 2)
    effective = (
        trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size
    )
    assert effective == 64
    for key, value in before.items():  # the search restored the model
        assert torch.equal(model.state_dict()[key], value), key
    # the adapter told the built Trainer (which keeps a private copy of the batch size)
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[0] == 32
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.state.train_batch_size == 32


def test_fit_trainer_adapter_refuses_an_untested_transformers(monkeypatch, tmp_path):
    import transformers
    from transformers import Trainer

    trainer = Trainer(model=_model(), args=_args(tmp_path, per_device=8), train_dataset=_dataset())
    hf._set_trainer_batch_size(trainer, 4)
    assert next(iter(trainer.get_train_dataloader()))["input_ids"].shape[0] == 4
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    with pytest.raises(RuntimeError, match="fit_training_args"):
        hf._set_trainer_batch_size(trainer, 4)


def test_fit_training_args_on_the_real_cpu(tmp_path):
    model = _model()
    args = _args(tmp_path, per_device=8, accumulation=2)
    plan = fit_training_args(
        model, args, _dataset(), memory_budget=f"{psutil.Process().memory_info().rss // MIB + 2048}MiB"
    )
    assert plan.target_batch == 16  # what the arguments asked for: 8 x 2
    assert plan.result.fits and plan.result.peak_bytes <= plan.result.budget_bytes
    assert plan.largest_fitting == 16  # never more than the per-device share of the target
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 1)


def _probe_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer


def _one_step(batch_size, model, optimizer):
    x, y = torch.randn(batch_size, 8), torch.randint(0, 3, (batch_size,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_decorator_with_a_probe_calls_the_function_once_at_the_searched_size():
    model, optimizer = _probe_problem()
    initial = [p.detach().clone() for p in model.parameters()]
    calls = []

    @find_executable_batch_size(starting_batch_size=128, probe=_one_step, device=_sim())
    def train(batch_size, model, optimizer):
        calls.append(batch_size)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))  # probes left no trace
        assert not optimizer.state
        return "done"

    assert train(model, optimizer) == "done"
    expected = find_batch_size(
        lambda b: _one_step(b, model, optimizer), device=_sim(), preserve=(model, optimizer)
    )
    assert calls == [expected.batch_size] == [44]
    assert train.batchlab_result.batch_size == 44 and train.batch_sizes_tried == [44]


def test_decorator_with_a_probe_on_the_real_cpu_stays_under_the_budget():
    model, optimizer = _probe_problem()
    budget = psutil.Process().memory_info().rss + 1024 * MIB

    @find_executable_batch_size(starting_batch_size=512, probe=_one_step, device="cpu", memory_budget=budget)
    def train(batch_size, model, optimizer):
        return batch_size

    size = train(model, optimizer)
    assert 1 <= size <= 512
    assert (
        train.batchlab_result.fits and train.batchlab_result.peak_bytes <= train.batchlab_result.budget_bytes
    )


def test_decorator_without_a_probe_restores_state_and_halves_after_an_oom(caplog):
    model, optimizer = _probe_problem()
    initial = [p.detach().clone() for p in model.parameters()]

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size, model, optimizer):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))  # every try starts afresh
        _one_step(4, model, optimizer)  # training moved the weights before it ran out of memory
        if batch_size > 40:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected) at {batch_size}")
        return batch_size

    assert train(model, optimizer) == 32
    assert train.batch_sizes_tried == [128, 64, 32]
    assert "retrying at 64 from the same state" in caplog.text


def test_decorator_misuse_names_the_corrected_call():
    model, optimizer = _probe_problem()

    @find_executable_batch_size(starting_batch_size=8)
    def train(batch_size, model, optimizer):
        return batch_size

    with pytest.raises(TypeError, match=r"call it without one: `train\(model=\.\.\., optimizer=\.\.\.\)`"):
        train(8, model, optimizer)
    with pytest.raises(ValueError, match="starting_batch_size"):
        find_executable_batch_size(lambda b: b, starting_batch_size=0)


def test_decorator_frees_a_failed_backwards_graph_before_the_retry():
    """pytorch#82218: an OOM inside backward leaves the failed graph's saved tensors alive; the retry must start
    without them."""
    model = BranchNet(fails=lambda batch_size: batch_size > 40)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    alive_at_call = []

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size, model, optimizer):
        alive_at_call.append(model.alive())
        x, y = torch.randn(batch_size, 8), torch.randint(0, 3, (batch_size,))
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        return batch_size

    assert train(model, optimizer) == 32
    assert train.batch_sizes_tried == [128, 64, 32]
    assert alive_at_call == [0, 0, 0]


def test_fit_trainer_sets_the_eval_batch_apart_and_never_shrinks_training(tmp_path):
    """transformers#32215: with auto_find_batch_size an evaluation OOM shrinks the training batch. Here the
    evaluation batch is searched on its own (forward only: 2 MiB per sample against training's 10), beside the
    training state the training search measured, and the training plan is the one found without it."""
    from transformers import Trainer

    from test_eval_batch import GradAwareDevice

    model = _model()
    args = _args(tmp_path, per_device=64)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(400))
    plan = fit_trainer(trainer, device=GradAwareDevice(model, 600 * MIB), evaluation=True)
    assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps, plan.largest_fitting) == (
        32,
        2,
        44,
    )
    state = plan.result.memory_breakdown.gradients + plan.result.memory_breakdown.optimizer_state
    assert state > 0  # the training step's gradients and Adam moments, measured
    budget = 0.9 * (600 * MIB - -(-state // 0.9))
    assert plan.eval_result.budget_bytes == int(budget)
    assert plan.per_device_eval_batch_size == int((budget - 100 * MIB) // (2 * MIB)) == 219
    assert plan.eval_result.step_mode == "eval" and plan.eval_result.fits
    assert trainer.args.per_device_eval_batch_size == 219
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (32, 2)
    assert next(iter(trainer.get_eval_dataloader()))["input_ids"].shape[0] == 219
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    trainer.train()
    assert trainer.state.train_batch_size == 32


def test_fit_training_args_with_an_eval_set_on_the_real_cpu(tmp_path):
    model = _model()
    args = _args(tmp_path, per_device=8)
    budget = f"{psutil.Process().memory_info().rss // MIB + 1024}MiB"
    plan = fit_training_args(model, args, _dataset(), memory_budget=budget, eval_dataset=_dataset(64))
    evaluation = plan.eval_result
    assert evaluation.fits and evaluation.peak_bytes <= evaluation.budget_bytes
    assert evaluation.budget_bytes < plan.result.budget_bytes  # room left for the training state
    assert args.per_device_eval_batch_size == plan.per_device_eval_batch_size == 64  # the whole eval set
    assert args.per_device_train_batch_size == 8
    assert any("room for the training state" in note for note in evaluation.notes)


@pytest.mark.parametrize(
    ("compute_metrics", "accumulation", "noted"),
    [(True, None, True), (False, None, False), (True, 1, False)],
    ids=["metrics, predictions kept", "no metrics", "metrics, eval_accumulation_steps=1"],
)
def test_fit_trainer_says_when_the_evaluation_keeps_every_prediction_on_the_device(
    tmp_path, caplog, compute_metrics, accumulation, noted
):
    """The Trainer's evaluation loop gathers every batch's logits on the device until eval_accumulation_steps
    batches have run; with metrics computed from them and it unset, the eval batch found covers one batch's
    forward, not the whole set's predictions -- the plan says so, and a warning is logged."""
    from transformers import Trainer

    from test_eval_batch import GradAwareDevice

    model = _model()
    args = _args(tmp_path, per_device=8)
    args.eval_accumulation_steps = accumulation
    metrics = (lambda prediction: {"n": float(len(prediction.predictions))}) if compute_metrics else None
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(64),
                      compute_metrics=metrics)  # fmt: skip
    with caplog.at_level("WARNING", logger="batchlab"):
        plan = fit_trainer(trainer, device=GradAwareDevice(model, 600 * MIB), evaluation=True)
    assert (plan.notes == [hf.KEPT_PREDICTIONS]) is noted
    assert ("eval_accumulation_steps" in caplog.text) is noted
    assert ("note: the Trainer keeps every evaluation batch's predictions" in plan.summary()) is noted
    assert trainer.args.eval_accumulation_steps == accumulation  # the user's setting is left as it is
    if compute_metrics:
        assert trainer.evaluate()["eval_n"] == 64.0
