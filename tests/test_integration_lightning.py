"""BatchlabFinder with the real `lightning` package: sets `batch_size`, restores state, trains; DDP agrees.

Lightning is imported when the first test here runs, not when pytest collects the suite: importing it adds
~300 MiB to the process, which every CPU test measuring the process's memory would otherwise carry.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from batchlab import DoesNotFitError, find_batch_size
from batchlab.devices import SimulatedDevice

WORKER_PATH = Path(__file__).with_name("integration_ddp_worker.py")
spec = importlib.util.spec_from_file_location("integration_ddp_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

MIB = 2**20
SAMPLES = 200


def _data():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(SAMPLES, 8, generator=gen), torch.randint(0, 3, (SAMPLES,), generator=gen)
    )


@functools.cache
def _lightning() -> SimpleNamespace:
    import lightning as L

    from batchlab.integrations.lightning import BatchlabFinder

    class Net(L.LightningModule):
        """BatchNorm (buffers change in a step), Adam (state created in a step), self.log in training_step."""

        def __init__(self, batch_size: int | None = 4):
            super().__init__()
            if batch_size is not None:
                self.batch_size = batch_size
            self.net = worker.make_model()
            self.seen: list[int] = []
            self.at_train_start: dict | None = None

        def train_dataloader(self):
            return DataLoader(_data(), batch_size=self.batch_size, shuffle=True)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def on_train_start(self):
            self.at_train_start = {k: v.clone() for k, v in self.state_dict().items()}

        def on_train_batch_start(self, batch, batch_idx):
            self.seen.append(len(batch[0]))

        def configure_optimizers(self):
            return {"optimizer": torch.optim.Adam(self.parameters(), lr=1e-3)}

    class NoSizeData(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.batch_size = 4

        def train_dataloader(self):
            return DataLoader(_data(), batch_size=self.batch_size)

    return SimpleNamespace(L=L, Net=Net, NoSizeData=NoSizeData, BatchlabFinder=BatchlabFinder)


def _trainer(finder, **kwargs):
    return _lightning().L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        callbacks=[finder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _sim(capacity_mib: int) -> SimulatedDevice:
    return SimulatedDevice(lambda b: 100 * MIB + 10 * MIB * b, capacity_mib * MIB)


def test_sets_the_batch_size_restores_state_and_then_trains():
    model = _lightning().Net()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    finder = _lightning().BatchlabFinder(device=_sim(600))
    _trainer(finder).fit(model)
    expected = find_batch_size(worker.make_workload(worker.make_model()), device=_sim(600)).batch_size
    assert finder.optimal_batch_size == model.batch_size == expected == 44
    assert finder.per_rank == [44] and finder.result.fits
    assert model.seen == [44, 44, 44]  # the fit loop built its dataloader with the answer
    for key, value in initial.items():  # the search left weights and BatchNorm statistics untouched
        assert torch.equal(model.at_train_start[key], value), key
    assert model.trainer is not None  # re-attached after the probes


def test_real_cpu_search_on_a_datamodule_attribute():
    """On the real CPU device; the answer is capped at the dataset size and trains."""
    model = _lightning().Net(batch_size=None)
    data = _lightning().NoSizeData()
    finder = _lightning().BatchlabFinder(memory_budget="64GiB", max_batch_size=64)
    _trainer(finder).fit(model, datamodule=data)
    assert data.batch_size == finder.optimal_batch_size == 64
    assert [p.outcome for p in finder.result.probes][-1] == "fits"
    assert model.seen == [64, 64, 64]


def test_fails_before_training_without_a_batch_size_attribute():
    finder = _lightning().BatchlabFinder(device=_sim(600))
    with pytest.raises(AttributeError, match="no `batch_size`"):
        _trainer(finder).fit(_lightning().Net(batch_size=None))


def test_failed_search_restores_the_original_batch_size():
    model = _lightning().Net(batch_size=7)
    # 100 MiB fixed cost alone exceeds 0.9 x 100 MiB; multiple_of=2 as BatchNorm cannot train on batch 1
    finder = _lightning().BatchlabFinder(device=_sim(100), multiple_of=2)
    with pytest.raises(DoesNotFitError, match="does not fit"):
        _trainer(finder).fit(model)
    assert model.batch_size == 7


def test_two_ddp_ranks_agree_on_the_minimum(tmp_path):
    ranks = worker.run_ranks("lightning", tmp_path)
    assert [r["global_rank"] for r in ranks] == [0, 1]
    for result in ranks:
        assert result["world_size"] == 2
        assert result["per_rank"] == [80, 44]  # each rank's own search on its own (simulated) device
        assert result["optimal"] == result["model_batch_size"] == 44
        assert result["seen"] == [44, 44]  # and both ranks train at it
    assert [r["local"] for r in ranks] == [80, 44]


@functools.cache
def _validating_net():
    class ValNet(_lightning().Net):
        """Net with a validation loader that reads its own batch attribute, as the finder's eval search needs."""

        def __init__(self):
            super().__init__(batch_size=4)
            self.val_batch_size = 2
            self.val_seen: list[int] = []
            self.val_training_flags: list[bool] = []

        def val_dataloader(self):
            return DataLoader(_data(), batch_size=self.val_batch_size)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_seen.append(len(x))
            self.val_training_flags.append(self.training or torch.is_grad_enabled())
            loss = F.cross_entropy(self.net(x), y)
            self.log("val_loss", loss)
            return loss

    return ValNet


def test_the_validation_batch_is_found_apart_and_beside_the_training_state():
    from test_eval_batch import GradAwareDevice

    model = _validating_net()()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    device = GradAwareDevice(model, 300 * MIB)  # training 10 MiB per sample, validation 2 MiB
    finder = _lightning().BatchlabFinder(device=device, eval_batch_arg_name="val_batch_size")
    _trainer(finder, limit_val_batches=1, num_sanity_val_steps=0).fit(model)
    assert finder.optimal_batch_size == model.batch_size == 17  # 100 + 10 b <= 270 MiB, as without validation
    state = finder.result.memory_breakdown.gradients + finder.result.memory_breakdown.optimizer_state
    assert state > 0  # the training search counted the gradients and Adam's moments of the real step
    budget = int(0.9 * (300 * MIB - -(-state // 0.9)))
    assert finder.eval_result.budget_bytes == budget and finder.eval_result.step_mode == "eval"
    assert finder.eval_batch_size == model.val_batch_size == (budget - 100 * MIB) // (2 * MIB)
    assert model.val_seen[-1] == finder.eval_batch_size  # the fit loop validated at it
    assert set(model.val_training_flags) == {False}  # every validation_step ran in eval mode, no grad
    for key, value in initial.items():
        assert torch.equal(model.at_train_start[key], value), key


def test_the_validation_attribute_is_checked_before_training():
    with pytest.raises(ValueError, match="eval_batch_arg_name='batch_size' is batch_arg_name too"):
        _lightning().BatchlabFinder(eval_batch_arg_name="batch_size")
    finder = _lightning().BatchlabFinder(device=_sim(600), eval_batch_arg_name="val_size")
    with pytest.raises(AttributeError, match="no `val_size`.*pass eval_batch_arg_name="):
        _trainer(finder).fit(_lightning().Net())
