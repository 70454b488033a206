"""A batch ramp inside a sweep: the runner counts its changing batch, MLflow (a real SQLite store) holds its batch
and LR as stepped metrics, and the run's record keeps them per step."""

from __future__ import annotations

import math

import pytest

from batchlab.sweeps import RampedRun, RampFactory, sweep
from batchlab.workloads.tasks import Task
from sweep_helpers import fresh_store

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _factory():
    return RampFactory(Task("teacher-student"), max_batch=64, max_micro_batch=16, patience=1, min_updates=3)


def test_ramp_run_in_a_sweep_records_batch_and_lr_per_step_and_in_mlflow(tmp_path):
    uri = fresh_store(tmp_path / "store")
    result = sweep(_factory(), [8], lr=3e-3, budget=60, directory=tmp_path, tracking_uri=uri, report=False)
    run = result.runs[0]
    batches, lrs = run.train["batch_size"], run.train["lr"]
    assert run.batch_size == 8 and batches[0] == 8 and batches == sorted(batches) and batches[-1] >= 32
    assert run.samples == sum(batches)  # the runner counted each step at its own batch
    assert all(lr == pytest.approx(3e-3 * math.sqrt(b / 8)) for b, lr in zip(batches, lrs))
    assert result.config.workload == "teacher-student-ramp"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.mlflow_run_id, "batch_size"))
    changes = [
        (s, b) for s, b in zip(run.train.step, batches) if s == 1 or b != batches[run.train.step.index(s) - 1]
    ]
    assert history == [
        *changes,
        (run.steps, batches[-1]),
    ]  # each change, where it happened, and the last step
    lr_history = sorted((m.step, m.value) for m in client.get_metric_history(run.mlflow_run_id, "lr"))
    assert [s for s, _ in lr_history] == [s for s, _ in history]
    assert lr_history[-1][1] == pytest.approx(3e-3 * math.sqrt(batches[-1] / 8))


def test_ramp_ends_name_each_start_once_with_every_batch_its_runs_ended_at():
    from batchlab.sweeps import SweepResult
    from batchlab.sweeps.records import Curve
    from sweep_helpers import sweep_config, sweep_run

    def ramp(start, batches, seed):
        curve = Curve()
        for step, batch in enumerate(batches, 1):
            curve.add(step, step * batch, 0.0, loss=1.0, batch_size=batch, lr=1e-3)
        return sweep_run(batch_size=start, seed=seed, train=curve)

    runs = [
        ramp(32, [32, 64, 128], 0),
        ramp(16, [16, 32, 64], 0),
        ramp(16, [16, 64, 64], 1),
        ramp(32, [32, 256], 1),
    ]
    assert SweepResult(config=sweep_config(), runs=runs).ramp_ends() == "from 16 to 64; from 32 to 128, 256"
    fixed = SweepResult(config=sweep_config(), runs=[sweep_run(batch_size=16)])
    assert fixed.ramp_ends() == ""


def test_fixed_runs_record_no_ramp_columns(tmp_path):
    result = sweep(Task("teacher-student", noise_every=0), [8], lr=3e-3, budget=3, directory=tmp_path,
                   tracking_uri=False, report=False)  # fmt: skip
    assert set(result.runs[0].train.values) == {"loss"}


def test_ramped_run_refuses_a_trainable_it_cannot_resize_and_bad_ramp_options():
    with pytest.raises(TypeError, match="RampedRun ramps a batchlab.sweeps.SupervisedRun, got object"):
        RampedRun(object(), max_batch=64, max_micro_batch=16)
    bad = RampFactory(Task("teacher-student"), max_batch=4, max_micro_batch=16)
    with pytest.raises(ValueError, match=r"^invalid max_batch 4: below the current batch 8"):
        bad(8, 1e-3, 0)


class _CountingTask:
    """A built-in task that counts the runs it builds (a refused sweep must build none)."""

    name = "teacher-student"

    def __init__(self):
        self.task, self.built = Task("teacher-student", noise_every=0), 0

    def __call__(self, batch_size, lr, seed):
        self.built += 1
        return self.task(batch_size, lr, seed)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([8, 32], r"^invalid max_batch 16: below the current batch 32 \(a ramp only grows\)$"),
        ([1, 8], r"^invalid batch_size 1: a step needs at least 2 micro-batches of one sample"),
    ],
)
def test_a_ramped_sweep_refuses_a_start_it_cannot_run_before_any_run_or_directory(tmp_path, sizes, message):
    """Every start is checked in sweep(), not at its first run: the batch 8 sweep must not train first."""
    task = _CountingTask()
    ramp = RampFactory(task, max_batch=16, max_micro_batch=8)
    with pytest.raises(ValueError, match=message):
        sweep(ramp, sizes, lr=3e-3, budget=3, directory=tmp_path, tracking_uri=False, report=False)
    assert task.built == 0
    assert not list(tmp_path.rglob("sweep.json"))


def test_ramp_factory_passes_measure_every_to_the_ramp():
    """measure_every=3: 30 steps of the run measure 10 (the 1st, 4th, ...); 0 is refused by its name."""
    run = RampFactory(Task("teacher-student"), max_batch=8, max_micro_batch=4, measure_every=3)(8, 1e-3, 0)
    try:
        for _ in range(30):
            run.train_step()
        assert run.ramp.estimate().updates == 10 and run.ramp.collector.skipped_steps == 20
    finally:
        run.close()
    with pytest.raises(ValueError, match=r"^invalid measure_every 0: expected an int >= 1$"):
        RampFactory(Task("teacher-student"), max_batch=8, max_micro_batch=4, measure_every=0)


def test_ramp_factory_passes_min_accumulation_to_the_ramp():
    """min_accumulation=4 at batch 16: the run trains 4 micro-batches of 4 and the collector measures from them;
    1 is refused by its name."""
    run = RampFactory(Task("teacher-student"), max_batch=16, max_micro_batch=8, min_accumulation=4)(
        16, 1e-3, 0
    )
    try:
        assert (run.ramp.micro_batch, run.ramp.accumulation) == (4, 4)
        run.train_step()
        assert (run.ramp.last_pair.b_small, run.ramp.last_pair.b_big) == (4, 16)
    finally:
        run.close()
    with pytest.raises(ValueError, match=r"^invalid min_accumulation 1: expected an int >= 2$"):
        RampFactory(Task("teacher-student"), max_batch=8, max_micro_batch=4, min_accumulation=1)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_batch": 0}, r"^invalid max_batch 0: expected an int >= 1$"),
        ({"max_micro_batch": 2.5}, r"^invalid max_micro_batch 2.5: expected an int >= 1$"),
        ({"target": 0.0}, r"^invalid target 0.0: expected a number > 0 \(the multiple of B_simple"),
        ({"growth": 1.0}, r"^invalid growth 1.0: expected a number > 1"),
        ({"patience": 0}, r"^invalid patience 0: expected an int >= 1$"),
        ({"z": -1.0}, r"^invalid z -1.0: expected a number >= 0"),
        ({"min_updates": 0}, r"^invalid min_updates 0: expected an int >= 1$"),
        ({"beta": 1.0}, r"^invalid beta 1.0: expected a number in \[0, 1\)"),
        ({"rule": "cubic"}, r"^invalid rule 'cubic': expected one of 'linear', 'sqrt'"),
        ({"keep": ("lr",)}, r"^invalid keep entry 'lr': expected one of 'betas'"),
    ],
)
def test_ramp_factory_refuses_a_bad_setting_when_made_before_any_run_trains(setting, message):
    """A sweep of ramps fails at RampFactory(...), not after the fixed batches it is compared with have run:
    the factory is never called, so no run is built."""
    calls = []

    def factory(batch_size, lr, seed):
        calls.append(batch_size)
        return Task("teacher-student")(batch_size, lr, seed)

    with pytest.raises(ValueError, match=message):
        RampFactory(factory, **{"max_batch": 8, "max_micro_batch": 4, **setting})
    assert calls == []


def test_ramp_factory_refuses_a_factory_it_cannot_call():
    with pytest.raises(
        TypeError, match=r"^RampFactory needs a run factory \(batch_size, lr, seed\) -> run, got 'mnist1d'$"
    ):
        RampFactory("mnist1d", max_batch=8, max_micro_batch=4)


# ------------------------------------------------------------------------------------------- batchlab sweep --ramp-to

RAMP_CLI = ["sweep", "--workload", "teacher-student", "--batch-sizes", "8", "--lr", "3e-3", "--budget-steps", "80",
            "--no-tracking", "--no-report", "--threads", "1"]  # fmt: skip


def test_cli_ramp_grows_each_run_from_its_start_and_records_the_batch_per_step(tmp_path, capsys):
    from batchlab.cli import main
    from batchlab.sweeps import SweepResult, verdict

    assert main([*RAMP_CLI, "--dir", str(tmp_path), "--ramp-to", "64", "--ramp-min-accumulation", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the console's width
    assert "sweep teacher-student-ramp-" in out
    assert "batch ramp: each row's batch is its runs' start; they ended from 8 to 64" in out
    (directory,) = (tmp_path / "sweeps").iterdir()
    (run,) = SweepResult.load(directory).runs
    batches = run.train["batch_size"]
    assert batches[0] == 8 and batches[-1] == 64 and batches == sorted(batches)
    assert run.samples == sum(batches)
    assert run.accumulation == 4  # --ramp-min-accumulation 4: batch 64 as 4 x 16, not the default 2 x 32
    said = " ".join(verdict(SweepResult.load(directory)))  # the report's verdict says it too
    assert (
        "These runs are batch ramps: each batch size here is where its runs started, and they ended from 8 to 64"
        in said
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ramp-target", "2"], "--ramp-target needs --ramp-to MAX_BATCH"),
        (["--ramp-micro-batch", "16", "--ramp-min-accumulation", "4"],
         "--ramp-micro-batch, --ramp-min-accumulation needs --ramp-to MAX_BATCH"),
        (["--ramp-to", "4"], "invalid --ramp-to 4: below the starting batch 8 (--batch-sizes)"),
        (["--ramp-to", "0"], "invalid --ramp-to 0: expected"),
        (["--ramp-to", "64", "--accumulation", "2"], "--accumulation 2 with --ramp-to: the ramp sets the accumulation"),
        (["--ramp-to", "64", "--noise-every", "4"], "--noise-every 4 with --ramp-to: the ramp sets the accumulation"),
        (["--ramp-to", "64", "--ramp-target", "0"], "invalid target 0.0: expected"),
        (["--ramp-to", "64", "--ramp-min-accumulation", "1"], "invalid min_accumulation 1: expected"),
        (["--ramp-to", "64", "--ramp-micro-batch", "0"], "invalid --ramp-micro-batch 0: expected"),
    ],
)  # fmt: skip
def test_cli_ramp_refuses_what_it_cannot_honour_in_one_line_before_training(tmp_path, capsys, extra, message):
    from batchlab.cli import main

    assert main([*RAMP_CLI, "--dir", str(tmp_path), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweeps").exists()  # nothing trained, no sweep started


def test_cli_ramp_refuses_auto_batches_and_a_users_file(tmp_path, capsys):
    from batchlab.cli import main

    auto = [*RAMP_CLI, "--dir", str(tmp_path), "--ramp-to", "64"]
    auto[auto.index("8")] = "auto"
    assert main(auto) == 1
    assert '--ramp-to needs the starting batches in --batch-sizes, not "auto"' in capsys.readouterr().err
    own = tmp_path / "own.py"
    own.write_text(  # the user's own factory: the CLI cannot know its runs can be resized
        "from batchlab.workloads.tasks import Task\n\n"
        "def make():\n    task = Task('teacher-student')\n    return lambda b, lr, seed: task(b, lr, seed)\n"
    )
    mine = [*RAMP_CLI, "--dir", str(tmp_path), "--ramp-to", "64"]
    mine[mine.index("teacher-student")] = f"{own}:make"
    assert main(mine) == 1
    assert (
        "--ramp-to ramps a built-in task (mlp-digits, mnist1d, teacher-student, char-lm), not "
        in capsys.readouterr().err
    )
