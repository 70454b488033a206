"""The report: PNGs and one self-contained HTML page that references every plot and opens offline."""

from __future__ import annotations

import base64
import dataclasses
import re

import pytest
import torch

from batchlab.sweeps import SweepResult, sweep, verdict, write_report
from batchlab.sweeps.plots import PLOTS
from batchlab.workloads.tasks import load_task
from sweep_helpers import fresh_store

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = fresh_store(root)
    torch.set_num_threads(1)
    result = sweep(
        load_task("teacher-student"),
        [16, 32, 64],
        lr=3e-3,
        lr_multipliers=(1.0, 2.0),
        budget=40,
        target=2.25,
        name="rep",
        directory=root,
        tracking_uri=uri,
    )
    return result, uri


def _check_page(html: str, images) -> None:
    for image in images:
        assert f'data-plot="{image.name}"' in html
        assert base64.b64encode(image.read_bytes()).decode("ascii") in html  # inlined, not linked
    assert "http://" not in html and "https://" not in html  # opens offline: no external URL at all
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)  # every src/href is inline data


def test_sweep_writes_the_report_and_logs_it(swept):
    from mlflow import MlflowClient

    result, uri = swept
    assert result.report is not None and result.report.exists()
    names = {p.name for p in result.report.parent.glob("*.png")}
    assert names == {f"{name}.png" for name in PLOTS}
    page = result.report.read_text()
    _check_page(page, sorted(result.report.parent.glob("*.png")))
    assert "iterations / epoch" in page and "8,192 training samples" in page  # the schedule table
    artifacts = {
        f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(result.parent_run_id, "report")
    }
    assert {"report/report.html", "report/steps-to-target.png", "report/sweep.json"} <= artifacts


def test_report_command_from_an_mlflow_experiment(swept, tmp_path, capsys):
    from batchlab.cli import main

    result, uri = swept
    out_dir = tmp_path / "from-mlflow"  # no sweep directory needed: the runs' records are MLflow artifacts
    assert main(["report", "rep", "--tracking-uri", uri, "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out_dir / 'report.html'}" in printed and "Reaching val loss <= 2.25" in printed
    images = sorted(out_dir.glob("*.png"))
    assert [p.name for p in images] == sorted(f"{name}.png" for name in PLOTS)
    _check_page((out_dir / "report.html").read_text(), images)


def test_verdict_speaks_from_the_numbers(swept):
    result, _ = swept
    lines = verdict(result)
    assert lines[0].startswith("Reaching val loss <= 2.25 took")
    assert any("noise scale" in line for line in lines)


def test_verdict_of_one_batch_size_says_there_is_nothing_to_compare(swept):
    result, _ = swept
    alone = dataclasses.replace(result, runs=result.runs_at(32))
    assert verdict(alone)[0].endswith(
        "optimizer steps at batch 32, the only batch size swept: no other batch size to compare it with."
    )
    assert not any("batch ramps" in line for line in verdict(result))  # fixed runs record no batch per step


def test_report_refuses_what_is_not_a_sweep(tmp_path):
    with pytest.raises(ValueError, match="not a sweep directory"):
        write_report(tmp_path)


def test_a_target_read_off_the_stored_curves_gives_what_the_runs_recorded(swept):
    result, _ = swept
    stored = SweepResult.load(result.directory)  # the records as written to disk, JSON and back
    again = stored.with_target(None).with_target(2.25)  # every to-target field dropped, then read again
    fields = ("steps_to_target", "samples_to_target", "seconds_to_target", "noise_at_target")
    assert [[getattr(r, f) for f in fields] for r in again.runs] == [
        [getattr(r, f) for f in fields] for r in result.runs
    ]
    assert any(r.steps_to_target is not None for r in result.runs)
    assert all(r.steps_to_target is None for r in stored.with_target(None).runs)
    assert again.critical_batch() == result.critical_batch() and again.noise_scale() == result.noise_scale()


def test_a_looser_target_is_read_where_each_curve_first_crosses_it(swept):
    result, _ = swept
    looser = result.with_target(2.29)  # the untrained model reads 2.305
    assert looser.config.target.describe() == "val loss <= 2.29" and result.config.target.value == 2.25
    for before, run in zip(result.runs, looser.runs):
        first = next(i for i, v in enumerate(run.val["loss"]) if v <= 2.29)  # every run reached 2.25
        assert first > 0 and run.val.step[first - 1] < run.steps_to_target <= run.val.step[first]
        assert run.steps_to_target < before.steps_to_target


def test_report_target_loss_compares_a_sweep_at_another_target(swept, tmp_path, capsys):
    from batchlab.cli import main

    result, _ = swept
    assert main(["report", str(result.directory), "--target-loss", "2.29", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith("Reaching val loss <= 2.29 took") and (tmp_path / "steps-to-target.png").exists()
    )
    assert "target val loss &lt;= 2.29" in (tmp_path / "report.html").read_text()
    own = (result.directory / "report" / "report.html").read_bytes()
    assert main(["report", str(result.directory), "--target", "loss<=2.28"]) == 0  # no --out: beside the own
    printed = capsys.readouterr().out.splitlines()
    assert f"report: {result.directory / 'report-at-loss-2.28' / 'report.html'}" in printed
    assert (result.directory / "report" / "report.html").read_bytes() == own  # the sweep's own report stays


def test_a_target_the_untrained_model_already_meets_is_said_and_left_out(swept, tmp_path):
    result, _ = swept
    loose = result.with_target(2.5)  # every run's first evaluation (2.305) meets it: 0 steps
    assert all(r.steps_to_target == 0 for r in loose.runs) and loose.critical_batch() is None
    assert verdict(loose)[0].startswith(
        "Every batch size that reached val loss <= 2.5 met it at the first evaluation, before any step ([16, 32, 64])"
    )
    files = write_report(loose, tmp_path)  # no division by zero, no zero on a log axis
    assert "steps-to-target.png" not in {p.name for p in files.images}


def test_without_a_target_the_verdict_says_how_to_give_one_after_the_fact(swept):
    result, _ = swept
    assert "`batchlab report SWEEP --target-loss X` reads it off" in verdict(result.with_target(None))[0]


def test_runs_stopped_at_the_sweeps_target_refuse_a_target_past_it(tmp_path, capsys):
    from batchlab.cli import main

    torch.set_num_threads(1)
    stopped = sweep(
        load_task("teacher-student"), [32], lr=3e-3, budget=40, target=2.25, stop_at_target=True,
        name="stopped", directory=tmp_path, tracking_uri=False, report=False,
    )  # fmt: skip
    assert stopped.runs[0].stopped_by.value == "target"
    assert stopped.with_target(2.5).runs[0].steps_to_target <= stopped.runs[0].steps_to_target  # at or before
    with pytest.raises(ValueError, match=r"target val loss <= 2: 1 run\(s\) \(b32-lr1x-s0\) stopped at"):
        stopped.with_target(2.0)
    with pytest.raises(ValueError, match=r"target val accuracy >= 0.5: 1 run\(s\)"):
        stopped.with_target("accuracy>=0.5")  # another metric: the curve ends at the loss target
    assert main(["report", str(stopped.directory), "--target-loss", "2"]) == 1
    assert "stopped at the sweep's own target val loss <= 2.25 (stop_at_target)" in capsys.readouterr().err
