"""batchlab.noise.curvature: B_noise = tr(HΣ)/GᵀHG against its closed form, beside B_simple (issue 13, item 4)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from batchlab.noise.curvature import adam_preconditioner, measure_curvature_noise_scale
from batchlab.noise.estimator import curvature_components


def _anisotropic_regression(n=4096, d=6, seed=0):
    """y = X w* + noise with feature scales 0.1..3: the Hessian 2·E[xxᵀ] is far from isotropic; the weights
    are off the optimum along the flattest and the steepest feature (closed forms here: B_noise 420, B_simple
    494)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 0.5, d)
    x = torch.randn(n, d, generator=gen) * scales
    w_star = torch.randn(d, generator=gen)
    y = x @ w_star + 0.5 * torch.randn(n, generator=gen)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star[None])
        model.weight[0, 0] += 2.0
        model.weight[0, -1] += 0.01
    return model, x, y


def _exact(model, x, y, p=None):
    """(B_noise, B_simple, B_P) over the dataset as the population (batches are drawn with replacement), B_P in
    the diagonal metric ``p`` (None without one)."""
    w = model.weight.detach().double().reshape(-1)
    xd, yd = x.double(), y.double()
    g = 2 * (xd @ w - yd)[:, None] * xd  # per-example gradients of (xᵀw − y)²
    mean = g.mean(0)
    sigma = torch.cov(g.T, correction=0)
    h = 2 * xd.T @ xd / len(x)
    b_p = None if p is None else float((p * torch.diagonal(sigma)).sum() / (p * mean * mean).sum())
    return float(torch.trace(h @ sigma) / (mean @ h @ mean)), float(torch.trace(sigma) / (mean @ mean)), b_p


def test_curvature_components_is_eq_a2_on_the_quadratic_forms():
    # E q_B = 3 + 12/B at B = 4 and 16: q = 6 and 3.75 -> (GᵀHG, tr(HΣ)) = (3, 12); negative forms allowed
    assert curvature_components(6.0, 3.75, 4, 16) == pytest.approx((3.0, 12.0))
    assert curvature_components(-1.0, -0.5, 4, 16)[1] < 0
    with pytest.raises(ValueError, match=re.escape("quad_small must be a real number (g_Bᵀ H g_B), got 'x'")):
        curvature_components("x", 1.0, 4, 16)


def test_b_noise_b_simple_and_b_preconditioned_match_their_closed_forms_on_anisotropic_regression():
    model, x, y = _anisotropic_regression()
    newton = 1.0 / (2 * (x.double() ** 2).mean(0))  # P = 1/diag(H): the metric changes the answer here
    want_noise, want_simple, want_pre = _exact(model, x, y, newton)
    assert want_noise == pytest.approx(420, abs=1) and want_simple == pytest.approx(494, abs=1)
    assert abs(want_pre - want_simple) > 0.3 * want_simple
    gen = torch.Generator().manual_seed(7)

    def sample(k):
        index = torch.randint(0, len(x), (k,), generator=gen)
        return x[index], y[index]

    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    got = measure_curvature_noise_scale(
        model,
        lambda m, batch: ((m(batch[0]).squeeze(1) - batch[1]) ** 2).mean(),
        sample,
        b_small=32,
        b_big=512,
        hessian_batch=256,
        repeats=300,
        preconditioner=[newton.float()[None]],
    )
    assert got.b_noise == pytest.approx(want_noise, rel=0.15)
    assert got.b_preconditioned == pytest.approx(want_pre, rel=0.15)
    assert abs(got.b_preconditioned - want_pre) < 4 * got.b_preconditioned_stderr
    assert got.b_simple == pytest.approx(want_simple, rel=0.15)
    assert abs(got.b_noise - want_noise) < 4 * got.b_noise_stderr
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.weight.grad is None and torch.equal(rng, torch.get_rng_state())


def test_bad_arguments_fail_before_anything_runs():
    model, x, y = _anisotropic_regression(n=64)
    with pytest.raises(ValueError, match="b_small must be smaller than b_big, got b_small=8, b_big=8"):
        measure_curvature_noise_scale(model, None, None, b_small=8, b_big=8, hessian_batch=16)
    with pytest.raises(ValueError, match=re.escape("invalid repeats 1: expected an int >= 2")):
        measure_curvature_noise_scale(model, None, None, b_small=4, b_big=8, hessian_batch=16, repeats=1)


def test_adam_preconditioner_is_one_over_root_v_hat_plus_eps_and_leaves_the_state_alone():
    model, x, y = _anisotropic_regression(n=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    with pytest.raises(ValueError, match="has no second moment for a parameter of shape \\(1, 6\\)"):
        adam_preconditioner(opt, list(model.parameters()))  # before any step
    for _ in range(3):
        opt.zero_grad()
        ((model(x).squeeze(1) - y) ** 2).mean().backward()
        opt.step()
    state = opt.state[model.weight]
    before = state["exp_avg_sq"].clone()
    (p,) = adam_preconditioner(opt, [model.weight])
    want = 1.0 / ((before / (1 - 0.99**3)).sqrt() + 1e-6)
    assert torch.allclose(p, want) and torch.equal(state["exp_avg_sq"], before)
    with pytest.raises(ValueError, match="SGD has no second moment"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), [model.weight])


def test_a_preconditioner_of_the_wrong_shape_is_refused():
    model, _, _ = _anisotropic_regression(n=64)
    with pytest.raises(ValueError, match=re.escape("of its shape [(1, 6)]; got shapes [(6,)]")):
        measure_curvature_noise_scale(
            model, None, None, b_small=4, b_big=8, hessian_batch=16, preconditioner=[torch.ones(6)]
        )
