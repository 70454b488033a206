"""benchmarks/batch_ramp.py's scoring (issue 13 item 3): the two goals and the per-multiplier means.

The table keeps the step-optimal multiplier only; ``per_multiplier`` reports every one, and a multiplier where a
seed missed the target has no mean (an average over the seeds that reached would flatter it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import batch_ramp  # noqa: E402
from batchlab.sweeps import SweepResult  # noqa: E402
from sweep_helpers import sweep_config, sweep_run  # noqa: E402


def _run(multiplier, steps, samples):
    return sweep_run(
        batch_size=16, lr_multiplier=multiplier, steps_to_target=steps, samples_to_target=samples
    )


def test_per_multiplier_means_each_multiplier_and_drops_one_a_seed_missed():
    runs = [_run(1.0, 500, 20_000), _run(0.5, 700, 16_000), _run(1.0, 600, 21_000), _run(0.5, 900, 18_000),
            _run(2.0, 300, 30_000), _run(2.0, None, None)]  # fmt: skip
    rows = batch_ramp.per_multiplier(SweepResult(config=sweep_config(batch_sizes=[16]), runs=runs))
    assert rows == [
        {"lr_multiplier": 0.5, "steps_to_target": 800.0, "samples_to_target": 17_000.0},
        {"lr_multiplier": 1.0, "steps_to_target": 550.0, "samples_to_target": 20_500.0},
        {"lr_multiplier": 2.0, "steps_to_target": None, "samples_to_target": None},
    ]


FIXED = [
    {"batch_size": 16, "steps_to_target": 1000.0, "samples_to_target": 16_000.0},
    {"batch_size": 32, "steps_to_target": 550.0, "samples_to_target": 17_600.0},
]


@pytest.mark.parametrize(
    ("steps", "samples", "dominated", "both_goals"),
    [
        (600.0, 17_000.0, [], True),  # 0.6x the steps at 1.06x the samples of fixed 16
        (600.0, 18_000.0, [32], False),  # fixed 32 has fewer of both
        (800.0, 16_500.0, [], False),  # not dominated, but only 0.8x the steps
        (500.0, 18_000.0, [], False),  # fewer steps than fixed 32, but 1.125x the samples
        (1000.000005, 16_000.00008, [], False),  # fixed 16 itself, up to micro-batch rounding: not dominated
        (1000.01, 16_000.2, [16], False),  # 1e-5 more of both: dominated by fixed 16
    ],
)
def test_goals_against_the_fixed_rows(steps, samples, dominated, both_goals):
    goals = batch_ramp._goals(
        {"steps_to_target": steps, "samples_to_target": samples, "reached": 2}, FIXED, seeds=2
    )
    assert goals["dominated_by"] == dominated
    assert goals["goal_not_dominated"] is (not dominated)
    assert goals["goal_steps_samples"] is both_goals
    assert goals["steps_ratio"] == pytest.approx(steps / 1000.0)
    assert goals["samples_ratio"] == pytest.approx(samples / 16_000.0)


def test_goals_missed_when_a_ramp_seed_does_not_reach():
    goals = batch_ramp._goals(
        {"steps_to_target": 600.0, "samples_to_target": 17_000.0, "reached": 1}, FIXED, seeds=2
    )
    assert goals["goal_not_dominated"] is False
    assert goals["goal_steps_samples"] is False
    assert goals["steps_ratio"] is None


def test_both_goals_per_multiplier():
    """A multiplier meets both goals only when it is undominated and has >= 30% fewer steps at <= 1.1x the
    samples; one where a seed missed (None) meets neither."""
    assert batch_ramp._both_goals({"steps_to_target": 600.0, "samples_to_target": 17_000.0}, FIXED, 2) is True
    assert (
        batch_ramp._both_goals({"steps_to_target": 600.0, "samples_to_target": 18_000.0}, FIXED, 2) is False
    )
    assert batch_ramp._both_goals({"steps_to_target": None, "samples_to_target": None}, FIXED, 2) is False


def _curve_rows(s_min=40.0, b_crit=100.0, sizes=(16, 32, 64, 128, 256)):
    return [{"batch_size": b, "steps_to_target": s_min * (1 + b_crit / b),
             "samples_to_target": b * s_min * (1 + b_crit / b), "reached": 2} for b in sizes]  # fmt: skip


def test_fixed_curve_and_rows_over_it():
    """The curve fitted to fixed rows that follow S = S_min (1 + B_crit/B) passes through them (x1); a ramp is
    scored by its samples over the curve's at its own steps, under 1 only when it has fewer than any fixed batch."""
    rows = _curve_rows()
    curve = batch_ramp.fixed_curve(rows)
    assert curve.b_crit == pytest.approx(100.0, rel=1e-6)
    assert [batch_ramp.over_curve(curve, r) for r in rows] == pytest.approx([1.0] * 5)
    # Half the progress at 32, half at 128: steps and samples are the averages of the two fixed runs.
    half = {"steps_to_target": (curve.steps(32) + curve.steps(128)) / 2,
            "samples_to_target": (curve.samples(32) + curve.samples(128)) / 2}  # fmt: skip
    assert batch_ramp.over_curve(curve, half) > 1.05
    ramp = {"steps_to_target": 120.0, "samples_to_target": 5000.0}
    assert batch_ramp.over_curve(curve, ramp) == pytest.approx(5000.0 / curve.samples_at_steps(120.0))
    too_few = {"steps_to_target": 30.0, "samples_to_target": 9000.0}  # under S_min: no fixed batch gets there
    assert batch_ramp.over_curve(curve, too_few) == 0.0
    assert batch_ramp.over_curve(curve, {"steps_to_target": None, "samples_to_target": None}) is None
    assert batch_ramp.fixed_curve(rows[:2]) is None and batch_ramp.over_curve(None, rows[0]) is None


def test_rescore_scores_stored_rows_and_skips_rows_a_seed_missed():
    fixed = _curve_rows() + [
        {"batch_size": 512, "steps_to_target": None, "samples_to_target": None, "reached": 1}
    ]
    ramps = [{"target": 1.0, "steps_to_target": 100.0, "samples_to_target": 9000.0, "reached": 2},
             {"target": 2.0, "steps_to_target": 90.0, "samples_to_target": 9000.0, "reached": 1}]  # fmt: skip
    scored = batch_ramp.rescore({"dataset": "d", "seeds": 2, "fixed": fixed, "ramps": ramps})
    assert scored["curve"]["b_crit"] == pytest.approx(100.0, rel=1e-6)
    assert [r["over_curve"] for r in scored["fixed"]] == pytest.approx([1.0] * 5 + [None])
    curve = batch_ramp.fixed_curve(_curve_rows())
    assert scored["ramps"][0]["over_curve"] == pytest.approx(9000.0 / curve.samples_at_steps(100.0))
    assert scored["ramps"][1]["over_curve"] is None  # one seed missed the target: no mean to score
    assert "over_curve" not in ramps[0]  # the stored rows are left as they were


def test_main_curve_scores_stored_files_without_training(monkeypatch, capsys, tmp_path):
    def no_sweep(*args, **kwargs):
        raise AssertionError("--curve trained")

    stored = tmp_path / "r.json"
    stored.write_text(json.dumps({"results": [{"dataset": "d", "seeds": 2, "fixed": _curve_rows(), "ramps": [
        {"target": 1.5, "steps_to_target": 100.0, "samples_to_target": 9000.0, "reached": 2}]}],
        "min_accumulation": 4}))  # fmt: skip
    monkeypatch.setattr(batch_ramp, "_sweep", no_sweep)
    monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--curve", str(stored)])
    batch_ramp.main()
    row = capsys.readouterr().out.splitlines()[-1]
    ratio = 9000.0 / batch_ramp.fixed_curve(_curve_rows()).samples_at_steps(100.0)
    fixed = " / ".join(["x1.00"] * 5)
    assert row == f"| r | d | 2 | 4 | 100 (0.000) | {fixed} | 1.5: x{ratio:.2f} |"
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))  # another benchmark's JSON
    (tmp_path / "notes.md").write_text("# not JSON")
    for bad in ("none.json", "other.json", "notes.md"):
        monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--curve", str(stored), str(tmp_path / bad)])
        with pytest.raises(SystemExit, match="^2$"):
            batch_ramp.main()
        out, err = capsys.readouterr()
        assert out == ""  # nothing printed for the good file either
        assert err.splitlines()[-1].startswith(
            f"batch_ramp.py: error: invalid --curve {tmp_path / bad}: expected a results JSON of"
        )


def test_batches_keep_the_ramps_ends():
    assert batch_ramp._batch_list("256,16,48,32,48") == [16, 32, 48, 256]
    assert batch_ramp._batch_list("16,256,1024") == [16, 256, 1024]  # a ramp maximum above 256
    for text in ("16,128", "32,256", "16,x,256"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^invalid --batches '{text}': expected"):
            batch_ramp._batch_list(text)


@pytest.mark.parametrize(
    ("text", "seeds", "tag"),
    [("2", [0, 1], ""), ("3", [0, 1, 2], "-3seeds"), ("2,3,4", [2, 3, 4], "-seeds2-3-4")],
)
def test_seeds_as_a_count_or_a_list(text, seeds, tag):
    assert batch_ramp._seed_list(text) == seeds
    assert batch_ramp._seeds_tag(seeds) == tag


@pytest.mark.parametrize("text", ["0", "1,1", "-1,2", "two"])
def test_bad_seeds_are_refused_by_value(text):
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^invalid --seeds '{text}': expected a count"):
        batch_ramp._seed_list(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-accumulation", "1"], "invalid min_accumulation 1: expected an int >= 2"),
        (["--targets", "0"], "invalid target 0.0: expected a number > 0"),
        (["--datasets", "mnist1d,digits"], "invalid --datasets digits: expected a comma list of mlp-digits"),
    ],
)
def test_main_refuses_bad_ramp_settings_in_one_line_before_any_sweep(
    monkeypatch, capsys, tmp_path, argv, message
):
    """A bad setting is an argparse error (exit 2, one line naming the value) before the fixed sweeps train."""

    def no_sweep(*args, **kwargs):
        raise AssertionError("a sweep ran before the settings were checked")

    monkeypatch.setattr(batch_ramp, "_sweep", no_sweep)
    monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--out", str(tmp_path / "out.json"), *argv])
    with pytest.raises(SystemExit, match="^2$"):
        batch_ramp.main()
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith(f"batch_ramp.py: error: {message}")


class _Stop(Exception):
    """Ends main() at its first ramp sweep, once the settings and names are recorded."""


def _recorded_sweeps(monkeypatch, tmp_path, *argv: str) -> list[tuple]:
    """main() on mnist1d with ``argv``: each sweep's (factory, settings, name) up to the first ramp's."""
    calls = []

    def recording_sweep(factory, sizes, settings, seeds, directory, uri, name):
        calls.append((factory, settings, name))
        if isinstance(factory, batch_ramp.RampFactory):
            raise _Stop

    monkeypatch.setattr(batch_ramp, "_sweep", recording_sweep)
    monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--datasets", "mnist1d", "--targets", "1",
                                      "--directory", str(tmp_path), *argv])  # fmt: skip
    with pytest.raises(_Stop):
        batch_ramp.main()
    return calls


def test_ramp_rule_reaches_every_ramp_and_names_its_sweeps(monkeypatch, tmp_path):
    """--ramp-rule none (Smith et al.: grow the batch at a kept LR) is each ramp's rule and part of its sweep's
    name, so a store never resumes a sqrt-rule ramp under it; the fixed sweep is the same sweep either way."""
    (fixed, _, fixed_name), (ramp, _, ramp_name) = _recorded_sweeps(
        monkeypatch, tmp_path, "--ramp-rule", "none"
    )
    assert fixed_name == "mnist1d-fixed" and not isinstance(fixed, batch_ramp.RampFactory)
    assert ramp.rule == "none" and ramp_name == "mnist1d-ramp-t1-lrnone"
    _, (ramp, _, ramp_name) = _recorded_sweeps(monkeypatch, tmp_path)
    assert ramp.rule is None and ramp_name == "mnist1d-ramp-t1"


def test_target_loss_moves_every_sweep_of_its_one_data_set(monkeypatch, capsys, tmp_path):
    calls = _recorded_sweeps(monkeypatch, tmp_path, "--target-loss", "1.1")
    assert [(settings["target"], name) for _, settings, name in calls] == [
        (1.1, "mnist1d-fixed-loss1.1"), (1.1, "mnist1d-ramp-t1-loss1.1")]  # fmt: skip
    assert batch_ramp.EXPERIMENTS["mnist1d"]["target"] == 1.2  # the table itself is left as it is
    for argv in (["--datasets", "mnist1d,char-lm"], ["--datasets", "mnist1d", "--target-loss", "0"]):
        monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--target-loss", "1.1", *argv])
        with pytest.raises(SystemExit, match="^2$"):
            batch_ramp.main()
        assert "error: invalid --target-loss" in capsys.readouterr().err


def test_a_larger_last_batch_is_the_ramps_maximum_and_max_samples_every_run_s_cap(
    monkeypatch, capsys, tmp_path
):
    """A critical batch above 256 (the char-LM at 2.25) needs ramps that can reach it, and runs at 1024 need more
    than the 60,000-sample cap; both are part of the sweeps' names, so a store never resumes another's."""
    (fixed, settings, fixed_name), (ramp, ramp_settings, ramp_name) = _recorded_sweeps(
        monkeypatch, tmp_path, "--batches", "16,256,1024", "--max-samples", "100000"
    )
    assert ramp.max_batch == 1024 and settings["samples"] == ramp_settings["samples"] == 100_000
    assert fixed_name == "mnist1d-fixed-b16-256-1024-samples100000"
    assert ramp_name == "mnist1d-ramp-t1-max1024-samples100000"
    assert batch_ramp.EXPERIMENTS["mnist1d"]["samples"] == 60_000  # the table itself is left as it is
    monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--max-samples", "0"])
    with pytest.raises(SystemExit, match="^2$"):
        batch_ramp.main()
    assert "error: invalid --max-samples 0: expected a positive sample count" in capsys.readouterr().err


def test_an_unknown_ramp_rule_is_refused_before_any_sweep(monkeypatch, capsys):
    monkeypatch.setattr(batch_ramp, "_sweep", lambda *a, **k: pytest.fail("a sweep ran"))
    monkeypatch.setattr(sys, "argv", ["batch_ramp.py", "--ramp-rule", "cubic"])
    with pytest.raises(SystemExit, match="^2$"):
        batch_ramp.main()
    assert "argument --ramp-rule: invalid choice: 'cubic'" in capsys.readouterr().err
