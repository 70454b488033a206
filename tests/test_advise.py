"""batchlab.advice: efficiency and goodput math, the argmax on synthetic curves, the 5% rule, plans, errors.

The recommendation is :func:`batchlab.advice.recommend` (pure: a curve and a noise scale in); the pipeline that
measures both on a workload, :func:`batchlab.advise`, is tested against the CLI in test_cli_advise.py."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab.advice.goodput import (
    CANDIDATES,
    candidate_batch_sizes,
    doubling_step_reduction,
    goodput,
    interpolate_throughput,
    statistical_efficiency,
    steps_factor,
)
from batchlab.advice.recommend import recommend
from batchlab.noise import NoiseScaleEstimate
from batchlab.profiling.analysis import knee_batch_size

INF, NAN = float("inf"), float("nan")
POWERS = [2**i for i in range(13)]  # 1 .. 4096


def saturating(k: float, peak: float = 10_000.0, sizes=POWERS) -> dict[int, float]:
    """samples/s = peak * b / (b + k): fixed per-step cost, then saturation (Amdahl-like)."""
    return {b: peak * b / (b + k) for b in sizes}


def estimate(b_simple, stderr=None, note="test") -> NoiseScaleEstimate:
    return NoiseScaleEstimate(b_simple, stderr, 1.0, None, b_simple, None, 50, 40.0, 3200.0, 0, 0.99, note)


# ---------------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize(
    ("batch", "noise", "base", "expected"),
    [
        (32, 100, 32, 1.0),  # the base batch is the reference
        (64, 100, 32, 132 / 164),
        (16, 100, 32, 132 / 116),  # smaller than B0: more progress per sample
        (1000, 100, 32, 132 / 1100),
        (64, INF, 32, 1.0),  # noise dominates: every sample counts fully
        (64, 0, 32, 0.5),  # no noise: B0/B
        (7.5, 2.5, 2.5, 0.5),  # non-integer sizes are fine
    ],
)
def test_statistical_efficiency(batch, noise, base, expected):
    assert statistical_efficiency(batch, noise, base) == pytest.approx(expected, rel=1e-12)


def test_goodput_is_throughput_times_efficiency():
    assert goodput(1000.0, 64, 100, 32) == pytest.approx(1000 * 132 / 164)
    assert goodput(1000.0, 64, INF, 32) == 1000.0


@pytest.mark.parametrize(
    ("batch", "noise", "steps", "doubling"),
    [
        (100, 100, 2.0, 4 / 3),  # at the critical batch: S = 2 S_min, a doubling buys 1.33x
        (10, 1000, 101.0, 2020 / 1020),  # far below: nearly 2x
        (1e6, 1, 1 + 1e-6, (2e6 + 2) / (2e6 + 1)),  # far above: nearly nothing
        (64, 0, 1.0, 1.0),
        (64, INF, INF, 2.0),
    ],
)
def test_steps_factor_and_doubling(batch, noise, steps, doubling):
    assert steps_factor(batch, noise) == pytest.approx(steps, rel=1e-12)
    assert doubling_step_reduction(batch, noise) == pytest.approx(doubling, rel=1e-12)


def test_interpolation_is_exact_at_points_and_log_linear_between():
    curve = {2: 100.0, 8: 1600.0, 32: 3200.0}
    assert interpolate_throughput(curve, 8) == 1600.0
    assert interpolate_throughput(curve, 4) == pytest.approx(400.0)  # a power law b² between 2 and 8
    assert interpolate_throughput(curve, 16) == pytest.approx(1600 * 2**0.5)
    assert interpolate_throughput([(5, 42.0)], 5) == 42.0  # a single point
    for outside in (1, 33):
        with pytest.raises(
            ValueError, match=f"batch {outside} is outside the measured throughput range 2..32"
        ):
            interpolate_throughput(curve, outside)


@pytest.mark.parametrize(
    ("curve", "knee"),
    [
        ({1: 10, 2: 20, 4: 40}, 4),  # still rising
        ({1: 10, 2: 96, 4: 100, 8: 99}, 2),  # 96 >= 0.95 x 100
        ({1: 10, 2: 94, 4: 100}, 4),
        ([(16, 5.0)], 16),
    ],
)
def test_throughput_knee(curve, knee):
    """The recommendation's knee is the project's one (batchlab.profiling.analysis.knee_batch_size)."""
    current = min(dict(curve))
    assert recommend(curve, INF, current_batch=current, lr=1e-3).knee_batch == knee


def test_candidate_batch_sizes_are_geometric_and_include_the_ends():
    sizes = candidate_batch_sizes(2, 4096)
    assert sizes[0] == 2 and sizes[-1] == 4096 and sizes == sorted(set(sizes))
    assert CANDIDATES - 5 <= len(sizes) <= CANDIDATES  # rounding merges a few of the smallest
    ratios = [b / a for a, b in zip(sizes[20:], sizes[21:])]
    assert max(ratios) / min(ratios) < 1.1  # evenly spaced in log once rounding no longer matters
    assert candidate_batch_sizes(1, 5) == [1, 2, 3, 4, 5]  # small ranges: every integer, no duplicates
    assert candidate_batch_sizes(7, 7) == [7]


# ------------------------------------------------------------------------------- argmax on synthetic curves


@pytest.mark.parametrize(
    ("k", "noise"),
    [(64, 256), (16, 1024), (100, 100), (256, 64), (8, 8)],
)
def test_goodput_peaks_where_the_calculus_says(k, noise):
    # samples/s ∝ b/(b + k) and efficiency ∝ 1/(B_noise + b): goodput ∝ b/((b + k)(b + B_noise)),
    # maximal at b* = sqrt(k B_noise). The curve is measured at powers of two and interpolated in log-log.
    rec = recommend(saturating(k), noise, current_batch=1, lr=1e-3)
    expected = math.sqrt(k * noise)

    def exact(b):
        return b / ((b + k) * (b + noise))

    assert rec.best_batch == pytest.approx(expected, rel=0.2)
    assert exact(rec.best_batch) >= 0.99 * exact(expected)  # the peak is flat: within 1% of the true optimum
    assert rec.best_batch == max(rec.candidates, key=lambda c: c.goodput).batch_size


def test_perfect_scaling_picks_the_largest_and_flat_throughput_the_smallest():
    linear = {
        b: 10.0 * b for b in POWERS
    }  # throughput doubles with the batch: every size costs the same time
    assert recommend(linear, 300, current_batch=1, lr=1e-3).best_batch == 4096
    flat = {b: 5000.0 for b in POWERS}  # throughput never grows: smaller batches waste nothing
    assert recommend(flat, 300, current_batch=64, lr=1e-3).best_batch == 1


def test_infinite_noise_lets_throughput_decide_and_ties_go_to_the_smaller_batch():
    curve = {1: 10.0, 2: 30.0, 4: 50.0, 8: 50.0, 16: 40.0}
    rec = recommend(curve, INF, current_batch=1, lr=1e-3)
    assert rec.best_batch == 4  # 4 and 8 both give 50 samples/s: the smaller wins
    assert "throughput alone decides" in rec.summary()


def test_best_batch_does_not_depend_on_base_batch_but_lr_does():
    curve = saturating(32)
    a = recommend(curve, 200, current_batch=16, lr=1e-3, base_batch=16)
    b = recommend(curve, 200, current_batch=16, lr=1e-3, base_batch=256)
    assert a.best_batch == b.best_batch and a.batch_size == b.batch_size
    assert [c.relative_goodput for c in a.candidates] == pytest.approx(
        [c.relative_goodput for c in b.candidates]
    )
    assert a.lr.lr == pytest.approx(1e-3 * math.sqrt(a.batch_size / 16))
    assert b.lr.lr == pytest.approx(1e-3 * math.sqrt(b.batch_size / 256))


# ----------------------------------------------------------------------------------------- the 5% rule


def test_switches_when_the_gain_is_above_the_threshold_and_says_so():
    rec = recommend(saturating(64), 256, current_batch=8, lr=1e-3)
    assert rec.switched and rec.batch_size == rec.best_batch != 8
    assert rec.gain > 0.05
    assert rec.candidate(rec.batch_size).relative_goodput == pytest.approx(1 + rec.gain)
    assert re.search(r"switch from 8 to \d+: \+\d+% goodput, above the 5% threshold", rec.summary())


def test_keeps_the_current_batch_when_the_gain_is_small_and_says_so():
    curve = saturating(64)
    best = recommend(curve, 256, current_batch=8, lr=1e-3).best_batch  # 128
    near = 96  # within a few percent of the peak's goodput
    rec = recommend(curve, 256, current_batch=near, lr=1e-3)
    assert rec.best_batch == best and 0 < rec.gain <= 0.05
    assert not rec.switched and rec.batch_size == near and rec.lr.lr == pytest.approx(1e-3)
    assert f"keep batch {near}: the best, {best}, gains only +" in rec.summary()
    assert "not above the 5% threshold" in rec.summary()
    # the same gain with a lower threshold switches; an exact tie never does
    assert recommend(curve, 256, current_batch=near, lr=1e-3, gain_threshold=0.0).batch_size == best
    same = recommend(curve, 256, current_batch=best, lr=1e-3, gain_threshold=0.0)
    assert not same.switched and same.gain == 0 and "it already has the most goodput" in same.summary()


# --------------------------------------------------------------------- plans: accumulation and world size


def test_current_batch_beyond_what_fits_runs_as_accumulation():
    curve = {b: 5000.0 * min(b, 512) / 512 for b in (64, 128, 256, 512, 1024)}
    # noise dominates, so 2048 (4 x 512 accumulated) has the same goodput as 512: no gain, keep 2048
    rec = recommend(curve, INF, current_batch=2048, lr=0.1, rule="linear", max_micro_batch=512)
    assert not rec.switched and rec.best_batch == 512
    assert (rec.batch_size, rec.micro_batch, rec.accumulation_steps) == (2048, 512, 4)
    assert rec.plan.exact and rec.max_micro_batch == 512
    assert (
        "2048 does not fit in one step" in rec.summary()
        and "accumulation buys no throughput" in rec.summary()
    )
    # no candidate runs a micro batch above what fits, even though 1024 was measured
    assert max(c.micro_batch for c in rec.candidates) == 512
    assert {c.source for c in rec.candidates if c.batch_size > 512} == {"accumulation"}


def test_accumulation_never_beats_the_largest_single_step_with_finite_noise():
    rec = recommend(saturating(16, sizes=(8, 64, 256)), 5000, current_batch=8, lr=1e-3, max_micro_batch=256)
    single = rec.candidate(256)
    for c in rec.candidates:
        if c.accumulation_steps > 1:
            assert c.samples_per_second == single.samples_per_second and c.goodput < single.goodput


def test_world_size_multiplies_throughput_and_the_plan():
    curve = saturating(32, sizes=(8, 32, 128, 512))
    rec = recommend(curve, INF, current_batch=4096, lr=0.1, max_micro_batch=512, world_size=4)
    assert (rec.micro_batch, rec.accumulation_steps, rec.world_size) == (512, 2, 4)
    assert rec.candidate(2048).samples_per_second == pytest.approx(4 * curve[512])
    assert any("ignores the all-reduce" in n for n in rec.notes)


def test_a_falling_curve_is_flagged_not_hidden():
    rec = recommend({2: 100.0, 4: 200.0, 8: 120.0, 16: 400.0}, 50, current_batch=2, lr=1e-3)
    assert any("throughput falls with the batch at 4 -> 8 (-40%)" in n for n in rec.notes)
    assert not any("falls" in n for n in recommend(saturating(8), 50, current_batch=2, lr=1e-3).notes)


def test_the_curve_is_never_extrapolated():
    rec = recommend({16: 100.0, 64: 300.0}, 100, current_batch=16, lr=1e-3, max_micro_batch=1000)
    assert min(c.micro_batch for c in rec.candidates) == 16 and rec.max_micro_batch == 64
    assert any("not extrapolated" in n for n in rec.notes)


# ------------------------------------------------------------------------------------- lr and schedule


def test_linear_rule_warmup_and_schedule():
    rec = recommend(
        saturating(64), 256, current_batch=8, lr=0.1, rule="linear", dataset_size=50_000, epochs=10
    )
    b = rec.batch_size
    assert rec.lr.lr == pytest.approx(0.1 * b / 8) and rec.lr.warmup_epochs == 5
    assert rec.schedule.steps_per_epoch == math.ceil(
        50_000 / b
    ) and rec.schedule.total_steps == 10 * math.ceil(50_000 / b)
    assert rec.warmup_steps == 5 * rec.schedule.steps_per_epoch
    assert rec.current_schedule.steps_per_epoch == 6250
    assert f"{rec.schedule.steps_per_epoch} optimizer steps per epoch x 10 epochs" in rec.summary()


def test_sqrt_rule_maps_adam_betas_and_one_epoch_without_epochs():
    rec = recommend(
        saturating(64), 256, current_batch=32, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, dataset_size=1000
    )
    k = rec.batch_size / 32
    assert rec.lr.betas == pytest.approx((1 - k * 0.1, 1 - k * 0.001))
    assert rec.lr.eps == pytest.approx(1e-8 / math.sqrt(k))
    assert rec.schedule.epochs == 1 and rec.warmup_steps is None


def test_advice_past_the_sde_bound_keeps_beta1_and_the_explanation_says_so():
    """Throughput alone deciding (B_noise inf) on a curve rising to 1024: 32 -> 1024 is k = 32, where the SDE rule
    would map beta1 0.9 to 0 (advise_check run 4: that run never reached the target). beta1 is kept, and the LR
    line says so; a change to 128 (k = 4) maps both betas as before."""
    curve = {b: float(b) for b in (32, 64, 128, 256, 512, 1024)}
    rec = recommend(curve, INF, current_batch=32, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    assert rec.batch_size == 1024 and rec.lr.betas == pytest.approx((0.9, 0.968))
    assert (
        "betas (0.9, 0.968) (beta1 kept: k(1 - beta1) = 3.2 is past 0.5, the bound of the SDE rule's "
        "small-k(1 - beta) regime: re-tune it or cap the change)" in rec.summary()
    )
    small = recommend({b: v for b, v in curve.items() if b <= 128}, INF, current_batch=32, lr=1e-3,
                      betas=(0.9, 0.999))  # fmt: skip
    assert small.batch_size == 128 and small.lr.betas == pytest.approx((0.6, 0.996))
    assert "kept" not in small.summary()


def test_dataset_size_caps_the_candidates():
    rec = recommend(saturating(8), INF, current_batch=16, lr=1e-3, dataset_size=300)
    assert max(c.batch_size for c in rec.candidates) <= 300


def test_estimate_input_gives_a_range_and_json():
    rec = recommend(saturating(64), estimate(256.0, 200.0), current_batch=8, lr=1e-3)
    lo, hi = rec.best_batch_range
    assert lo <= rec.best_batch <= hi and lo < hi
    assert rec.noise_scale == 256.0 and rec.noise_scale_stderr == 200.0
    data = json.loads(json.dumps(rec.to_dict(), allow_nan=False))
    assert data["batch_size"] == rec.batch_size and len(data["candidates"]) == len(rec.candidates)
    assert data["lr"]["rule"] == "sqrt" and data["explanation"] == list(rec.explanation)
    inf = recommend(saturating(64), INF, current_batch=8, lr=1e-3).to_dict()
    assert inf["noise_scale"] is None
    json.dumps(inf, allow_nan=False)  # no inf anywhere (steps factors included)


@settings(max_examples=40, deadline=None)
@given(
    speeds=st.lists(st.floats(1.0, 1e5), min_size=1, max_size=8),
    noise=st.one_of(st.floats(0.0, 1e5), st.just(INF)),
    current_index=st.integers(0, 7),
    threshold=st.floats(0.0, 0.5),
)
def test_recommendation_invariants(speeds, noise, current_index, threshold):
    curve = {2**i: s for i, s in enumerate(speeds)}
    current = 2 ** min(current_index, len(speeds) - 1)
    rec = recommend(curve, noise, current_batch=current, lr=1.0, gain_threshold=threshold)
    best = max(c.goodput for c in rec.candidates)
    assert rec.candidate(rec.best_batch).goodput == pytest.approx(best)
    assert rec.switched == (rec.gain > threshold and rec.best_batch != current)
    assert rec.batch_size == (rec.best_batch if rec.switched else current)
    assert all(1 <= c.micro_batch <= max(curve) for c in rec.candidates)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("throughput", "noise", "kwargs", "message"),
    [
        ({}, 10, {}, "throughput is empty"),
        ("fast", 10, {}, "throughput must be {batch_size: samples_per_second}"),
        ([(8, 1.0, 2)], 10, {}, "got the item (8, 1.0, 2)"),
        ({0: 10.0}, 10, {}, "invalid throughput batch size 0: expected an int >= 1"),
        ({True: 10.0}, 10, {}, "invalid throughput batch size True: expected an int >= 1"),
        ({8: -1.0}, 10, {}, "invalid throughput[8] -1.0: expected a number > 0 (samples/s)"),
        ({8: NAN}, 10, {}, "invalid throughput[8] nan: expected a number > 0 (samples/s)"),
        ([(8, 1.0), (8, 2.0)], 10, {}, "throughput lists batch size 8 twice"),
        ({8: 1.0}, None, {}, "noise_scale is required"),
        ({8: 1.0}, -1, {}, "invalid noise_scale -1: expected a number >= 0 or inf (B_noise"),
        ({8: 1.0}, NAN, {}, "invalid noise_scale nan: expected a number >= 0"),
        ({8: 1.0}, "big", {}, "invalid noise_scale 'big': expected a number >= 0"),
        (
            {8: 1.0},
            estimate(None, note="|G|² EMA is -0.1 <= 0"),
            {},
            "has no B_simple: |G|² EMA is -0.1 <= 0",
        ),
        ({8: 1.0}, 10, {"current_batch": 0}, "invalid current_batch 0: expected an int >= 1"),
        ({8: 1.0}, 10, {"lr": 0}, "invalid lr 0: expected a number > 0"),
        (
            {8: 1.0},
            10,
            {"rule": "cubic"},
            "invalid rule 'cubic': expected one of 'linear', 'sqrt', 'adascale', 'none'",
        ),
        ({8: 1.0}, 10, {"base_batch": 2.5}, "invalid base_batch 2.5: expected an int >= 1"),
        ({8: 1.0}, 10, {"world_size": 0}, "invalid world_size 0: expected an int >= 1"),
        (
            {8: 1.0, 16: 2.0},
            10,
            {"max_micro_batch": 4},
            "max_micro_batch 4 is below the smallest measured batch 8",
        ),
        ({8: 1.0}, 10, {"epochs": 3}, "epochs needs dataset_size"),
        ({8: 1.0}, 10, {"dataset_size": 4}, "dataset_size 4 is smaller than the smallest measured batch 8"),
        (
            {8: 1.0},
            10,
            {"current_batch": 100, "dataset_size": 50},
            "current_batch 100 is larger than the dataset",
        ),
        ({8: 1.0}, 10, {"gain_threshold": -0.1}, "invalid gain_threshold -0.1: expected a number >= 0"),
        ({8: 1.0}, 10, {"current_batch": 4}, "below the smallest measured batch 8; measure throughput there"),
        ({8: 1.0}, 10, {"betas": (0.9, 1.5)}, "beta2 must be a number in [0, 1)"),
    ],
)
def test_bad_inputs_raise_clear_errors(throughput, noise, kwargs, message):
    args = {"current_batch": 8, "lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        recommend(throughput, noise, **args)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: statistical_efficiency(0, 10, 32), "invalid batch_size 0: expected a number > 0"),
        (lambda: statistical_efficiency(8, 10, INF), "invalid base_batch inf: expected a number > 0"),
        (lambda: statistical_efficiency(8, -1, 32), "invalid noise_scale -1: expected a number >= 0"),
        (lambda: goodput(-5.0, 8, 10, 32), "invalid samples_per_second -5.0: expected a number > 0"),
        (lambda: steps_factor(-1, 10), "invalid batch_size -1: expected a number > 0"),
        (lambda: knee_batch_size([1], [1.0], 0), "invalid threshold 0: expected a number in (0, 1]"),
        (lambda: candidate_batch_sizes(8, 4), "largest must be >= smallest"),
    ],
)
def test_building_blocks_reject_bad_inputs(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
