"""advise reads CPU step times at a low quantile (issue 13, item 6): interference only adds time, so the 10th
percentile of a size's timed steps follows its compute; its distribution-free order-statistic interval is the
spread the goodput gain carries. The median stays on other devices."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import batchlab
from batchlab.advice.pipeline import (
    CPU_STEP_QUANTILE,
    step_quantile,
    throughput_curve,
    throughput_spread,
)
from batchlab.advice.recommend import recommend
from batchlab.noise import NoiseScaleEstimate
from batchlab.profiling import api as profiling_api
from batchlab.profiling.analysis import (
    INTERVAL_COVERAGE,
    quantile_interval,
    sample_quantile,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _cdf(n: int, q: float, j: int) -> float:
    """P(Binomial(n, q) <= j); 0 below 0."""
    return sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(j + 1)) if j >= 0 else 0.0


@pytest.mark.parametrize(
    ("n", "ends"),
    [(1, (1, 1)), (3, (1, 2)), (10, (1, 3)), (17, (1, 4)), (18, (1, 4)), (30, (1, 6)), (100, (7, 14))],
)
def test_quantile_interval_of_the_10th_percentile_is_conovers_order_statistics(n, ends):
    """(x_(r), x_(s)) with Y ~ Binomial(n, 0.1): r - 1 the largest j with P(Y <= j) <= 15.87%, s - 1 the
    smallest with P(Y <= j) >= 84.13% (Conover 1999 sec. 3.2), each end clamped to the sample. Checked against
    the binomial directly: each tail is within its half, and moving an end inward would break that."""
    values = [float(v) for v in range(n, 0, -1)]  # x_(i) = i, unsorted on purpose
    r, s = quantile_interval(values, 0.1)
    assert (r, s) == ends
    tail = (1 - INTERVAL_COVERAGE) / 2
    r, s = int(r), int(s)
    if _cdf(n, 0.1, 0) <= tail:  # a lower end exists (n >= 18): the largest one whose tail is within its half
        assert _cdf(n, 0.1, r - 1) <= tail < _cdf(n, 0.1, r)
    else:
        assert r == 1  # the minimum: all the sample can say below
    if s < n:
        assert _cdf(n, 0.1, s - 1) >= 1 - tail > _cdf(n, 0.1, s - 2)
    if _cdf(n, 0.1, 0) <= tail and s < n:
        assert _cdf(n, 0.1, s - 1) - _cdf(n, 0.1, r - 1) >= INTERVAL_COVERAGE  # the interval's coverage


def test_quantile_interval_covers_the_10th_percentile_by_simulation():
    """30 steps of a compute time plus load (shifted exponential), 4000 samples: the interval holds the true 10th
    percentile as often as the binomial says, P(1 <= Y <= 5) = 88.5%, and at least the 68.27% asked."""
    rng = random.Random(0)
    compute, load = 2e-3, 1e-3
    true_q = compute - load * math.log(0.9)  # the exponential's 10th percentile, shifted
    hits = 0
    trials = 4000
    for _ in range(trials):
        times = [compute + rng.expovariate(1 / load) for _ in range(30)]
        low, high = quantile_interval(times, 0.1)
        hits += low <= true_q < high
    exact = _cdf(30, 0.1, 5) - _cdf(30, 0.1, 0)
    assert exact == pytest.approx(0.885, abs=1e-3)
    assert hits / trials == pytest.approx(exact, abs=0.02) and hits / trials > INTERVAL_COVERAGE


def test_sample_quantile_is_an_order_statistic():
    values = [float(v) for v in range(30, 0, -1)]
    assert sample_quantile(values, 0.1) == 3.0  # ceil(30 x 0.1) = 3, not 4 by float rounding
    assert sample_quantile(values[:10], 0.1) == 21.0  # 10 values: the minimum (of 30..21)
    assert sample_quantile([5.0, 1.0, 3.0], 0.5) == 3.0
    with pytest.raises(ValueError, match="sample_quantile needs at least one value"):
        sample_quantile([], 0.1)
    with pytest.raises(ValueError, match=r"invalid q 0: expected a number strictly between 0 and 1"):
        quantile_interval([1.0], 0)


def _loaded_point(batch: int, compute: float, slowed: int, n: int = 30, seed: int = 0) -> SimpleNamespace:
    """A CPU profile point: ``n`` steps of ``compute`` seconds (±1%), ``slowed`` of them stretched 1.5-4x by
    other processes (interference only adds time); the profile reads the median."""
    rng = random.Random(seed)
    times = [compute * (1 + 0.01 * rng.uniform(-1, 1)) for _ in range(n)]
    for i in rng.sample(range(n), slowed):
        times[i] *= rng.uniform(1.5, 4.0)
    median = sorted(times)[(n - 1) // 2]
    return SimpleNamespace(batch_size=batch, fits=True, step_times=tuple(times), step_seconds=median,
                           samples_per_second=batch / median)  # fmt: skip


def _estimate(b_simple: float, stderr: float) -> NoiseScaleEstimate:
    return NoiseScaleEstimate(b_simple, stderr, 1.0, None, b_simple, None, 100, 92.0, 12800.0, 0, 0.99, "t")


def test_a_loaded_cpu_no_longer_hides_a_real_difference():
    """Digits under a 2x oversubscribed CPU: 128 costs 1.3x the step of 32 (3.1x the samples/s), and more than
    half of each size's 30 steps are slowed 1.5-4x. The medians read load -- 128's interval overlaps 32's and the
    switch does not hold; the 10th percentile reads compute to within 1% (one slowed step, or 17, change
    nothing there), its interval is within ~1%, and the switch to 128 holds across it and B_noise ± 1 s.e."""
    points = [_loaded_point(32, 2e-3, slowed=17, seed=1), _loaded_point(128, 2.6e-3, slowed=17, seed=2)]
    noise = _estimate(61.0, 11.0)
    curve = throughput_curve(points, CPU_STEP_QUANTILE)
    spread = throughput_spread(points, CPU_STEP_QUANTILE)
    for p, compute in zip(points, (2e-3, 2.6e-3)):
        assert curve[p.batch_size] == pytest.approx(p.batch_size / compute, rel=0.011)
        low, high = spread[p.batch_size]
        assert low <= curve[p.batch_size] <= high and high / low < 1.021
    quantile = recommend(curve, noise, current_batch=32, lr=1e-3, throughput_spread=spread)
    assert quantile.switched and quantile.batch_size == 128 and quantile.gain_range[0] > 0.05
    median = recommend(throughput_curve(points), noise, current_batch=32, lr=1e-3,
                       throughput_spread=throughput_spread(points))  # fmt: skip
    assert not median.switched and median.gain_range[0] < 0.05
    # the same steps with one more slowed 10x: the reading and its interval do not move
    slower = replace_step(points[0], 0, 10.0)
    assert throughput_curve([slower], 0.1) == throughput_curve([points[0]], 0.1)
    assert throughput_spread([slower], 0.1) == throughput_spread([points[0]], 0.1)


def replace_step(point: SimpleNamespace, index: int, factor: float) -> SimpleNamespace:
    times = sorted(point.step_times)
    times[-1 - index] *= factor  # one of the already slow steps, slower still
    return SimpleNamespace(**{**vars(point), "step_times": tuple(times)})


def _workload() -> batchlab.Workload:
    torch.manual_seed(0)
    data = torch.randn(256, 8), torch.randint(0, 3, (256,))

    def make_batch(b):
        index = torch.randint(0, 256, (b,))
        return data[0][index], data[1][index]

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return batchlab.Workload(model, make_batch, nn.functional.cross_entropy,
                             lambda params: torch.optim.Adam(params, lr=1e-3), dataset_size=256)  # fmt: skip


@pytest.mark.parametrize(("device", "q"), [("cpu", 0.1), ("cuda:0", 0.5)])
def test_advise_reads_the_cpu_at_the_10th_percentile_and_other_devices_at_the_median(monkeypatch, device, q):
    """The whole pipeline on a real workload, its profile's step times replaced by a loaded machine's (the real
    profile runs; only the timings and the device name are scripted, so nothing here is timed): the curve and
    spread advise recommends from are the device's quantile of those steps and its interval."""
    real = profiling_api.profile
    scripted = {}

    def loaded_profile(*args, **kwargs):
        result = real(*args, **kwargs)
        points = []
        for p in result.points:
            if p.fits and p.samples_per_second:
                fake = _loaded_point(
                    p.batch_size, 1e-3 * (1 + p.batch_size / 64), slowed=12, seed=p.batch_size
                )
                p = replace(p, step_times=fake.step_times, step_seconds=fake.step_seconds,
                            samples_per_second=fake.samples_per_second)  # fmt: skip
                scripted[p.batch_size] = p
            points.append(p)
        return replace(result, points=points, device=device)

    monkeypatch.setattr(profiling_api, "profile", loaded_profile)
    advice = batchlab.advise(_workload(), current_batch=16, max_batch_size=64, noise_steps=12,
                             seconds_per_point=0, device="cpu")  # fmt: skip
    assert step_quantile(device) == q and set(advice.throughput) == set(scripted)
    for b, p in scripted.items():
        per_step = p.samples_per_second * p.step_seconds
        reading = p.samples_per_second if q == 0.5 else per_step / sample_quantile(p.step_times, q)
        assert advice.throughput[b] == pytest.approx(reading, rel=1e-12)
        fast, slow = quantile_interval(p.step_times, q)
        assert advice.throughput_spread[b] == pytest.approx((per_step / slow, per_step / fast), rel=1e-12)
    said = "10% quantile (CPU: interference only adds time)" if q == 0.1 else "median of timed steps"
    assert said in advice.throughput_detail


@pytest.mark.parametrize("q", [0.05, 0.1, 0.25, 0.5, 0.75, 0.9])
def test_the_reading_lies_inside_its_interval_for_every_count(q):
    """The reading (an order statistic) must lie in its spread: recommend refuses a spread that misses it."""
    for n in range(1, 121):
        values = [float(v) for v in range(n)]
        low, high = quantile_interval(values, q)
        assert low <= sample_quantile(values, q) <= high
