"""MLflow tracking: the default store's URI, clear errors without MLflow, one experiment per sweep."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from batchlab.sweeps import sweep
from batchlab.sweeps.tracking import default_tracking_uri, read_experiment
from sweep_helpers import ScriptedRun, fresh_store


def scripted(batch_size, lr, seed):
    """A factory of fake runs: the loss falls with the batch size, so tracking tests need no training."""
    return ScriptedRun(batch_size, [1.0], [2.0, 1.0, 0.5 / batch_size])


@pytest.fixture
def no_mlflow(monkeypatch):
    """MLflow as if not installed: a None in sys.modules makes every import of it raise ImportError."""
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")] or ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_default_store_is_sqlite_under_the_directory(tmp_path):
    uri = default_tracking_uri(tmp_path / "batchlab-runs")
    assert uri == f"sqlite:///{(tmp_path / 'batchlab-runs').resolve()}/mlflow.db"


def test_missing_mlflow_is_a_clear_error(no_mlflow, tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'batchlab\[track\]'"):
        read_experiment("any", "sqlite:///x.db")
    with pytest.raises(ImportError, match="batchlab\\[track\\]"):
        sweep(
            scripted,
            [4, 8],
            lr=0.1,
            budget=3,
            directory=tmp_path,
            tracking_uri="sqlite:///x.db",
            report=False,
        )


def test_default_tracking_is_skipped_with_one_line_when_mlflow_is_missing(no_mlflow, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="batchlab"):
        result = sweep(scripted, [4, 8], lr=0.1, budget=3, directory=tmp_path, report=False)
    assert [r.mlflow_run_id for r in result.runs] == [None, None] and result.tracking_uri is None
    assert [r.message for r in caplog.records] == [
        "MLflow is not installed: this sweep is not tracked (pip install 'batchlab[track]')"
    ]


def test_one_experiment_per_sweep_and_a_clash_is_refused(tmp_path):
    uri = fresh_store(tmp_path)
    from mlflow import MlflowClient

    common = dict(lr=0.1, budget=3, target=0.1, directory=tmp_path, tracking_uri=uri, report=False)
    a = sweep(scripted, [4, 8, 16], name="alpha", **common)
    b = sweep(scripted, [4, 8, 16], name="beta", seeds=2, **common)
    client = MlflowClient(tracking_uri=uri)
    assert a.experiment_id != b.experiment_id
    counts = {
        name: len(client.search_runs([client.get_experiment_by_name(name).experiment_id]))
        for name in ("alpha", "beta")
    }
    assert counts == {"alpha": 3 + 1, "beta": 6 + 1}  # runs plus the sweep's parent run
    # a different sweep configuration under a name whose directory is gone: MLflow still refuses the clash
    other = tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="belongs to a different sweep"):
        sweep(
            scripted, [4, 8], name="alpha", lr=0.1, budget=3, directory=other, tracking_uri=uri, report=False
        )


def test_read_experiment_rebuilds_the_result(tmp_path):
    uri = fresh_store(tmp_path)
    result = sweep(
        scripted,
        [4, 8, 16],
        lr=0.1,
        budget=3,
        target=0.1,
        name="gamma",
        directory=tmp_path,
        tracking_uri=uri,
        report=False,
    )
    again = read_experiment("gamma", uri)
    assert [r.to_dict() for r in again.runs] == [r.to_dict() for r in result.runs]
    assert again.config == result.config and again.directory is None
    assert read_experiment(result.experiment_id, uri).name == "gamma"  # by id too
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'"):
        read_experiment("nope", uri)


def test_artifacts_sit_beside_the_sqlite_store(tmp_path):
    uri = fresh_store(tmp_path)
    from mlflow import MlflowClient

    result = sweep(
        scripted, [4], lr=0.1, budget=3, name="delta", directory=tmp_path, tracking_uri=uri, report=False
    )
    location = MlflowClient(tracking_uri=uri).get_experiment(result.experiment_id).artifact_location
    assert location == (Path(tmp_path) / "artifacts" / "delta").resolve().as_uri()
    assert (Path(tmp_path) / "artifacts" / "delta").is_dir()
