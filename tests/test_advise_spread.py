"""advise is honest about its own measurements (issue 13, item 6): the goodput gain carries the spread of the
timed steps and B_noise ± 1 standard error, and a switch needs the gain above the threshold across both."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest

from batchlab.advice.goodput import goodput_ratio_range, parse_spread, statistical_efficiency
from batchlab.advice.pipeline import throughput_spread
from batchlab.advice.recommend import recommend
from batchlab.noise import NoiseScaleEstimate
from batchlab.profiling.analysis import INTERVAL_COVERAGE, quantile_interval

INF = float("inf")
# The issue's readings: a 4-layer transformer encoder on this shared 2-core CPU, samples/s at batches 2..128.
ISSUE = {2: 9.0, 4: 11.0, 8: 9.0, 16: 9.0, 32: 8.0, 64: 14.0, 128: 14.0}
# Their own scatter is the machine's noise: around a flat 9.2 for 2..32 they lie -13%..+20% (and profile
# times 3 steps at this speed; 3 steps of a transformer measured here spanned -23%..+155% of their median).
# ±30% per reading is what one reading of this machine is worth.
ISSUE_SPREAD = {b: (v * 0.7, v * 1.3) for b, v in ISSUE.items()}


def _estimate(b_simple: float, stderr: float | None) -> NoiseScaleEstimate:
    return NoiseScaleEstimate(b_simple, stderr, 1.0, None, b_simple, None, 100, 92.0, 12800.0, 0, 0.99, "t")


def test_issue_case_throughput_inside_the_noise_does_not_switch_32():
    """Throughput alone deciding (B_noise inf), the medians say 64 beats 32 by +75% (14 vs 8 samples/s);
    across ±30% readings that is -6%..+225%: not a gain that holds, so 32 is kept -- and said why."""
    rec = recommend(ISSUE, INF, current_batch=32, lr=1e-3, throughput_spread=ISSUE_SPREAD)
    assert rec.best_batch == 64 and rec.gain == pytest.approx(0.75)
    assert not rec.switched and rec.batch_size == 32
    assert rec.gain_range == pytest.approx((14 * 0.7 / (8 * 1.3) - 1, 14 * 1.3 / (8 * 0.7) - 1))
    assert "does not hold above the 5% threshold" in rec.summary()
    # without the spread the same medians switch: what the issue saw
    assert recommend(ISSUE, INF, current_batch=32, lr=1e-3).switched


def test_issue_case_32_to_4_rests_on_the_efficiency_model_not_on_the_readings():
    """The issue's +154% for batch 4 is 11/8 samples/s (noise: see above) times an efficiency ratio of 1.85
    (B_noise ≈ 29). Carrying ±30% readings and B_noise 29 ± 29 (a noisy 100-step estimate), the gain is
    +7%..+1943%: the efficiency term alone -- 4 needs ~half the samples of 32 to the same loss if B_noise is
    ~29-58 (McCandlish et al. 2018) -- keeps it above 5%, so the switch is advised, with the range said.
    Not what the issue expected; the range makes the claim checkable (benchmarks/advise_check.py)."""
    noise = _estimate(29.0, 29.0)
    rec = recommend(ISSUE, noise, current_batch=32, lr=1e-3, throughput_spread=ISSUE_SPREAD)
    assert rec.best_batch == 4 and rec.gain == pytest.approx(11 / 8 * (29 + 32) / (29 + 4) - 1)  # +154%
    low = 11 * 0.7 / (8 * 1.3) * (58 + 32) / (58 + 4) - 1
    high = 11 * 1.3 / (8 * 0.7) * (0 + 32) / (0 + 4) - 1
    assert rec.gain_range == pytest.approx((low, high)) and low == pytest.approx(0.075, abs=1e-3)
    assert rec.switched and rec.batch_size == 4
    # readings a little noisier (±40%) and the same gain no longer holds: 32 is kept
    wide = {b: (v * 0.6, v * 1.4) for b, v in ISSUE.items()}
    assert not recommend(ISSUE, noise, current_batch=32, lr=1e-3, throughput_spread=wide).switched


def test_a_precise_noise_scale_and_tight_timings_still_switch():
    """The same medians measured tightly (±2%, a quiet GPU) and B_noise 29 ± 2: the gain holds, switch to 4."""
    tight = {b: (v * 0.98, v * 1.02) for b, v in ISSUE.items()}
    rec = recommend(ISSUE, _estimate(29.0, 2.0), current_batch=32, lr=1e-3, throughput_spread=tight)
    assert rec.switched and rec.batch_size == 4
    assert rec.gain_range[0] > 0.05
    assert re.search(
        r"switch from 32 to 4: \+\d+% goodput \(\+\d+%\.\.\+\d+% across the spread", rec.summary()
    )


def test_gain_range_is_the_extremes_across_both():
    speeds = ((9.0, 11.0), (7.0, 8.0))
    lo, hi = goodput_ratio_range(speeds, (4, 32), (10.0, 50.0), 32)
    e = [statistical_efficiency(4, n, 32) / statistical_efficiency(32, n, 32) for n in (10.0, 50.0)]
    assert (lo, hi) == pytest.approx((9 / 8 * min(e), 11 / 7 * max(e)))


def test_parse_spread_checks_its_input():
    curve = ((2, 10.0), (4, 20.0))
    assert parse_spread({4: (15.0, 25.0)}, curve) == (((2, 10.0), (4, 15.0)), ((2, 10.0), (4, 25.0)))
    assert parse_spread(None, curve) is None
    with pytest.raises(ValueError, match=re.escape("does not contain the reading 20 samples/s")):
        parse_spread({4: (21.0, 25.0)}, curve)
    with pytest.raises(
        ValueError, match="throughput_spread has batch size 8, which the throughput curve does not"
    ):
        parse_spread({8: (1.0, 2.0)}, curve)
    with pytest.raises(ValueError, match=re.escape("throughput_spread[4] must be (low, high) samples/s")):
        parse_spread({4: 20.0}, curve)


def test_throughput_spread_is_the_range_of_the_timed_steps():
    point = SimpleNamespace(
        batch_size=8, fits=True, step_times=(0.1, 0.2, 0.125), step_seconds=0.125, samples_per_second=128.0
    )  # 8 samples x 2 accumulation steps per step
    other = SimpleNamespace(
        batch_size=16, fits=False, step_times=(), step_seconds=None, samples_per_second=None
    )
    assert throughput_spread([point, other]) == {8: pytest.approx((80.0, 160.0))}


@pytest.mark.parametrize(
    ("n", "ends"),
    [(1, (1, 1)), (3, (1, 3)), (5, (1, 5)), (6, (2, 5)), (10, (3, 8)), (30, (12, 19))],
)
def test_quantile_interval_of_the_median_is_the_order_statistics_that_cover_68_percent(n, ends):
    """(x_(k), x_(n+1-k)) with k the largest whose coverage 1 - 2 P(Binomial(n, 1/2) <= k - 1) is >= 68.27%:
    the full range up to 5 values (3: 75%, 5: 94%), 30 values (profile's most) -> the 12th..19th (80%)."""
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    assert quantile_interval(values, 0.5) == ends
    k = ends[0]
    coverage = [1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n for j in (k, k + 1)]
    assert coverage[1] < INTERVAL_COVERAGE  # one step narrower would cover too little
    assert coverage[0] >= INTERVAL_COVERAGE or k == 1  # below 3 values not even the full range covers 68%


def test_quantile_interval_of_the_median_rejects_bad_input():
    with pytest.raises(ValueError, match="quantile_interval needs at least one value"):
        quantile_interval([], 0.5)
    with pytest.raises(ValueError, match="coverage"):
        quantile_interval([1.0, 2.0], 0.5, coverage=1.0)
    with pytest.raises(ValueError, match="step time"):
        quantile_interval([1.0, float("nan")], 0.5)


def _point(batch: int, median: float, slow: float, n: int = 30) -> SimpleNamespace:
    """A profile point of ``n`` timed steps within ±2% of ``median`` seconds, one of them at ``slow``."""
    times = tuple(median * (1 + 0.02 * (i - n // 2) / (n // 2)) for i in range(n - 1)) + (slow,)
    return SimpleNamespace(
        batch_size=batch, fits=True, step_times=times, step_seconds=median, samples_per_second=batch / median
    )


def test_one_slow_step_among_30_does_not_hide_a_real_difference():
    """Digits in benchmarks/advise_check.py: 30 timed steps per size, 128 three times the samples/s of 32, and a
    step a busy neighbour slowed 10x. The median's interval stays within ~2% and the switch to 128 holds; the
    timed steps' full range (what the spread was before) reached 10x and kept 32."""
    points = [_point(32, 0.002, 0.02), _point(128, 0.0026, 0.026)]
    spread = throughput_spread(points)
    for p in points:
        low, high = spread[p.batch_size]
        assert p.samples_per_second / 1.03 < low < p.samples_per_second < high < p.samples_per_second * 1.03
    curve = {p.batch_size: p.samples_per_second for p in points}
    noise = _estimate(61.0, 11.0)
    rec = recommend(curve, noise, current_batch=32, lr=1e-3, throughput_spread=spread)
    assert rec.switched and rec.batch_size == 128 and rec.gain_range[0] > 0.05
    full = {
        p.batch_size: (p.batch_size / max(p.step_times), p.batch_size / min(p.step_times)) for p in points
    }
    assert not recommend(curve, noise, current_batch=32, lr=1e-3, throughput_spread=full).switched
