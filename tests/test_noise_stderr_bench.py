"""benchmarks/noise_stderr.py (issue 13 item 6): many short B_simple measurements from one state.

A benchmark, but one that builds on the library's public task API: these runs catch it breaking (a twin,
critical_branch.py, once imported a private loader that was renamed, and failed unnoticed)."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import noise_stderr  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_run_starts_from_one_state_and_only_the_data_order_differs():
    first = noise_stderr.measure("mlp-digits", runs=3, steps=12, batch=32, lr=1e-3)
    again = noise_stderr.measure("mlp-digits", runs=3, steps=12, batch=32, lr=1e-3)
    assert first["rows"] == again["rows"]  # the workload is restored after each run, and seeds fix the order
    values = [row["b_simple"] for row in first["rows"]]
    assert first["defined"] == 3 and len(set(values)) == 3  # other data orders, other readings
    assert first["spread"] == pytest.approx(statistics.stdev(values))
    assert 0.0 <= first["covered"] <= 1.0


def test_main_writes_the_table_and_its_raw_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(noise_stderr, "RESULTS_DIR", tmp_path)
    assert noise_stderr.main(["--tasks", "mlp-digits", "--runs", "3", "--steps", "8", "--batch", "16"]) == 0
    table = capsys.readouterr().out
    assert "| mlp-digits | 8 | 3/3 |" in table
    (written,) = tmp_path.glob("noise_stderr_*.json")
    record = json.loads(written.read_text())
    assert [(r["task"], r["steps"], r["batch"]) for r in record["results"]] == [("mlp-digits", 8, 16)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "teacher-student"], r"unknown task\(s\) teacher-student: choose from mlp-digits"),
        (["--lr", "-1"], r"--lr must be >= 0, got -1.0"),
        (["--runs", "2"], r"--runs must be >= 3 for a spread, got 2"),
        (["--steps", "100,x"], r"--steps 100,x: expected window lengths of at least 2 steps"),
        (["--steps", "1"], r"--steps 1: expected window lengths of at least 2 steps"),
    ],
)
def test_bad_arguments_are_refused_before_any_measuring(argv, message, capsys):
    with pytest.raises(SystemExit):
        noise_stderr.main(argv)
    assert re.search(message, capsys.readouterr().err)
