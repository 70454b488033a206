"""benchmarks/critical_branch.py's ``--along`` (issue 13 item 4): the estimates read along the reference run.

The readings must not change the run they are read on (the target every branch aims at is that run's end), and
the window's critical batch is :func:`~batchlab.noise.critical.critical_batch_along` over them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import critical_branch  # noqa: E402
from batchlab.noise.critical import critical_batch_along  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_problem() -> critical_branch.Problem:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    split = ((x[:500], y[:500]), (x[500:], y[500:]))
    model = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))  # noqa: E731
    return critical_branch._tabular("tiny", split, model, 1e-2, 0.1, warm=3, ref=6)


def _checkpoint(problem):
    torch.manual_seed(0)
    model = problem.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=problem.lr)
    critical_branch._train(model, opt, problem, 32, problem.warm, torch.Generator().manual_seed(1))
    return model, opt


def test_reading_along_the_reference_run_leaves_its_target_bitwise():
    problem = _tiny_problem()
    model, opt = _checkpoint(problem)
    plain_target, none = critical_branch._reference_run(model, opt, problem, "adam", points=0)
    model, opt = _checkpoint(problem)
    target, readings = critical_branch._reference_run(model, opt, problem, "adam", points=4)
    assert none == [] and target == plain_target
    assert [r["step"] for r in readings] == [0, 2, 4, 6]
    assert readings[-1]["val_loss"] == target and all(r["noise"]["repeats"] == 96 for r in readings)


def test_along_window_averages_each_estimate_and_leaves_an_undefined_one_out():
    steps, simple, precond = [0, 5, 10], [40.0, 80.0, 120.0], [60.0, None, 90.0]
    readings = [
        {"step": s, "noise": {"b_simple": a, "b_noise": 2 * a, "b_preconditioned": p}}
        for s, a, p in zip(steps, simple, precond)
    ]
    window = critical_branch.along_window(readings)
    assert window["b_simple"]["window"] == pytest.approx(critical_batch_along(steps, simple, 32))
    assert window["b_simple"]["at_target"] == 120.0 and window["b_simple"]["readings"] == simple
    assert window["b_preconditioned"] == {"at_target": 90.0, "window": None, "readings": precond}


@pytest.mark.parametrize("value", ["1", "-2"])
def test_along_needs_two_points_or_none(value, capsys):
    with pytest.raises(SystemExit):
        critical_branch.main(["--along", value])
    assert f"--along {value}: expected 0 (off) or at least 2 points" in capsys.readouterr().err


def test_from_init_branches_from_the_first_step_to_the_same_end_step():
    problem = critical_branch.from_init(_tiny_problem())
    assert (problem.warm, problem.ref) == (1, 8)


def test_local_and_from_init_are_refused_together(capsys):
    with pytest.raises(SystemExit):
        critical_branch.main(["--local", "--from-init"])
    assert "--local and --from-init move the checkpoint opposite ways" in capsys.readouterr().err


def test_a_stored_run_reproduces_to_rounding_or_where_both_are_undefined():
    assert critical_branch._reproduces(1.0, 1.0 + 1e-9) and critical_branch._reproduces(None, None)
    assert not critical_branch._reproduces(1.0, 1.01)
    assert not critical_branch._reproduces(None, 1.0) and not critical_branch._reproduces(1.0, None)


def test_the_cost_counts_every_step_the_checkpoint_the_target_and_the_branches_take(monkeypatch):
    problem = _tiny_problem()  # warm 3 + ref 6 steps at batch 32; every branch evaluated each step (ref < 20)
    monkeypatch.setattr(critical_branch, "BATCHES", [8, 16, 64])
    monkeypatch.setattr(critical_branch, "GRID", [1.0])  # one LR: no cap from an earlier best
    result = critical_branch.branch_experiment(problem, log=lambda _: None)
    assert result["cost"]["setup"] == {"steps": 9, "samples": 9 * 32}
    # Evaluated every step, a branch runs ceil(steps-to-target) steps, or 6 ref when it never gets there.
    runs = {row["batch_size"]: math.ceil(row["steps"]) if row["steps"] else 36 for row in result["rows"]}
    assert result["cost"]["branches"] == {
        "steps": sum(runs.values()),
        "samples": sum(b * steps for b, steps in runs.items()),
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-search", "walk", "--grid", "1,2"], "--lr-search walk has no grid"),
        (["--first-seed", "-1"], "--first-seed must be 0 or more, got -1"),
        (["--noise-only", "x.json", "--lr-search", "walk"], "--noise-only runs none"),
        (["--noise-only", "/nonexistent/x.json"], "--noise-only: [Errno 2] No such file"),
    ],
)
def test_branch_options_that_cannot_apply_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        critical_branch.main(argv)
    assert message in capsys.readouterr().err


def test_stored_runs_read_the_provenance_form_and_the_bare_list_written_before_it(tmp_path):
    # a bare list, from 2026-12-05
    stored = ROOT / "benchmarks" / "results" / "critical_branch_walk_seed0.json"
    runs = json.loads(stored.read_text())
    assert isinstance(runs, list) and [r["dataset"][:7] for r in runs] == ["mlp-dig", "mnist1d", "char-lm"]
    assert critical_branch.stored_runs(str(stored)) == runs
    wrapped = tmp_path / "with_provenance.json"
    wrapped.write_text(json.dumps({"results": runs, "provenance": {"command": "critical_branch.py"}}))
    assert critical_branch.stored_runs(str(wrapped)) == runs
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"fixed": []}))
    with pytest.raises(ValueError, match=r"other.json: expected critical_branch.py's results"):
        critical_branch.stored_runs(str(other))


def test_each_data_set_builds_on_the_sweep_tasks_split():
    """The problems read the tasks' public data (a private loader they imported was renamed once, unnoticed)."""
    from batchlab.workloads.tasks import Task

    digits, mnist1d = critical_branch.problems(["digits", "mnist1d"], max_files=1)
    for problem, task in ((digits, "mlp-digits"), (mnist1d, "mnist1d")):
        (_, _), (val_x, val_y) = Task(task).data()
        assert torch.equal(problem.val[0], val_x) and torch.equal(problem.val[1], val_y)
        batch_x, _ = problem.sample(4, torch.Generator().manual_seed(0))
        assert problem.make_model()(batch_x).shape == (4, 10)
