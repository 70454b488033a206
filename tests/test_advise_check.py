"""benchmarks/advise_check.py (issue 13 item 6): advise's batch and LR trained against every fixed batch.

The comparison's arithmetic on made-up numbers (no timing), the recommendation applied to the optimizer, and
the script's ``--quick`` run end to end (~5 s: advise on digits, three short runs through batchlab.sweep)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import advise_check  # noqa: E402
from batchlab.workloads.tasks import Task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(seconds: float | None, steps: float = 10.0, samples: float = 320.0) -> dict:
    return {"seconds_to_target": seconds, "steps_to_target": steps, "samples_to_target": samples}


def test_summarise_means_over_seeds_only_when_every_seed_reached():
    s = advise_check.summarise([_run(1.0, 10, 320), _run(3.0, 20, 640)], seeds=2)
    assert (s["seconds_to_target"], s["steps_to_target"], s["samples_to_target"]) == (2.0, 15.0, 480.0)
    assert s["seconds_range"] == [1.0, 3.0] and s["reached"] == 2
    missed = advise_check.summarise([_run(1.0), _run(None)], seeds=2)
    assert (
        missed["seconds_to_target"] is None
        and missed["reached"] == 1
        and missed["seconds_range"] == [1.0, 1.0]
    )


def test_compare_against_the_fastest_fixed_configuration_with_and_without_advise_s_measuring():
    fixed = {
        (32, 1.0): {"seconds_to_target": 4.0},
        (128, 1.0): {"seconds_to_target": 2.0},
        (128, 0.5): {"seconds_to_target": 2.5},
        (256, 1.0): {"seconds_to_target": None},  # a seed missed the target: never the best
    }
    out = advise_check.compare(fixed, {"seconds_to_target": 2.1}, advice_seconds=3.0, current=(32, 1.0))
    assert out["best_fixed"] == [128, 1.0]
    assert out["ratio"] == pytest.approx(1.05) and out["goal"]
    assert out["ratio_with_advise"] == pytest.approx(5.1 / 2.0) and not out["goal_with_advise"]
    assert out["vs_current"] == pytest.approx(2.1 / 4.0)
    slow = advise_check.compare(fixed, {"seconds_to_target": 2.3}, advice_seconds=0.0, current=(32, 1.0))
    assert slow["ratio"] == pytest.approx(1.15) and not slow["goal"]
    never = advise_check.compare(fixed, {"seconds_to_target": None}, advice_seconds=0.0, current=(32, 1.0))
    assert never["ratio"] is None and not never["goal"] and not never["goal_with_advise"]


def _fixed(batch: int, seed: int, seconds: float | None) -> dict:
    return {"kind": "fixed", "batch": batch, "lr_multiplier": 1.0, "seed": seed, "seconds_to_target": seconds}


def test_the_held_out_best_is_tuned_on_the_other_seeds_and_scored_on_the_one_left_out():
    """Batch 64 wins in sample on seed 2's lucky 0.4; held out, each seed is scored with the other seeds' pick."""
    runs = [_fixed(32, s, t) for s, t in enumerate((3.0, 3.0, 3.0))]
    runs += [_fixed(64, s, t) for s, t in enumerate((4.0, 4.0, 0.4))]
    fixed = {(b, 1.0): advise_check.summarise([r for r in runs if r["batch"] == b], 3) for b in (32, 64)}
    assert advise_check.compare(fixed, {"seconds_to_target": 3.0}, 0.0, (32, 1.0))["best_fixed"] == [64, 1.0]
    held = advise_check.held_out_best(runs, "seconds_to_target", seeds=3)
    # seed 0: 64 has 2.2 on seeds 1-2 against 32's 3.0, so 64, scored 4.0; seed 1 likewise 4.0; seed 2: 32, 3.0
    assert held["picks"] == [[64, 1.0], [64, 1.0], [32, 1.0]]
    assert held["seconds"] == pytest.approx((4.0 + 4.0 + 3.0) / 3)
    assert advise_check.held_out_best(runs, "seconds_to_target", seeds=1) is None
    # a pick that missed the target on the seed left out: the tuned batch would not have got there
    missed = [_fixed(32, 0, 3.0), _fixed(32, 1, None), _fixed(64, 0, 5.0), _fixed(64, 1, 5.0)]
    assert advise_check.held_out_best(missed, "seconds_to_target", seeds=2) is None


def test_advise_measures_the_noise_scale_on_the_same_batches_whatever_the_global_rng():
    """The tasks' make_batch draws from the global RNG, which torch seeds at random per process: the check seeds
    it per seed, so B_noise repeats between runs, and leaves the caller's stream as it was."""
    readings = []
    for state in (1, 2):
        torch.manual_seed(state)
        before = torch.get_rng_state()
        out = advise_check.measure_advice("mlp-digits", 0, dict(advise_check.QUICK["advise"]), None)
        assert torch.equal(torch.get_rng_state(), before)
        readings.append((out["b_noise"], out["b_noise_stderr"]))
    assert readings[0] == readings[1]


def test_modelled_seconds_price_samples_at_the_pooled_samples_per_second_of_the_batch():
    """A step costs what its batch costs: the median samples/s of every fixed run at that batch (advise's own
    runs excluded), log-log between fixed batches; outside them, or with accumulation, the run's own."""

    def run(kind, batch, speed, samples=None, accumulation=1):
        return {"kind": kind, "batch": batch, "throughput": speed, "accumulation": accumulation,
                "samples_to_target": samples}  # fmt: skip

    runs = [run("fixed", 32, s) for s in (1000.0, 4000.0, 1100.0)] + [run("fixed", 128, 4000.0)]
    runs.append(run("advised", 32, 1.0))  # never pooled
    speeds = advise_check.pooled_speeds(runs)
    assert speeds == {32: 1100.0, 128: 4000.0}
    assert advise_check.modelled_seconds(run("advised", 32, 50.0, samples=2200), speeds) == pytest.approx(2.0)
    between = 1100.0 * (4000.0 / 1100.0) ** 0.5  # 64 lies halfway between 32 and 128 in log(batch)
    assert advise_check.modelled_seconds(run("fixed", 64, 1.0, samples=between), speeds) == pytest.approx(1.0)
    assert advise_check.modelled_seconds(run("advised", 512, 800.0, samples=1600), speeds) == pytest.approx(
        2.0
    )
    assert advise_check.modelled_seconds(run("advised", 64, 500.0, 1000, accumulation=2), speeds) == 2.0
    assert advise_check.modelled_seconds(run("fixed", 32, 1000.0), speeds) is None  # never reached


def test_the_advised_run_carries_advise_s_betas_and_eps():
    run = advise_check.Advised(Task("teacher-student", noise_every=0), (0.6, 0.996), 5e-9)(32, 2e-3, 0)
    group = run.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.6, 0.996), 5e-9)


def test_quick_run_end_to_end(tmp_path, capsys):
    """advise on digits, then its recommendation and two fixed batches trained to the target, one JSON."""
    out = tmp_path / "advise_check.json"
    advise_check.main(["--quick", "--rounds", "4", "--one-window", "--directory", str(tmp_path / "store"),
                       "--out", str(out)])  # fmt: skip
    payload = json.loads(out.read_text())
    (result,) = payload["results"]
    (advice,) = result["advice"]
    advised = [r for r in result["runs"] if r["kind"] == "advised"]
    assert [(r["batch"], r["lr"]) for r in advised] == [(advice["batch"], pytest.approx(advice["lr"]))]
    assert sorted(r["batch"] for r in result["runs"] if r["kind"] == "fixed") == [32, 128]
    assert advice["seconds"] > 0 and result["best_fixed"] is not None and result["ratio"] is not None
    assert (
        result["modelled"]["ratio"] is not None and "full_range" in advice and "what-if" in result["variants"]
    )
    # on the CPU advise reads the 10th percentile; the median reading (advise before) is trained beside it
    assert advice["step_quantile"] == 0.1 and "median" in advice and "median" in result["variants"]
    assert advice["betas_kept"]["betas"] == [0.9, 0.999] and "betas-kept" in result["variants"]
    # --rounds 4: the profile times the sizes in 4 interleaved rounds; --one-window adds advise with rounds=1
    assert advice["rounds"] == 4 and "pooled over 4 interleaved rounds" in advice["throughput_detail"]
    assert advice["one_window"]["rounds"] == 1 and "one-window" in result["variants"]
    assert set(advice["reading_ms"]) == set(advice["throughput"])
    assert "advise / best fixed" in capsys.readouterr().out
    assert result["held_out"]["modelled_seconds"]["picks"] is None  # one seed: nothing to hold out
    # the packages behind the numbers, so a shift between runs of the same code can be traced to them
    assert payload["versions"]["torch"] == torch.__version__ and payload["versions"]["numpy"] is not None
    assert payload["pin_drift"] == []  # make install put constraints.txt's versions in


def test_quick_run_with_branch_trains_what_advise_branch_recommends(tmp_path):
    """--branch: the critical batch branched from the seed's model, the same readings recommended on again with
    it (what `batchlab advise --branch` prints), and that recommendation trained in the round."""
    out = tmp_path / "advise_check.json"
    advise_check.main(["--quick", "--what-if", "0", "--branch", "16,32,64", "--directory", str(tmp_path / "store"),
                       "--out", str(out)])  # fmt: skip
    (result,) = json.loads(out.read_text())["results"]
    (advice,) = result["advice"]
    branched = advice["branched"]
    assert (
        branched["b_crit"] > 0
        and branched["b_noise"] == branched["b_crit"]
        and branched["b_noise_stderr"] is None
    )
    assert [row[0] for row in branched["rows"]] == [16, 32, 64] and branched["samples_spent"] > 0
    assert branched["b_crit"] != advice["b_noise"]  # B_simple is the other estimate, still advise's own row
    (run,) = [r for r in result["runs"] if r["kind"] == "branched"]
    assert (run["batch"], run["lr"]) == (branched["batch"], pytest.approx(branched["lr"]))
    mine = result["variants"]["branched"]
    assert mine["ratio"] is not None and mine["ratio_with_advise"] > mine["ratio"]


def test_branch_sizes_are_checked_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        advise_check.main(["--quick", "--branch", "16,32", "--out", str(tmp_path / "x.json")])
    assert (
        "--branch '16,32': batch_sizes [16, 32]: fitting B_crit needs at least 3" in capsys.readouterr().err
    )
    assert not (tmp_path / "x.json").exists()


def test_an_unknown_data_set_is_refused_in_one_line_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        advise_check.main(["--datasets", "mlp-digits,digits", "--out", str(tmp_path / "x.json")])
    assert "--datasets: unknown 'digits'; choose from mlp-digits, mnist1d, char-lm" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_paired_differences_are_seed_by_seed_over_the_reference_mean():
    def run(kind, seed, seconds):
        return {"kind": kind, "seed": seed, "modelled_seconds": seconds}

    runs = [run("advised", 0, 2.0), run("advised", 1, 2.0), run("advised", 2, 2.0), run("advised", 3, 2.0)]
    runs += [
        run("branched", 0, 1.0),
        run("branched", 1, 2.0),
        run("branched", 2, 1.0),
        run("branched", 3, None),
    ]
    p = advise_check.paired(runs, "branched", "advised")
    assert p["seeds"] == 3 and (p["faster"], p["slower"], p["same"]) == (2, 0, 1)  # seed 3 did not reach
    assert p["mean"] == pytest.approx(-1 / 3) and p["interval"][0] == pytest.approx(-0.5)
    assert p["interval"][0] <= p["mean"] <= p["interval"][1] <= 0.0
    assert advise_check.paired(runs[:1] + runs[4:5], "branched", "advised") is None  # one seed: no spread
