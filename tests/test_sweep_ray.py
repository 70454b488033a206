"""The Ray Tune backend: the same runs as trials, the same records, logged to the same MLflow store."""

from __future__ import annotations

import pytest

from batchlab.sweep import SweepRun, sweep
from batchlab.workloads.tasks import load_task
from sweep_helpers import fresh_store

pytest.importorskip("ray.tune")


def test_ray_backend_runs_trials_with_the_local_result_fields(tmp_path):
    uri = fresh_store(tmp_path)
    from mlflow import MlflowClient

    common = dict(lr=1e-3, budget=20, target=2.25, directory=tmp_path, tracking_uri=uri, report=False)
    events = []
    ray_result = sweep(
        load_task("teacher-student"), [16, 64], backend="ray", name="on-ray", on_event=events.append, **common
    )
    local = sweep(load_task("teacher-student"), [16], name="local", **{**common, "tracking_uri": False})

    assert [r.key for r in ray_result.runs] == ["b16-lr1x-s0", "b64-lr1x-s0"]
    assert {e.kind for e in events} >= {"start", "step", "done"}
    reference = local.runs[0].to_dict()
    for run in ray_result.runs:
        assert isinstance(run, SweepRun) and run.status == "finished" and run.steps == 20
        fields = run.to_dict()
        assert fields.keys() == reference.keys()
        for name, value in fields.items():
            if value is not None and reference[name] is not None:  # mlflow_run_id: None locally (untracked)
                assert type(value) is type(reference[name]), name
        assert run.throughput > 0 and run.peak_bytes > 0 and run.mlflow_run_id  # logged by the driver
    # the same run trained by Ray and locally: identical losses (seeded data order and weights, on the CPU)
    assert ray_result.runs[0].train["loss"] == pytest.approx(local.runs[0].train["loss"], rel=1e-5)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("on-ray")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`batchlab.kind` = 'run'")
    assert sorted(int(r.data.params["batch_size"]) for r in runs) == [16, 64]
    assert all(r.info.status == "FINISHED" for r in runs)
