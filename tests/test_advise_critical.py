"""A critical batch in place of B_simple: ``recommend(noise_from=)``, ``advise(critical_batch=)`` and
``Advice.with_critical_batch`` (issue 13 items 4 and 6: B_simple read 0.3-0.9x the swept critical batch).

The CLI's ``advise --branch`` / ``--critical-batch`` are tested in test_cli_branch.py."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchlab
from batchlab.advice.goodput import statistical_efficiency
from batchlab.advice.pipeline import CRITICAL_BATCH_GIVEN
from batchlab.advice.recommend import recommend
from conftest import UNDEFINED, assert_same_state, undefined_noise_scale, workload_state

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

CURVE = {b: 10_000.0 * b / (b + 16) for b in (8, 16, 32, 64, 128, 256, 512)}  # a fixed cost, then saturation
SPREAD = {b: (0.97 * v, 1.03 * v) for b, v in CURVE.items()}  # each reading within ±3%
QUICK = {"current_batch": 32, "throughput": "probes", "noise_steps": 12, "noise_batch": 32, "device": "cpu"}


def _workload() -> batchlab.Workload:
    torch.manual_seed(0)
    x, y = torch.randn(512, 8), torch.randint(0, 3, (512,))

    def draw(b):
        index = torch.randint(0, 512, (b,))
        return x[index], y[index]

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return batchlab.Workload(
        model, draw, F.cross_entropy, lambda p: torch.optim.Adam(p, lr=1e-3), dataset_size=512
    )


def test_a_larger_critical_batch_moves_the_goodput_peak_up_and_the_explanation_names_its_source():
    small = recommend(CURVE, 20.0, current_batch=32, lr=1e-3)
    large = recommend(CURVE, 200.0, current_batch=32, lr=1e-3, noise_from="the critical batch measured apart")
    assert large.best_batch > small.best_batch
    assert large.noise_scale == 200.0 and large.noise_from == "the critical batch measured apart"
    assert small.noise_from is None and small.explanation[0].startswith("gradient noise scale B_noise ≈ 20")
    assert large.explanation[0].startswith("B_noise ≈ 200, the critical batch measured apart: past ~200")
    assert large.to_dict()["noise_from"] == "the critical batch measured apart"


def test_a_bare_number_s_gain_range_spans_the_timed_steps_alone_and_says_so():
    rec = recommend(CURVE, 200.0, current_batch=8, lr=1e-3, throughput_spread=SPREAD)
    assert rec.switched and rec.gain_range is not None and rec.noise_scale_stderr is None
    line = next(line for line in rec.explanation if line.startswith("switch from 8"))
    assert "across the spread of the timed steps)" in line and "B_noise ± 1 standard error" not in line


@pytest.mark.parametrize("noise_from", ["", "   ", 3])
def test_noise_from_must_be_words(noise_from):
    with pytest.raises(
        ValueError, match=r"noise_from must be words saying where B_noise came from, or None; got"
    ):
        recommend(CURVE, 200.0, current_batch=32, lr=1e-3, noise_from=noise_from)


def test_advise_with_a_critical_batch_measures_b_simple_still_and_uses_the_critical_batch_instead():
    work = _workload()
    before = workload_state(work)
    advice = batchlab.advise(work, critical_batch=300.0, **QUICK)
    assert_same_state(before, workload_state(work))  # probing never changes the user's state
    rec = advice.recommendation
    assert (
        rec.noise_scale == 300.0 and rec.noise_scale_stderr is None and rec.noise_from == CRITICAL_BATCH_GIVEN
    )
    assert advice.noise.b_simple is not None and advice.noise.b_simple != 300.0  # measured and reported
    for row in rec.candidates:
        assert row.efficiency == pytest.approx(statistical_efficiency(row.batch_size, 300.0, rec.base_batch))
    assert advice.to_dict()["recommendation"]["noise_from"] == CRITICAL_BATCH_GIVEN
    assert rec == recommend(
        advice.throughput, 300.0, throughput_spread=advice.throughput_spread, noise_from=CRITICAL_BATCH_GIVEN,
        **advice.options,
    )  # fmt: skip


def test_with_critical_batch_recommends_again_on_the_same_measurements():
    work = _workload()
    advice = batchlab.advise(work, lr=3e-3, base_batch=16, **QUICK)
    assert advice.recommendation.noise_from is None
    again = advice.with_critical_batch(150.0, "the critical batch of a sweep")
    assert again.throughput == advice.throughput and again.fit == advice.fit and again.noise == advice.noise
    assert (
        again.options == advice.options and again.options["base_batch"] == 16 and again.options["lr"] == 3e-3
    )
    assert again.recommendation == recommend(
        advice.throughput, 150.0, throughput_spread=advice.throughput_spread,
        noise_from="the critical batch of a sweep", **advice.options,
    )  # fmt: skip
    assert again.recommendation.lr.base_lr == 3e-3 and again.recommendation.base_batch == 16
    same = advice.with_critical_batch(advice.noise.b_simple)  # B_simple as a bare number: the same peak
    assert same.recommendation.best_batch == advice.recommendation.best_batch


@pytest.mark.parametrize("value", [0, -5.0, float("inf"), float("nan"), "200"])
def test_a_bad_critical_batch_is_refused_by_name_before_anything_runs(value):
    work = _workload()
    before = workload_state(work)
    with pytest.raises(ValueError, match=r"invalid critical_batch .*: expected a number > 0 \(samples"):
        batchlab.advise(work, critical_batch=value, **QUICK)
    assert_same_state(before, workload_state(work))


def test_with_critical_batch_refuses_what_is_not_a_batch_size():
    advice = batchlab.advise(_workload(), **QUICK)
    with pytest.raises(ValueError, match=r"invalid critical_batch None: expected a number > 0"):
        advice.with_critical_batch(None)


def test_an_undefined_noise_scale_raises_one_error_that_keeps_the_measurements(monkeypatch):
    undefined_noise_scale(monkeypatch)
    workload = _workload()
    before = workload_state(workload)
    with pytest.raises(
        batchlab.NoNoiseScaleError, match=r"no noise scale to advise with \(\|G\|² EMA is"
    ) as info:
        batchlab.advise(workload, **QUICK)
    failed = info.value
    assert isinstance(failed, ValueError) and failed.note == UNDEFINED and "--branch SIZES" in str(failed)
    assert_same_state(before, workload_state(workload))
    advice = failed.with_critical_batch(150)  # recommended on the kept measurements: nothing runs again
    assert_same_state(before, workload_state(workload))
    again = recommend(
        advice.throughput, 150.0, throughput_spread=advice.throughput_spread, noise_from=CRITICAL_BATCH_GIVEN,
        **failed.options,
    )  # fmt: skip
    assert advice.recommendation == again and advice.noise.b_simple is None
    assert failed.options["max_micro_batch"] == advice.fit.batch_size and failed.options["lr"] == 1e-3
    with pytest.raises(ValueError, match="invalid critical_batch -1"):
        failed.with_critical_batch(-1)


def test_the_undefined_noise_scale_error_pickles_with_its_measurements(monkeypatch):
    undefined_noise_scale(monkeypatch)
    with pytest.raises(batchlab.NoNoiseScaleError) as info:
        batchlab.advise(_workload(), **QUICK)
    failed = info.value
    back = pickle.loads(pickle.dumps(failed))  # as a Ray trial or a process pool sends it to the parent
    assert str(back) == str(failed) and back.note == failed.note and back.options == failed.options
    assert back.with_critical_batch(150).to_dict() == failed.with_critical_batch(150).to_dict()
