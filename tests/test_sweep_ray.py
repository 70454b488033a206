"""The Ray Tune backend: the same runs as trials, the same records, logged to the same MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchlab.cli import main
from batchlab.sweeps import SweepResult, SweepRun, sweep
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


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the CLI tests below (as run_trials starts it), shut down after them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


CLI = ["--lr", "1e-3", "--budget-steps", "6", "--backend", "ray", "--no-report"]


def test_cli_ray_sweep_with_the_live_display(tmp_path, capsys, local_ray):
    """The live display stays in the driver: Tune pickles its callbacks, which once held the display's lock
    ("cannot pickle '_thread.RLock' object") -- the README's command, display on, tracked to MLflow."""
    uri = fresh_store(tmp_path)
    args = ["sweep", "--workload", "teacher-student", "--batch-sizes", "16,64", *CLI, "--tracking-uri", uri]
    code = main([*args, "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "b16-lr1x-s0: finished" in out and "b64-lr1x-s0: finished" in out  # the progress, from Ray
    assert "best LR per batch size" in out and "MLflow: mlflow ui" in out
    (directory,) = (tmp_path / "sweeps").iterdir()
    result = SweepResult.load(directory)
    assert [(r.batch_size, r.steps, r.status) for r in result.runs] == [
        (16, 6, "finished"),
        (64, 6, "finished"),
    ]
    assert all(r.mlflow_run_id for r in result.runs)


def test_cli_ray_sweep_of_a_file_factory_with_flags(tmp_path, capsys, local_ray):
    """A factory defined at the top of a user's file reaches the workers (its module is shipped by value),
    and the flags reach its runs."""
    script = tmp_path / "ray_user_task.py"
    script.write_text(
        "import torch\n"
        "from batchlab.sweeps import SupervisedRun\n"
        "def factory(batch_size, lr, seed):\n"
        "    torch.manual_seed(seed)\n"
        "    model = torch.nn.Linear(8, 2)\n"
        "    x = torch.randn(64, 8); y = (x.sum(1) > 0).long()\n"
        "    return SupervisedRun(model, torch.optim.Adam(model.parameters(), lr=lr),\n"
        "                         torch.nn.functional.cross_entropy, (x, y), (x, y), batch_size=batch_size)\n"
        "def make():\n"
        "    return factory\n"
    )
    args = ["sweep", "--workload", f"{script}:make", "--batch-sizes", "16", *CLI, "--no-tracking"]
    code = main([*args, "--amp", "bf16", "--accumulation", "2", "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    (directory,) = (tmp_path / "sweeps").iterdir()
    (run,) = SweepResult.load(directory).runs
    assert (run.status, run.steps, run.precision, run.accumulation) == ("finished", 6, "bf16", 2)


def test_cli_ray_sweep_of_a_workload_function(tmp_path, capsys, local_ray):
    """The README's own-model example on Ray: its WorkloadFactory and its file's module reach the workers."""
    example = Path(__file__).resolve().parent.parent / "examples" / "sweep_own_model.py"
    args = ["sweep", "--workload", f"{example}:make_workload", "--batch-sizes", "16", *CLI, "--no-tracking"]
    code = main([*args, "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    (directory,) = (tmp_path / "sweeps").iterdir()
    (run,) = SweepResult.load(directory).runs
    assert (run.workload, run.status, run.steps) == ("my-mlp", "finished", 6)
