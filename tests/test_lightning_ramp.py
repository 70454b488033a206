"""BatchRampCallback with the real `lightning` package, offline: accumulation grows through the trainer's public
attribute, every optimizer step accumulates exactly the accumulation in force, the LR is carried, bad input fails
before the first step.

Lightning is imported when the first test here runs (see test_integration_lightning.py for why).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _data():
    """Random labels: the true gradient vanishes quickly, the noise stays, so B_simple grows (test_ramp.py)."""
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(2048, 16, generator=gen), torch.randint(0, 4, (2048,), generator=gen))


@functools.cache
def _lightning() -> SimpleNamespace:
    import lightning as L

    from batchlab.integrations.lightning_ramp import BatchRampCallback

    class Net(L.LightningModule):
        """Records how many training batches each optimizer step accumulated, and the accumulation in force."""

        def __init__(self, micro: int = 8, optimizer: str = "adam"):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(16, 4)
            self.micro, self.optimizer_name = micro, optimizer
            self.since_step = 0
            self.windows: list[
                tuple[int, int]
            ] = []  # (batches in the window, trainer.accumulate_grad_batches)

        def train_dataloader(self):
            return DataLoader(_data(), batch_size=self.micro, shuffle=True, drop_last=True)

        def training_step(self, batch, batch_idx):
            self.since_step += 1
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):
            self.windows.append((self.since_step, self.trainer.accumulate_grad_batches))
            self.since_step = 0

        def configure_optimizers(self):
            if self.optimizer_name == "adagrad":
                return torch.optim.Adagrad(self.parameters(), lr=3e-2)
            return torch.optim.Adam(self.parameters(), lr=3e-2)

    return SimpleNamespace(L=L, Net=Net, BatchRampCallback=BatchRampCallback)


def _trainer(callbacks, accumulation=2, **kwargs):
    return _lightning().L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=kwargs.pop("max_epochs", 1),
        limit_train_batches=kwargs.pop("limit_train_batches", 240),
        accumulate_grad_batches=accumulation,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_accumulation_grows_through_the_trainer_and_every_window_matches_it():
    lt = _lightning()
    ramp = lt.BatchRampCallback(max_batch=128, patience=2, min_updates=5)
    model = lt.Net(micro=8)
    trainer = _trainer([ramp])
    trainer.fit(model)
    events = ramp.ramp.events
    assert [e.batch_after for e in events] == [32, 64, 128]  # 16 = 8 x 2 doubling, to the maximum
    assert trainer.accumulate_grad_batches == events[-1].accumulation == 16
    # Every optimizer step accumulated exactly the accumulation then in force, except the last, partial window
    # of an epoch (Lightning steps on the epoch's last batch).
    full = [w for w in model.windows if w[0] == w[1]]
    assert len(model.windows) - len(full) <= 1 and {w[1] for w in full} == {2, 4, 8, 16}
    assert all(w[0] <= w[1] for w in model.windows)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-2 * math.sqrt(128 / 16))
    assert ramp.ramp.estimate().updates == len(model.windows)


def test_bad_setups_are_one_line_errors_before_the_first_step():
    lt = _lightning()
    model = lt.Net()
    with pytest.raises(ValueError, match=r"set Trainer\(accumulate_grad_batches>=2\), got 1"):
        _trainer([lt.BatchRampCallback(max_batch=64)], accumulation=1).fit(model)
    with pytest.raises(ValueError, match="remove the GradientAccumulationScheduler"):
        scheduler = lt.L.pytorch.callbacks.GradientAccumulationScheduler({0: 2})
        _trainer([lt.BatchRampCallback(max_batch=64), scheduler], accumulation=1).fit(model)
    with pytest.raises(
        ValueError, match=r"^invalid max_batch 4: below the current batch 16 \(a ramp only grows\)$"
    ):
        _trainer([lt.BatchRampCallback(max_batch=4)]).fit(model)
    with pytest.raises(ValueError, match="^no batch-change rule for optimizer 'Adagrad'"):
        _trainer([lt.BatchRampCallback(max_batch=64)]).fit(lt.Net(optimizer="adagrad"))
    with pytest.raises(ValueError, match=r"^invalid target -1: expected a number > 0"):
        lt.BatchRampCallback(max_batch=64, target=-1)
    assert model.windows == []  # no step ran in any of them


def test_a_failed_change_keeps_the_last_good_accumulation_and_lr():
    lt = _lightning()

    def refuse(event):
        raise RuntimeError("logger down")

    ramp = lt.BatchRampCallback(max_batch=128, patience=2, min_updates=5, on_change=refuse)
    trainer = _trainer([ramp])
    with pytest.raises(RuntimeError, match="logger down"):
        trainer.fit(lt.Net())
    assert trainer.accumulate_grad_batches == 2 and ramp.ramp.batch_size == 16 and ramp.ramp.events == []
    assert trainer.optimizers[0].param_groups[0]["lr"] == 3e-2


def test_measure_every_reads_one_optimizer_step_in_k_through_the_trainer():
    """measure_every=3 under a real Trainer: 240 batches at accumulation 2 are 120 optimizer steps, of which the
    1st, 4th, ... (40) are measured and 80 carry no hooks; a bad value is refused at construction, by its name."""
    lt = _lightning()
    ramp = lt.BatchRampCallback(max_batch=16, measure_every=3)  # 16 = 8 x 2: no growth, every window full
    model = lt.Net(micro=8)
    _trainer([ramp]).fit(model)
    assert len(model.windows) == 120 and all(w == (2, 2) for w in model.windows)
    assert ramp.ramp.estimate().updates == 40 and ramp.ramp.collector.skipped_steps == 80
    with pytest.raises(ValueError, match=r"^invalid measure_every 0: expected an int >= 1$"):
        lt.BatchRampCallback(max_batch=64, measure_every=0)


def test_callback_refuses_a_bad_rule_or_beta_when_made():
    """The callback runs the ramp's shared settings check on construction, so rule and beta fail before fit."""
    lt = _lightning()
    with pytest.raises(ValueError, match=r"^invalid rule 'cubic': expected one of 'linear', 'sqrt'"):
        lt.BatchRampCallback(max_batch=64, rule="cubic")
    with pytest.raises(ValueError, match=r"^invalid beta 1.0: expected a number in \[0, 1\)"):
        lt.BatchRampCallback(max_batch=64, beta=1.0)
