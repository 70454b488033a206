"""The report: PNGs and one self-contained HTML page that references every plot and opens offline."""

from __future__ import annotations

import base64
import re

import pytest
import torch

from batchlab.sweeps import sweep, verdict, write_report
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


def test_report_refuses_what_is_not_a_sweep(tmp_path):
    with pytest.raises(ValueError, match="not a sweep directory"):
        write_report(tmp_path)
