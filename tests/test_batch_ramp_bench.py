"""benchmarks/batch_ramp.py's scoring (issue 13 item 3): the two goals and the per-multiplier means.

The table keeps the step-optimal multiplier only; ``_per_multiplier`` reports every one, and a multiplier where a
seed missed the target has no mean (an average over the seeds that reached would flatter it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import batch_ramp  # noqa: E402


def _run(multiplier, steps, samples):
    reached = steps is not None
    return SimpleNamespace(lr_multiplier=multiplier, target_reached=reached, steps_to_target=steps,
                           samples_to_target=samples)  # fmt: skip


def test_per_multiplier_means_each_multiplier_and_drops_one_a_seed_missed():
    result = SimpleNamespace(runs=[_run(1.0, 500, 20_000), _run(0.5, 700, 16_000), _run(1.0, 600, 21_000),
                                   _run(0.5, 900, 18_000), _run(2.0, 300, 30_000), _run(2.0, None, None)])  # fmt: skip
    rows = batch_ramp._per_multiplier(result)
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
