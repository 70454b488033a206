"""Sweep: budgets and targets, the run loop's bookkeeping, the critical-batch math, and a real tracked sweep."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab.noise.critical import (
    critical_batch_along,
    crossing,
    fit_critical_batch,
    noise_window,
    pooled_noise_scale,
)
from batchlab.sweeps import (
    Budget,
    Curve,
    RunSpec,
    RunStatus,
    StopReason,
    SweepResult,
    SweepRun,
    Target,
    TargetMode,
    auto_batch_sizes,
    execute_run,
    sweep,
)
from batchlab.sweeps.records import fingerprint
from batchlab.workloads import load_workload
from batchlab.workloads.tasks import Task, load_task
from sweep_helpers import ScriptedRun, fresh_store, sweep_config, sweep_run

# ------------------------------------------------------------------------------------------ budget, target


@pytest.mark.parametrize(
    "value, expected",
    [
        (500, Budget(steps=500)),
        ("500 steps", Budget(steps=500)),
        ("20000 samples", Budget(samples=20000)),
        ("90s", Budget(seconds=90.0)),
        ("1.5 seconds", Budget(seconds=1.5)),
        ({"steps": 10, "seconds": 5}, Budget(steps=10, seconds=5)),
    ],
)
def test_budget_forms(value, expected):
    assert Budget.parse(value) == expected


@pytest.mark.parametrize("value", [0, -3, "ten steps", "5 parsecs", {"epochs": 3}, {}, True])
def test_budget_rejects_nonsense(value):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(value)


def test_budget_limits():
    budget = Budget(steps=100, samples=1000)
    assert budget.max_steps(64) == 16  # ceil(1000 / 64): samples bind first
    assert budget.max_steps(4) == 100
    assert budget.spent(16, 1024, 0.0) == "samples"
    assert budget.spent(5, 320, 0.0) is None
    assert Budget(seconds=2).max_steps(8) is None and Budget(seconds=2).spent(3, 24, 2.5) == "seconds"


def test_target_forms():
    assert Target.parse(0.3) == Target(0.3, "loss", "min")
    assert Target.parse("accuracy>=0.95") == Target(0.95, "accuracy", "max")
    assert Target.parse("loss<=0.2").reached(0.2) and not Target.parse("loss<=0.2").reached(float("nan"))
    assert Target(0.9, "accuracy").mode == "max"
    with pytest.raises(ValueError, match="invalid target"):
        Target.parse("better please")


# ------------------------------------------------------------------------------------------------ math


def test_fit_recovers_known_critical_batch():
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    steps = [50.0 * (1 + 200.0 / b) for b in sizes]
    fit = fit_critical_batch(sizes, steps)
    assert fit.bounded
    assert fit.b_crit == pytest.approx(200.0, rel=1e-6) and fit.s_min == pytest.approx(50.0, rel=1e-6)
    assert fit.e_min == pytest.approx(10_000.0, rel=1e-6) and fit.rms_log_error < 1e-9
    assert fit.samples(200) == pytest.approx(2 * fit.e_min)


def test_samples_at_steps_is_the_fixed_batch_with_those_steps():
    fit = fit_critical_batch([8, 32, 128, 512], [50.0 * (1 + 200.0 / b) for b in (8, 32, 128, 512)])
    for batch in (4.0, 50.0, 200.0, 3000.0):
        assert fit.samples_at_steps(fit.steps(batch)) == pytest.approx(fit.samples(batch), rel=1e-9)
    assert fit.samples_at_steps(fit.s_min) == math.inf and fit.samples_at_steps(1.0) == math.inf


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.floats(1.0, 4096.0), min_size=1, max_size=6),
    shares=st.lists(st.floats(0.01, 1.0), min_size=6, max_size=6),
    b_crit=st.floats(4.0, 2048.0),
)
def test_no_schedule_beats_the_fixed_curve_under_a_constant_critical_batch(batches, shares, b_crit):
    # A schedule spends a share of the progress to the target at each batch; under a constant B_crit each
    # stretch costs S_min (1 + B_crit/B) steps and E_min (1 + B/B_crit) samples per unit of progress. The
    # curve is convex, so the schedule costs at least the fixed batch's samples in the same steps.
    s_min = 50.0
    fit = fit_critical_batch([8, 32, 128, 512], [s_min * (1 + b_crit / b) for b in (8, 32, 128, 512)])
    total = sum(shares[: len(batches)])
    steps = sum(w / total * fit.steps(b) for w, b in zip(shares, batches))
    samples = sum(w / total * fit.samples(b) for w, b in zip(shares, batches))
    assert samples >= fit.samples_at_steps(steps) * (1 - 1e-9)


def test_fit_reports_bounds_when_the_range_does_not_contain_b_crit():
    sizes = [8, 16, 32, 64]
    perfect = fit_critical_batch(sizes, [6400.0 / b for b in sizes])  # S ∝ 1/B: B_crit beyond the largest
    assert not perfect.bounded and "above the largest" in perfect.note
    flat = fit_critical_batch(sizes, [100.0] * 4)  # no gain at all: B_crit below the smallest
    assert not flat.bounded and "below the smallest" in flat.note


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_critical_batch([8, 16], [10.0, 5.0])
    with pytest.raises(ValueError, match="> 0"):
        fit_critical_batch([8, 16, 32], [10.0, 0.0, 5.0])


def test_critical_batch_along_a_run_is_what_the_steps_at_every_batch_fit_to():
    # A noise scale growing 20 -> ~150 along 100 steps of a run at batch 32. Each piece of the run at batch b
    # takes dS_min (1 + B_noise/b) steps, dS_min = ds / (1 + B_noise/32): the steps at every b then follow
    # S_min (1 + B_crit/b) exactly, and their fit must find the B_crit the function predicts.
    steps = [i / 2 for i in range(201)]
    scales = [20.0 * math.exp(s / 50) for s in steps]
    minimal = [1 / (1 + n / 32) for n in scales]

    def steps_at(b):
        per_step = [m * (1 + n / b) for m, n in zip(minimal, scales)]
        return sum((per_step[i] + per_step[i + 1]) / 4 for i in range(len(steps) - 1))  # trapezoid, ds = 1/2

    sizes = [8, 32, 128, 512, 2048]
    fit = fit_critical_batch(sizes, [steps_at(b) for b in sizes])
    predicted = critical_batch_along(steps, scales, 32)
    assert fit.b_crit == pytest.approx(predicted, rel=1e-6)
    # Nearer the start than the plain mean: where the run at 32 crawls (B_noise >> 32) weighs less.
    assert scales[0] < predicted < sum(scales) / len(scales)
    assert critical_batch_along([0, 5, 10], [64.0, 64.0, 64.0], 32) == pytest.approx(64.0)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0], [10.0], 32), "at least two readings"),
        (([0, 1], [10.0], 32), "differ in length"),
        (([0, 1], [10.0, 0.0], 32), "noise scales finite and > 0"),
        (([1, 1], [10.0, 20.0], 32), "strictly ascending"),
        (([0, 1], [10.0, 20.0], 0), "batch_size must be finite and > 0, got 0"),
    ],
)
def test_critical_batch_along_rejects_bad_readings(args, match):
    with pytest.raises(ValueError, match=match):
        critical_batch_along(*args)


def test_crossing_interpolates_between_the_bracketing_points():
    steps, samples = [0, 10, 20, 30], [0, 640, 1280, 1920]
    losses = [2.0, 1.0, 0.5, 0.2]
    assert crossing([steps, samples], losses, 0.75) == pytest.approx([15.0, 960.0])
    assert crossing(steps, losses, 3.0) == [0]  # met at the first point
    assert crossing(steps, losses, 0.1) is None
    assert crossing(steps, [0.1, 0.5, 0.9, 0.95], 0.9, mode="max") == pytest.approx([20.0])


def test_noise_window_uses_the_second_half_before_the_target():
    steps = list(range(1, 21))
    g2 = [10.0] * 10 + [1.0] * 10  # |G|² falls during training
    trace = [100.0] * 20
    window = noise_window(steps, g2, trace, end=20)
    assert (window.first_step, window.last_step, window.updates) == (11, 20, 10)
    assert window.b_simple == pytest.approx(100.0)
    short = noise_window(steps, g2, trace, end=3)  # fewer than 4 in the window: the last 4 up to the end
    assert short.updates == 3 and short.first_step == 1
    assert pooled_noise_scale(
        [window, noise_window(steps, [2.0] * 20, [100.0] * 20, end=20)]
    ) == pytest.approx(100.0 / 1.5)


# ------------------------------------------------------------------------------------------ the run loop


def test_run_loop_records_curves_and_interpolated_target():
    # evaluations happen at steps 0 (before training), 1 (early), 2, 4, 6
    scripted = ScriptedRun(4, [1.0] * 6, [2.0, 1.5, 1.0, 0.25, 0.2])
    run = execute_run(lambda b, lr, seed: scripted, RunSpec("k", 4, 0.1, 1.0, 0), sweep_config())
    assert run.status == "finished" and run.stopped_by == "steps" and run.steps == 6 and run.samples == 24
    assert run.val.step == [0, 1, 2, 4, 6] and run.train.step == [1, 2, 3, 4, 5, 6]
    assert run.val.samples == [0, 4, 8, 16, 24]
    assert run.steps_to_target == pytest.approx(2 + 2 * (1.0 - 0.5) / (1.0 - 0.25))  # between steps 2 and 4
    assert run.samples_to_target == pytest.approx(4 * run.steps_to_target)
    assert run.final_val == {"loss": 0.2} and run.best_val_loss == 0.2
    assert run.throughput is not None and run.throughput > 0  # steps 3..6 timed (warm-up excluded)
    assert run.noise_scale is None and run.noise_updates.step == []  # a trainable without noise measurement


def test_run_loop_stops_at_target_and_on_divergence():
    config = sweep_config(stop_at_target=True, budget=Budget(steps=100))
    run = execute_run(
        lambda b, lr, s: ScriptedRun(4, [1.0], [2.0, 1.0, 0.4]), RunSpec("k", 4, 0.1, 1, 0), config
    )
    assert run.stopped_by == "target" and run.steps == 2 and run.status == "finished"

    nan_at_3 = ScriptedRun(4, [1.0, 0.9, float("nan")], [2.0])
    run = execute_run(lambda b, lr, s: nan_at_3, RunSpec("k", 4, 0.1, 1, 0), sweep_config())
    assert run.status == "diverged" and run.steps == 3 and run.train["loss"][-1] is None


def test_run_loop_turns_out_of_memory_into_a_record_and_reraises_other_errors():
    oom = ScriptedRun(4, [1.0], [2.0], fail_at=3, error=RuntimeError("CUDA out of memory. Tried to allocate"))
    run = execute_run(lambda b, lr, s: oom, RunSpec("k", 4, 0.1, 1, 0), sweep_config())
    assert run.status == "oom" and "out of memory at step 3" in run.error
    shape_bug = ScriptedRun(
        4, [1.0], [2.0], fail_at=2, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        execute_run(lambda b, lr, s: shape_bug, RunSpec("k", 4, 0.1, 1, 0), sweep_config())


def test_split_batch_noise_measurement_does_not_change_training():
    task_plain, task_noise = Task("teacher-student", noise_every=0), Task("teacher-student", noise_every=1)
    plain, measured = task_plain(32, 1e-3, 0), task_noise(32, 1e-3, 0)
    for _ in range(3):
        plain.train_step()
        measured.train_step()
    for a, b in zip(plain.model.parameters(), measured.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # halves weighted by size: the same gradient
    assert measured.noise_scale().updates == 3 and measured.last_noise is not None
    assert plain.noise_scale() is None


def test_accumulation_measures_noise_on_every_nth_step_as_asked():
    """noise_every holds with accumulation too: the micro-batches measure steps 1, 4, 7 of 7 with noise_every=3,
    every step with 1; the measured steps are flagged (left out of the throughput)."""
    for every, want in ((1, [True] * 7), (3, [True, False, False] * 2 + [True])):
        run = Task("teacher-student", accumulation=4, noise_every=every)(64, 1e-3, 0)
        flags = []
        for _ in range(7):
            run.train_step()
            flags.append(run.last_step_measured_noise)
        assert flags == want
        assert run.noise_scale().updates == sum(want) and run.micro_batch == 16 and run.accumulation == 4


def test_tasks_split_and_seed():
    (xt, yt), (xv, yv) = Task("mlp-digits").data()
    assert len(xt) == 1438 and len(xv) == 359 and len(xt) + len(xv) == 1797  # 80/20 of sklearn's digits
    a, b = Task("mlp-digits")(16, 1e-3, 7), Task("mlp-digits")(64, 1e-3, 7)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)  # same seed, same initial weights at every batch size
    with pytest.raises(ValueError, match="larger than the 1438 training samples"):
        Task("mlp-digits")(4096, 1e-3, 0)


def test_a_tasks_model_is_the_one_its_runs_start_from_and_leaves_the_rng_alone():
    before = torch.random.get_rng_state()
    model = Task("mnist1d").model(3)
    assert torch.equal(torch.random.get_rng_state(), before)
    run = Task("mnist1d")(32, 1e-3, 3)
    for p, q in zip(model.parameters(), run.model.parameters(), strict=True):
        assert torch.equal(p, q)
    other = Task("mnist1d").model(4)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))
    with pytest.raises(ValueError, match=r"seed.*-1.*an int >= 0"):
        Task("mnist1d").model(-1)


def test_the_mlp_digits_workload_trains_and_validates_on_the_tasks_split():
    (xt, yt), (xv, yv) = Task("mlp-digits").data()
    workload = load_workload("mlp-digits")
    assert workload.dataset_size == len(xt) == 1438
    assert torch.equal(workload.validation[0], xv) and torch.equal(workload.validation[1], yv)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inputs, _ = workload.make_batch(4096)
    drawn = {tuple(row.tolist()) for row in inputs}
    assert drawn <= {tuple(row.tolist()) for row in xt}  # every batch comes from the training split


def test_auto_batch_sizes_are_powers_of_two_up_to_the_training_set():
    assert auto_batch_sizes(Task("mlp-digits"), 1e-3, device="cpu") == [8, 16, 32, 64, 128, 256, 512, 1024]


# ------------------------------------------------------------------------------------ a real tracked sweep


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri = fresh_store(root)
    torch.set_num_threads(1)  # tiny model: extra threads only contend on a shared machine
    events = []
    result = sweep(
        load_task("mlp-digits"),
        [16, 64, 256],
        lr=1e-3,
        budget=30,
        target=1.5,
        directory=root,
        tracking_uri=uri,
        report=False,
        on_event=events.append,
    )
    return result, events, uri, root


def test_sweep_records_every_run(tracked):
    result, events, _, root = tracked
    assert [r.batch_size for r in result.runs] == [16, 64, 256]
    assert [e.kind for e in events if e.kind != "step"] == ["start", "done"] * 3
    for run in result.runs:
        assert run.status == "finished" and run.steps == 30 and run.samples == 30 * run.batch_size
        assert run.lr == pytest.approx(1e-3 * math.sqrt(run.batch_size / 16))  # sqrt rule from the smallest
        assert len(run.train) == 30 and run.val.step[0] == 0 and run.val.step[-1] == 30
        assert run.throughput > 0 and run.peak_bytes > 0 and run.mlflow_run_id
        assert run.noise_updates.step and run.noise_updates.step[0] == 1  # every 4th step, from the first
    assert result.directory == root.resolve() / "sweeps" / result.name
    again = SweepResult.load(result.directory)
    assert [r.to_dict() for r in again.runs] == [r.to_dict() for r in result.runs]
    assert json.loads(result.to_json())["config"]["batch_sizes"] == [16, 64, 256]


def test_sweep_is_read_back_through_mlflow(tracked):
    from mlflow import MlflowClient

    result, _, uri, _ = tracked
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(result.name)
    assert experiment is not None and experiment.experiment_id == result.experiment_id
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`batchlab.kind` = 'run'")
    assert sorted(int(r.data.params["batch_size"]) for r in runs) == [16, 64, 256]
    for run in runs:
        params = run.data.params
        assert (
            params["rule"] == "sqrt" and params["workload"] == "mlp-digits" and params["precision"] == "fp32"
        )
        assert params["accumulation"] == "1" and float(params["lr"]) == pytest.approx(
            1e-3 * math.sqrt(int(params["batch_size"]) / 16)
        )
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, 31))
        val = client.get_metric_history(run.info.run_id, "val_loss")
        assert val[0].step == 0 and val[-1].step == 30
        assert run.data.metrics["throughput_samples_per_s"] > 0 and run.data.metrics["peak_memory_bytes"] > 0
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["batchlab.kind"] == "sweep" and parent.info.status == "FINISHED"


def test_sweep_resumes_without_redoing_and_recovers_from_mlflow(tracked):
    from mlflow import MlflowClient

    result, _, uri, root = tracked
    client = MlflowClient(tracking_uri=uri)
    lost = result.directory / "runs" / f"{result.runs[1].key}.json"
    lost.unlink()  # as if killed after logging to MLflow, before writing the JSON
    stray = client.create_run(
        result.experiment_id, tags={"batchlab.kind": "run", "batchlab.run_key": "b16-lr1x-s0"}
    )
    events = []
    again = sweep(
        load_task("mlp-digits"),
        [16, 64, 256],
        lr=1e-3,
        budget=30,
        target=1.5,
        directory=root,
        tracking_uri=uri,
        report=False,
        on_event=events.append,
    )
    assert [e.kind for e in events] == ["skip"] * 3  # nothing trained again
    assert lost.exists() and [r.mlflow_run_id for r in again.runs] == [r.mlflow_run_id for r in result.runs]
    assert client.get_run(stray.info.run_id).info.lifecycle_stage == "deleted"  # the duplicate is gone
    active = client.search_runs([result.experiment_id], filter_string="tags.`batchlab.kind` = 'run'")
    assert sorted(r.data.tags["batchlab.run_key"] for r in active) == sorted(r.key for r in result.runs)


def test_sweep_refuses_a_different_sweep_under_the_same_name(tracked):
    result, _, uri, root = tracked
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep(
            load_task("mlp-digits"),
            [16, 64],
            lr=1e-3,
            budget=30,
            name=result.name,
            directory=root,
            tracking_uri=uri,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0}, "invalid lr 0: expected a number > 0"),
        ({"rule": "adascale"}, "invalid rule 'adascale': expected one of 'linear', 'sqrt', 'none'"),
        ({"batch_sizes": [16, 16]}, "duplicates"),
        ({"batch_sizes": "many"}, "batch_sizes"),
        ({"backend": "spark"}, "backend"),
        ({"lr_multipliers": (1, -2)}, "invalid lr_multipliers entry -2: expected a number > 0"),
        ({"budget": "forever"}, "invalid budget"),
    ],
)
def test_sweep_validates_before_training(tmp_path, kwargs, match):
    args = {"batch_sizes": [16], "lr": 1e-3, "budget": 5, "directory": tmp_path, "tracking_uri": False}
    args.update(kwargs)
    batch_sizes = args.pop("batch_sizes")
    with pytest.raises(ValueError, match=match):
        sweep(load_task("mlp-digits"), batch_sizes, **args)
    assert not (tmp_path / "sweeps").exists()


def test_sweep_run_round_trips_through_json():
    curve = Curve()
    curve.add(1, 8, 0.1, loss=1.0)
    curve.add(2, 16, 0.2, loss=0.5, accuracy=0.7)
    assert curve.values == {"loss": [1.0, 0.5], "accuracy": [None, 0.7]}
    run = execute_run(
        lambda b, lr, s: ScriptedRun(4, [1.0], [2.0, 0.4]), RunSpec("k", 4, 0.1, 1.0, 0), sweep_config()
    )
    assert SweepRun.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_outcomes_are_str_enums_whose_json_is_the_plain_strings_of_before():
    run = execute_run(
        lambda b, lr, s: ScriptedRun(4, [1.0], [2.0, 0.4]), RunSpec("k", 4, 0.1, 1.0, 0), sweep_config()
    )
    assert run.status is RunStatus.FINISHED and run.stopped_by is StopReason.STEPS
    data = json.loads(json.dumps(run.to_dict()))
    assert (data["status"], data["stopped_by"]) == ("finished", "steps")
    assert SweepRun.from_dict(data).status is RunStatus.FINISHED  # read back as the enum
    assert (
        f"{run.status} / {StopReason.OOM}" == "finished / oom"
    )  # prints as its value (MLflow tags, the report)
    assert (
        Target(0.5).mode is TargetMode.MIN and json.loads(json.dumps(Target(0.5).to_dict()))["mode"] == "min"
    )
    # the hash a resumed sweep must match, computed by the code before the enums: old directories still resume
    assert fingerprint(sweep_config()) == "2f2fa64b4061"


# ------------------------------------------------------------------------------------------------------ CLI


def test_by_batch_size_keeps_the_fastest_multiplier_every_seed_of_which_reached():
    def run(batch, multiplier, steps, loss, throughput):
        return sweep_run(batch_size=batch, lr_multiplier=multiplier, steps_to_target=steps,
                         samples_to_target=None if steps is None else steps * batch, final_val={"loss": loss},
                         throughput=throughput)  # fmt: skip

    runs = [run(16, 1.0, 90, 0.3, 10.0), run(16, 2.0, 40, 0.2, 11.0), run(16, 1.0, 110, 0.4, 12.0),
            run(16, 2.0, None, 0.9, 13.0),  # x2 is faster where it reached, but one seed missed
            run(32, 1.0, None, 0.6, 20.0), run(32, 2.0, None, 0.7, 21.0)]  # fmt: skip
    result = SweepResult(config=sweep_config(batch_sizes=[16, 32]), runs=runs)
    every = result.by_multiplier(16)
    assert [(s.lr_multiplier, s.runs, s.steps_to_target, s.reached) for s in every] == [
        (1.0, 2, 100.0, 2),
        (2.0, 2, None, 1),
    ]  # the sweep's order; no mean over the seeds that reached alone
    at16, at32 = result.by_batch_size()
    assert (at16.lr_multiplier, at16.steps_to_target, at16.samples_to_target) == (1.0, 100.0, 1600.0)
    assert at16.runs == 4 and at16.throughput == 11.5  # every run at the batch size, whatever its multiplier
    # no multiplier reached the target at 32: the lowest mean final loss wins
    assert (at32.lr_multiplier, at32.steps_to_target, at32.final_val_loss) == (1.0, None, 0.6)


def test_cli_sweep_json_and_table(tmp_path, capsys):
    from batchlab.cli import main

    args = ["sweep", "--workload", "teacher-student", "--batch-sizes", "16,32,64", "--lr", "1e-3"]
    args += [
        "--budget-steps",
        "12",
        "--target-loss",
        "2.3",
        "--no-tracking",
        "--no-report",
        "--dir",
        str(tmp_path),
    ]
    assert main([*args, "--json", "--threads", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["batch_size"] for row in data["by_batch_size"]] == [16, 32, 64]
    assert data["config"]["budget"] == {"steps": 12, "samples": None, "seconds": None}
    assert all("train" not in run for run in data["runs"])  # the JSON summary leaves the curves out

    assert main(args) == 0  # the same sweep again: resumed, nothing retrained, the table printed
    out = capsys.readouterr().out
    assert "best LR per batch size" in out and "sweep directory:" in out


def test_cli_sweep_needs_a_budget(tmp_path, capsys):
    from batchlab.cli import main

    code = main(
        ["sweep", "--workload", "mlp-digits", "--batch-sizes", "16", "--lr", "1e-3", "--dir", str(tmp_path)]
    )
    assert code == 1 and "give a budget per run" in capsys.readouterr().err


def test_a_cpu_sweep_trains_with_the_allocators_speed_back(tmp_path):
    # In a fresh process: glibc's thresholds are process-wide, and a test must not leave them changed.
    code = f"""
import batchlab
from batchlab.devices import cpu
from batchlab.sweeps import sweep
from batchlab.workloads.tasks import load_task
batchlab.find_batch_size(batchlab.workloads.load_workload("mlp-digits"), device="cpu")  # a search: exact
assert cpu._allocator == "exact"
result = sweep(load_task("mlp-digits"), [16], lr=1e-3, budget=5, directory={str(tmp_path)!r}, tracking_uri=False)
print(cpu._allocator, result.runs[0].peak_bytes > result.runs[0].baseline_bytes > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == [
        "fast",
        "True",
    ]  # for_training(): the exact allocator cost a step 1.3-2x
