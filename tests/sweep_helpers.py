"""Helpers shared by the sweep, tracking and report tests: offline environment, a fast MLflow store, a tiny task."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Nothing in these tests may reach the network: MLflow's telemetry and Ray's usage report are switched off for
# this process and every subprocess it starts.
OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's plain output: no live tables in the test log
}
os.environ.update(OFFLINE_ENV)

_TEMPLATE: Path | None = None


def fresh_store(directory: Path) -> str:
    """A migrated, empty MLflow SQLite store at ``directory/mlflow.db``; returns its URI.

    Creating a store runs ~40 schema migrations (about 10-15 s here); they run once per test process into a
    template that each test copies (a byte copy of an idle SQLite file is a valid database).
    """
    global _TEMPLATE
    pytest.importorskip("mlflow")  # the [track] extra; `make test` installs it
    if _TEMPLATE is None:
        from mlflow import MlflowClient

        folder = tempfile.mkdtemp(prefix="batchlab-mlflow-template-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = Path(folder) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _TEMPLATE = template
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE, directory / "mlflow.db")
    return f"sqlite:///{(directory / 'mlflow.db').resolve()}"


class ScriptedRun:
    """A fake trainable with scripted losses: tests the sweep loop's bookkeeping exactly, without training.

    ``train_losses[i]`` is returned by step i+1; ``val_losses[k]`` by the k-th evaluate() (the last one repeats).
    ``fail_at`` raises ``error`` at that step.
    """

    def __init__(self, batch_size, train_losses, val_losses, fail_at=None, error=None):
        self.batch_size = batch_size
        self.train_losses = list(train_losses)
        self.val_losses = list(val_losses)
        self.fail_at = fail_at
        self.error = error
        self.steps = 0
        self.evals = 0

    def train_step(self):
        self.steps += 1
        if self.steps == self.fail_at:
            raise self.error
        return self.train_losses[min(self.steps - 1, len(self.train_losses) - 1)]

    def evaluate(self):
        value = self.val_losses[min(self.evals, len(self.val_losses) - 1)]
        self.evals += 1
        return {"loss": value}


def sweep_config(**overrides):
    """A one-batch (4), one-seed SweepConfig for the scripted runs, target val loss 0.5 every 2 steps."""
    from batchlab.sweeps import Budget, SweepConfig, Target

    values = dict(
        name="t",
        workload="scripted",
        workload_options={},
        batch_sizes_spec=[4],
        batch_sizes=[4],
        lr=0.1,
        base_batch=4,
        rule="sqrt",
        lr_multipliers=[1.0],
        seeds=[0],
        budget=Budget(steps=6),
        target=Target(0.5),
        eval_every=2,
        stop_at_target=False,
    )
    values.update(overrides)
    return SweepConfig(**values)


def sweep_run(**fields):
    """A real :class:`~batchlab.sweeps.SweepRun` (one scripted two-step run through the sweep loop) with
    ``fields`` replaced: for tests of the comparison across runs, which reads only the recorded fields."""
    from dataclasses import replace

    from batchlab.sweeps import Budget, RunSpec, execute_run

    scripted = ScriptedRun(4, [1.0], [2.0])
    run = execute_run(
        lambda b, lr, seed: scripted, RunSpec("k", 4, 0.1, 1.0, 0), sweep_config(budget=Budget(steps=2))
    )
    return replace(run, **fields)
