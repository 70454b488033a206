"""batchlab.noise: the estimator is unbiased, the tracker converges, the collectors measure what they claim."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchlab.noise import (
    AccumulationCollector,
    GradientNoiseScale,
    SplitBatchCollector,
    estimate_components,
)

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------------- estimator (eq. A.2)


def test_estimate_components_inverts_the_expectations():
    # E|G_B|² = |G|² + tr(Σ)/B; plug in the exact expectations and get the components back
    g2, tr = 3.0, 48.0
    out = estimate_components(g2 + tr / 4, g2 + tr / 32, 4, 32)
    assert out == pytest.approx((g2, tr), rel=1e-12)
    # non-integer sizes (harmonic means) are fine
    assert estimate_components(g2 + tr / 3.5, g2 + tr / 7, 3.5, 7.0) == pytest.approx((g2, tr), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.0, 0.5, 32, 32), "b_small must be smaller than b_big, got b_small=32, b_big=32"),
        ((1.0, 0.5, 64, 32), "b_small must be smaller than b_big, got b_small=64, b_big=32"),
        ((1.0, 0.5, 0, 32), "invalid b_small 0: expected a number > 0 (a batch size)"),
        ((1.0, 0.5, -4, 32), "invalid b_small -4: expected a number > 0 (a batch size)"),
        ((1.0, 0.5, NAN, 32), "invalid b_small nan: expected a number > 0 (a batch size)"),
        ((1.0, 0.5, 8, INF), "invalid b_big inf: expected a number > 0 (a batch size)"),
        ((1.0, 0.5, True, 32), "invalid b_small True: expected a number > 0 (a batch size)"),
        ((-1.0, 0.5, 8, 32), "sq_norm_small must be >= 0 (a squared norm), got -1.0"),
        ((1.0, -0.5, 8, 32), "sq_norm_big must be >= 0 (a squared norm), got -0.5"),
        ((1.0, "x", 8, 32), "sq_norm_big must be a real number (a squared norm), got 'x'"),
    ],
)
def test_estimate_components_rejects(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        estimate_components(*args)


def _synthetic(seed=0, d=6):
    """Per-example gradients ~ N(mu, cov) with known |G|² = |mu|² and tr(Σ) = tr(cov)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    a = rng.normal(size=(d, d))
    cov = a @ a.T
    chol = np.linalg.cholesky(cov)

    def draw(trials, batch):
        return rng.normal(size=(trials, batch, d)) @ chol.T + mu  # (trials, batch, d)

    return draw, float(mu @ mu), float(np.trace(cov))


def test_estimators_are_unbiased_on_synthetic_gradients():
    """Acceptance: mean over 4000 independent pairs is within 4 standard errors of the truth.

    Tolerance: 4 SE of the mean (a 6e-5 two-sided chance for a correct estimator; the seed is fixed). The
    naive |G_big|² is checked to be *outside* that band, so the test can tell a biased estimator apart.
    """
    draw, g2_true, tr_true = _synthetic(seed=0)
    g = draw(4000, 32)
    small = (g[:, :8].mean(1) ** 2).sum(1)  # B_small = 8, nested in B_big = 32 (as in the collectors)
    big = (g.mean(1) ** 2).sum(1)
    est = np.array([estimate_components(s, b, 8, 32) for s, b in zip(small, big, strict=True)])
    for k, truth in enumerate((g2_true, tr_true)):
        mean, se = est[:, k].mean(), est[:, k].std(ddof=1) / math.sqrt(len(est))
        assert abs(mean - truth) < 4 * se, (k, mean, truth, se)
    naive_se = big.std(ddof=1) / math.sqrt(len(big))
    assert big.mean() - g2_true > 4 * naive_se  # |G_big|² overstates |G|² by tr(Σ)/32


def test_b_simple_converges_on_synthetic_gradients():
    draw, g2_true, tr_true = _synthetic(seed=1)
    g = draw(3000, 32)
    small, big = (g[:, :8].mean(1) ** 2).sum(1), (g.mean(1) ** 2).sum(1)
    tracker = GradientNoiseScale(beta=0.999)
    for s, b in zip(small, big, strict=True):
        tracker.update(s, b, 8, 32)
    r = tracker.result()
    truth = tr_true / g2_true
    assert r.b_simple == pytest.approx(truth, rel=0.05)
    assert abs(r.b_simple - truth) < 4 * r.b_simple_stderr
    assert r.updates == 3000 and r.samples == 3000 * 32 and r.skipped == 0


def test_b_simple_stderr_is_roughly_calibrated():
    """Over 150 independent runs of 200 updates (beta 0.98, ~100 effective), the ±2 SE band covers the truth in
    85-100% of them (95% nominal; the first-order ratio error is a little optimistic at small n_eff)."""
    draw, g2_true, tr_true = _synthetic(seed=2)
    truth = tr_true / g2_true
    covered = 0
    for _ in range(150):
        g = draw(200, 32)
        small, big = (g[:, :8].mean(1) ** 2).sum(1), (g.mean(1) ** 2).sum(1)
        tracker = GradientNoiseScale(beta=0.98)
        for s, b in zip(small, big, strict=True):
            tracker.update(s, b, 8, 32)
        r = tracker.result()
        covered += abs(r.b_simple - truth) < 2 * r.b_simple_stderr
    assert 0.85 <= covered / 150 <= 1.0


def test_b_simple_stderr_is_the_spread_of_repeated_runs_while_the_gradient_drifts():
    """|G|² falls 4x over each run, the same way in every run (as it does while a model trains: the char-LM's
    B_simple grew 4x in 300 steps), with each step's norms precise next to that drift. The spread of B_simple
    across 200 runs is then one run's error. The standard error from successive differences matches it (spread /
    mean SE 1.07, asserted 0.85-1.2); scatter about the run's mean counts the drift as noise and gave 0.72, an
    interval 1.4x too wide."""
    rng = np.random.default_rng(0)
    steps, trace = 200, 100.0
    g2 = np.linspace(1.0, 0.25, steps)
    estimates, errors = [], []
    for _ in range(200):
        tracker = GradientNoiseScale(beta=0.98)
        # E|G_B|² = |G|² + tr(Σ)/B, plus measurement noise
        small = g2 + trace / 8 + rng.normal(0.0, 0.1, steps)
        big = g2 + trace / 32 + rng.normal(0.0, 0.1, steps)
        for s, b in zip(small, big, strict=True):
            tracker.update(s, b, 8, 32)
        r = tracker.result()
        estimates.append(r.b_simple)
        errors.append(r.b_simple_stderr)
    assert 0.85 <= np.std(estimates, ddof=1) / np.mean(errors) <= 1.2


# -------------------------------------------------------------------------------------------------- tracker


def test_tracker_bias_correction_and_first_update():
    tracker = GradientNoiseScale(beta=0.99)
    assert tracker.b_simple is None and tracker.g2 is None and tracker.result().note == "no updates yet"
    assert tracker.update(3.0 + 48 / 4, 3.0 + 48 / 32, 4, 32)
    # bias-corrected: one update is reported at full size, not 1% of it
    assert tracker.g2 == pytest.approx(3.0) and tracker.trace_sigma == pytest.approx(48.0)
    r = tracker.result()
    assert r.b_simple == pytest.approx(16.0)
    assert r.b_simple_stderr is None and r.g2_stderr is None  # one update: no spread to measure
    assert r.effective_updates == pytest.approx(1.0)


def test_tracker_effective_updates_formula():
    tracker = GradientNoiseScale(beta=0.9)
    for _ in range(30):
        tracker.update(2.0, 1.0, 8, 32)
    w = 0.1 * 0.9 ** np.arange(30)
    assert tracker.result().effective_updates == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-9)


def test_tracker_beta_zero_keeps_only_the_latest():
    tracker = GradientNoiseScale(beta=0.0)
    tracker.update(10.0, 2.0, 8, 32)
    tracker.update(3.0 + 48 / 8, 3.0 + 48 / 32, 8, 32)
    assert tracker.g2 == pytest.approx(3.0) and tracker.trace_sigma == pytest.approx(48.0)


@pytest.mark.parametrize("bad", [(NAN, 1.0), (1.0, NAN), (INF, 1.0), (1.0, INF)])
def test_tracker_skips_non_finite(bad):
    tracker = GradientNoiseScale()
    tracker.update(15.0, 4.5, 4, 32)
    before = tracker.result()
    assert tracker.update(*bad, 4, 32) is False
    after = tracker.result()
    assert after.skipped == 1 and after.updates == 1 and after.b_simple == before.b_simple
    assert "1 update(s) skipped for non-finite norms" in after.note


def test_tracker_noise_dominated_reports_none_not_a_crash():
    tracker = GradientNoiseScale()
    tracker.update(10.0, 1.0, 8, 32)  # |G|² estimate = (32·1 − 8·10)/24 < 0
    r = tracker.result()
    assert r.g2 < 0 and r.b_simple is None and tracker.b_simple is None
    assert "noise dominates" in r.note
    json.dumps(r.to_dict(), allow_nan=False)


def test_tracker_no_noise_reports_none():
    tracker = GradientNoiseScale()
    tracker.update(1.0, 2.0, 8, 32)  # tr(Σ) estimate < 0
    assert tracker.b_simple is None and "tr(Σ) EMA" in tracker.result().note


def test_tracker_result_to_dict_is_json():
    tracker = GradientNoiseScale()
    for s in (15.0, 14.0, 16.5):
        tracker.update(s, 4.5, 4, 32)
    d = tracker.result().to_dict()
    json.loads(json.dumps(d, allow_nan=False))
    assert set(d) >= {
        "b_simple",
        "b_simple_stderr",
        "g2",
        "trace_sigma",
        "updates",
        "samples",
        "skipped",
        "note",
    }


def test_tracker_reset():
    tracker = GradientNoiseScale()
    tracker.update(15.0, 4.5, 4, 32)
    tracker.update(NAN, 4.5, 4, 32)
    tracker.reset()
    assert tracker.updates == 0 and tracker.skipped == 0 and tracker.samples == 0


@pytest.mark.parametrize("beta", [1.0, -0.1, NAN, True, "0.9"])
def test_tracker_rejects_beta(beta):
    with pytest.raises(
        ValueError, match=re.escape(f"invalid beta {beta!r}: expected a number in [0, 1) (the EMA decay)")
    ):
        GradientNoiseScale(beta)


def test_tracker_update_rejects_bad_sizes_and_norms():
    tracker = GradientNoiseScale()
    with pytest.raises(ValueError, match="b_small must be smaller than b_big"):
        tracker.update(1.0, 0.5, 32, 8)
    with pytest.raises(ValueError, match=re.escape("sq_norm_small must be >= 0 (a squared norm), got -1.0")):
        tracker.update(-1.0, 0.5, 8, 32)
    assert tracker.updates == 0 and tracker.skipped == 0


# ----------------------------------------------------------------------------------------------- collectors


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def _flat_grad(model, loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).double()


def _data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randn(n, 2, generator=gen)


def _expected_pair(model, xs, ys):
    """Mean of the micro-batch mean-gradients' squared norms, and the squared norm of their mean."""
    grads = [_flat_grad(model, F.mse_loss(model(x), y)) for x, y in zip(xs, ys, strict=True)]
    small = float(torch.stack([g @ g for g in grads]).mean())
    mean = torch.stack(grads).mean(0)
    return small, float(mean @ mean)


@pytest.mark.parametrize("divided", [True, False])
def test_accumulation_collector_matches_direct_computation(divided):
    model = _mlp()
    x, y = _data(24)
    xs, ys = x.split(6), y.split(6)
    want_small, want_big = _expected_pair(model, xs, ys)
    gns = AccumulationCollector(model.parameters(), micro_batch_size=6, loss_divided_by_steps=divided)
    for xb, yb in zip(xs, ys, strict=True):
        loss = F.mse_loss(model(xb), yb)
        (loss / 4 if divided else loss).backward()
    pair = gns.step()
    assert pair.accepted and (pair.b_small, pair.b_big) == (6, 24)
    assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
    assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)
    assert gns.tracker.updates == 1 and gns.last is pair
    gns.close()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_accumulation_collector_divides_out_the_grad_scaler(unscale_first):
    """AMP: scaled gradients give the same norms as unscaled ones, whether or not unscale_ ran before step()."""
    model = _mlp()
    x, y = _data(16)
    want_small, want_big = _expected_pair(model, x.split(4), y.split(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gns = AccumulationCollector(model.parameters(), 4, scaler=scaler)
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        scaler.scale(F.mse_loss(model(xb), yb) / 4).backward()
    if unscale_first:
        scaler.unscale_(opt)  # e.g. for gradient clipping
    pair = gns.step()
    assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
    assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)


def test_accumulation_collector_skips_non_finite_steps():
    model = _mlp()
    x, y = _data(8)
    gns = AccumulationCollector(model.parameters(), 4)
    F.mse_loss(model(x[:4]), y[:4]).backward()
    (F.mse_loss(model(x[4:]), y[4:]) * INF).backward()  # an AMP-style overflow
    pair = gns.step()
    assert pair is not None and not pair.accepted
    assert gns.tracker.skipped == 1 and gns.tracker.updates == 0


def test_accumulation_collector_single_micro_batch_step_is_counted_not_used():
    model = _mlp()
    x, y = _data(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gns = AccumulationCollector(model.parameters(), 4)
    F.mse_loss(model(x), y).backward()
    assert gns.step() is None and gns.single_micro_batch_steps == 1
    opt.zero_grad()
    assert gns.step() is None and gns.single_micro_batch_steps == 1  # no backward at all: nothing counted


def test_accumulation_collector_close_removes_hooks():
    model = _mlp()
    x, y = _data(8)
    with AccumulationCollector(model.parameters(), 4) as gns:
        pass
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        F.mse_loss(model(xb), yb).backward()
    assert gns.step() is None


def test_accumulation_collector_rejects_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match=re.escape("invalid micro_batch_size 0: expected an int >= 1")):
        AccumulationCollector(model.parameters(), 0)
    with pytest.raises(
        ValueError, match=re.escape("invalid loss_divided_by_steps 'yes': expected True or False")
    ):
        AccumulationCollector(model.parameters(), 4, loss_divided_by_steps="yes")
    with pytest.raises(ValueError, match="params has no tensor that requires grad"):
        AccumulationCollector([p.detach() for p in model.parameters()], 4)
    with pytest.raises(ValueError, match="tracker must be a GradientNoiseScale"):
        AccumulationCollector(model.parameters(), 4, tracker=0.99)
    with pytest.raises(ValueError, match="scaler must be a torch.amp.GradScaler"):
        AccumulationCollector(model.parameters(), 4, scaler="fp16")


@pytest.mark.parametrize("size", [8, 7])
def test_split_batch_collector_gives_the_full_batch_gradient_and_the_right_pair(size):
    model = _mlp()
    x, y = _data(size)
    full = _flat_grad(model, F.mse_loss(model(x), y))
    full_loss = F.mse_loss(model(x), y).item()
    h = (size + 1) // 2
    want_small, _ = _expected_pair(model, (x[:h], x[h:]), (y[:h], y[h:]))

    gns = SplitBatchCollector(model.parameters())
    loss = gns.backward(lambda xb, yb: F.mse_loss(model(xb), yb), x, y)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-7)  # two halves add up to the full-batch gradient
    assert loss.item() == pytest.approx(full_loss, rel=1e-6) and not loss.requires_grad
    pair = gns.last
    n1, n2 = h, size - h
    assert pair.b_big == size and pair.b_small == pytest.approx(2 * n1 * n2 / size)  # harmonic mean
    assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
    assert pair.sq_norm_big == pytest.approx(float(full @ full), rel=1e-5)


def test_split_batch_collector_ignores_backwards_outside_its_step_and_splits_dicts():
    model = _mlp()
    x, y = _data(8)
    gns = SplitBatchCollector(model.parameters())
    F.mse_loss(model(x), y).backward()  # not through the collector: not recorded
    model.zero_grad()
    gns.backward(lambda batch: F.mse_loss(model(batch["x"]), batch["y"]), {"x": x, "y": y, "tag": "ignored"})
    assert gns.tracker.updates == 1 and gns.last.b_big == 8


def test_split_batch_collector_with_grad_scaler_matches_without():
    pairs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = _mlp()
        x, y = _data(8)
        gns = SplitBatchCollector(model.parameters(), scaler=scaler)
        gns.backward(lambda xb, yb, m=model: F.mse_loss(m(xb), yb), x, y)
        pairs.append(gns.last)
    assert pairs[1].sq_norm_small == pytest.approx(pairs[0].sq_norm_small, rel=1e-5)
    assert pairs[1].sq_norm_big == pytest.approx(pairs[0].sq_norm_big, rel=1e-5)


def test_split_batch_collector_rejects_unsplittable_batches():
    model = _mlp()
    gns = SplitBatchCollector(model.parameters())
    x, y = _data(2)
    with pytest.raises(ValueError, match="at least 2 samples to split in two, got batch size 1"):
        gns.backward(lambda xb, yb: F.mse_loss(model(xb), yb), x[:1], y[:1])
    with pytest.raises(ValueError, match="batch holds no tensor to split"):
        gns.backward(lambda: model(x).sum())
    with pytest.raises(
        ValueError, match=re.escape("batch tensors disagree on the batch size (dim 0): [1, 2]")
    ):
        gns.backward(lambda xb, yb: F.mse_loss(model(xb), yb), x, y[:1])
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        gns.backward(None, x, y)


# ------------------------------------------------------------- acceptance: least-squares linear regression


def _regression(seed):
    """y = X w* + 2·noise; per-example MSE gradients at any weights are known in closed form."""
    gen = torch.Generator().manual_seed(seed)
    n, d = 4096, 8
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, generator=gen) + 2.0 * torch.randn(n, generator=gen))[:, None]
    model = nn.Linear(d, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model, x, y


def _exact_b_simple(model, x, y):
    """tr(Σ)/|G|² of per-example gradients g_i = 2 r_i (x_i, 1) of (pred_i − y_i)², over the whole dataset
    (batches are drawn with replacement, so the population covariance is the exact one)."""
    w, b = model.weight.detach().double().reshape(-1), model.bias.detach().double()
    r = x.double() @ w + b - y.double().reshape(-1)
    g = 2 * r[:, None] * torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    mean = g.mean(0)
    return float(((g - mean) ** 2).sum(1).mean() / (mean @ mean))


@pytest.mark.parametrize("collector", ["accumulation", "split"])
@pytest.mark.parametrize("seed", [0, 1])
def test_least_squares_b_simple_within_25_percent_of_exact(collector, seed):
    """Acceptance: 300 real SGD steps (lr 1e-5, so the weights barely move: checked) at B_big = 64, tracker
    beta 0.995; B_simple lands within 25% of the exact value at the final weights (measured here: 1-5%),
    and within 4 of its own standard errors."""
    model, x, y = _regression(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    tracker = GradientNoiseScale(beta=0.995)
    exact_start = _exact_b_simple(model, x, y)
    if collector == "accumulation":  # micro 16 × 4 steps: B_small 16, B_big 64
        gns = AccumulationCollector(model.parameters(), 16, tracker)
        for _ in range(300):
            for _ in range(4):
                idx = torch.randint(len(x), (16,), generator=gen)
                (F.mse_loss(model(x[idx]), y[idx]) / 4).backward()
            gns.step()
            opt.step()
            opt.zero_grad()
    else:  # batch 64 split in two: B_small 32, B_big 64
        gns = SplitBatchCollector(model.parameters(), tracker)
        for _ in range(300):
            idx = torch.randint(len(x), (64,), generator=gen)
            opt.zero_grad()
            gns.backward(lambda xb, yb: F.mse_loss(model(xb), yb), x[idx], y[idx])
            opt.step()
    gns.close()
    exact = _exact_b_simple(model, x, y)
    assert exact == pytest.approx(exact_start, rel=0.02)  # the weights barely moved
    r = tracker.result()
    assert r.updates == 300 and r.samples == 300 * 64
    assert r.b_simple == pytest.approx(exact, rel=0.25)
    assert abs(r.b_simple - exact) < 4 * r.b_simple_stderr
