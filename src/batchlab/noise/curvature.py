"""The curvature-aware noise scale B_noise = tr(HΣ)/GᵀHG beside B_simple, for small models (Hessian-vector products).

McCandlish et al. 2018 (section 2.2): with the optimal step size, SGD's critical batch is
B_noise = tr(HΣ)/(GᵀHG); B_simple = tr(Σ)/|G|² is the cheap stand-in, equal to it only when the Hessian H is
isotropic. Issue 13, item 4 asks which of the two lands nearer a directly swept B_crit (B_simple averaged along
a run measured 0.56-1.29x of it on digits, MNIST-1D and a char-LM, B_noise farther in most cases:
benchmarks/RESULTS.md, "The critical batch swept again after a fix").

:func:`measure_curvature_noise_scale` draws ``repeats`` pairs of nested batches (``b_small`` of ``b_big``
samples) and, per pair, the two mean gradients g and their H-weighted squared norms gᵀHg, with H the Hessian
of the loss on a third, independent batch of ``hessian_batch`` samples (an unbiased estimate of the
Hessian, independent of g: E[gᵀĤg] = E[gᵀHg]) -- one double backward per pair gives Ĥ·v for both v. Eq. A.2
(:func:`~batchlab.noise.estimator.curvature_components`, :func:`~batchlab.noise.estimator.estimate_components`)
turns the means into GᵀHG, tr(HΣ), |G|² and tr(Σ). It costs two backwards and two Hessian-vector products
per pair: a measurement to run at a checkpoint, not every step.

With ``preconditioner=`` (a diagonal P, e.g. :func:`adam_preconditioner`'s 1/(√v̂ + ε) from an Adam state) it
also gives the noise scale *in the optimizer's metric*, B_P = tr(PΣ)/GᵀPG, from the same gradients. Why: for the
update θ ← θ − εPg the second-order loss change is −εGᵀPG + ε²/2·(GᵀPHPG + tr(PHPΣ)/B), so McCandlish's
derivation (section 2.2, g → Pg) gives the critical batch tr(PHPΣ)/GᵀPHPG. Assuming the preconditioned
curvature PH is a multiple of the identity -- what a preconditioner aims at, and the assumption B_simple makes
of H itself -- PHP ∝ P and that is B_P, the estimate for the optimizer actually used. Against critical batches
swept with Adam (issue 13 item 4, benchmarks/RESULTS.md "... after a fix"), averaged over the window, B_simple lands
within 1.5x on two of three data sets and B_P on one or two, so B_simple stays the library's default.

The model's parameters, buffers and ``.grad`` are untouched (``torch.autograd.grad`` never writes ``.grad``),
and ``sample`` runs inside ``torch.random.fork_rng`` so the caller's RNG is as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchlab import checks
from batchlab.noise.estimator import curvature_components, estimate_components

__all__ = ["CurvatureNoiseScale", "adam_preconditioner", "measure_curvature_noise_scale"]


@dataclass(frozen=True)
class CurvatureNoiseScale:
    """B_noise = tr(HΣ)/GᵀHG and B_simple = tr(Σ)/|G|² from the same gradient samples (None where undefined).

    ``*_stderr`` are delta-method standard errors over the ``repeats`` independent pairs. ``b_preconditioned``
    is tr(PΣ)/GᵀPG in the given preconditioner's metric (None without one; the module docstring says why).
    """

    b_noise: float | None
    b_noise_stderr: float | None
    b_simple: float | None
    b_simple_stderr: float | None
    g_h_g: float
    trace_h_sigma: float
    g2: float
    trace_sigma: float
    repeats: int
    b_small: int
    b_big: int
    hessian_batch: int
    b_preconditioned: float | None = None
    b_preconditioned_stderr: float | None = None

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field."""
        return asdict(self)


def _ratio(ys: list[float], xs: list[float]) -> tuple[float | None, float | None]:
    """mean(y)/mean(x) and its delta-method standard error over independent pairs (None if undefined)."""
    n = len(xs)
    x, y = sum(xs) / n, sum(ys) / n
    if x <= 0 or y <= 0:
        return None, None
    ratio = y / x
    if n < 2:
        return ratio, None
    z = [yi - ratio * xi for xi, yi in zip(xs, ys)]
    var = sum(v * v for v in z) / (n - 1)
    return ratio, math.sqrt(var / n) / x


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((u.double() * v.double()).sum() for u, v in zip(a, b)))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Adam's (or AdamW's) diagonal preconditioner 1/(√v̂ + ε) for each of ``params``, from its current state.

    v̂ = exp_avg_sq / (1 − β₂^step) is the bias-corrected second moment that scales each coordinate of the
    update (Kingma & Ba 2015, algorithm 1); ε and β₂ are the parameter's group's. A copy: the state is not changed.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        if id(p) not in groups or "exp_avg_sq" not in state or "step" not in state:
            raise ValueError(
                f"adam_preconditioner needs an Adam/AdamW optimizer that has taken a step for every parameter; "
                f"{type(optimizer).__name__} has no second moment for a parameter of shape {tuple(p.shape)}"
            )
        group = groups[id(p)]
        beta2, eps = group["betas"][1], group["eps"]
        v_hat = state["exp_avg_sq"].detach() / (1.0 - beta2 ** float(state["step"]))
        out.append(1.0 / (v_hat.sqrt() + eps))
    return out


def measure_curvature_noise_scale(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    sample: Callable[[int], Any],
    *,
    b_small: int,
    b_big: int,
    hessian_batch: int,
    repeats: int = 16,
    preconditioner: list[torch.Tensor] | None = None,
) -> CurvatureNoiseScale:
    """B_noise and B_simple at the model's current weights (see the module docstring for the method).

    ``loss_fn(model, batch)`` returns the batch's *mean* loss; ``sample(n)`` draws a batch of ``n``
    independent samples (a tensor or a tuple/list of tensors along dim 0); the small batch is the big one's
    first ``b_small`` samples. Needs a loss autograd can differentiate twice (``nn.ReLU`` and cross-entropy
    are fine; the Hessian of a piecewise-linear net is its Gauss-Newton part). ``preconditioner``: one
    non-negative tensor per parameter that requires grad, its shape (a diagonal P), for ``b_preconditioned``.
    """
    small = checks.integer("b_small", b_small)
    big = checks.integer("b_big", b_big)
    if not small < big:
        raise ValueError(f"b_small must be smaller than b_big, got b_small={b_small!r}, b_big={b_big!r}")
    hessian = checks.integer("hessian_batch", hessian_batch)
    n = checks.integer("repeats", repeats, minimum=2)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    if preconditioner is not None:
        preconditioner = list(preconditioner)
        shapes = [tuple(p.shape) for p in params]
        if [tuple(t.shape) for t in preconditioner] != shapes:
            raise ValueError(
                f"preconditioner must hold one tensor per parameter that requires grad, of its shape {shapes}; "
                f"got shapes {[tuple(t.shape) for t in preconditioner]}"
            )
    weighted: list[tuple[float, float]] = []
    quads: list[tuple[float, float]] = []
    norms: list[tuple[float, float]] = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(n):
            batch = sample(big)
            g_big = torch.autograd.grad(loss_fn(model, batch), params)
            g_small = torch.autograd.grad(loss_fn(model, _head(batch, small)), params)
            grads_h = torch.autograd.grad(loss_fn(model, sample(hessian)), params, create_graph=True)
            hv = []
            for v in (g_small, g_big):
                inner = sum((g * u).sum() for g, u in zip(grads_h, v))
                hv.append(torch.autograd.grad(inner, params, retain_graph=True))
            quads.append((_dot(g_small, hv[0]), _dot(g_big, hv[1])))
            norms.append((_dot(g_small, g_small), _dot(g_big, g_big)))
            if preconditioner is not None:
                weighted.append(
                    tuple(_dot(g, [w * u for w, u in zip(preconditioner, g)]) for g in (g_small, g_big))
                )
            del grads_h, hv
    curv = [curvature_components(qs, qb, small, big) for qs, qb in quads]
    plain = [estimate_components(ns, nb, small, big) for ns, nb in norms]
    b_noise, b_noise_se = _ratio([c[1] for c in curv], [c[0] for c in curv])
    b_simple, b_simple_se = _ratio([c[1] for c in plain], [c[0] for c in plain])
    b_pre = b_pre_se = None
    if weighted:
        pre = [estimate_components(ws, wb, small, big) for ws, wb in weighted]
        b_pre, b_pre_se = _ratio([c[1] for c in pre], [c[0] for c in pre])
    return CurvatureNoiseScale(
        b_noise=b_noise,
        b_noise_stderr=b_noise_se,
        b_simple=b_simple,
        b_simple_stderr=b_simple_se,
        g_h_g=sum(c[0] for c in curv) / n,
        trace_h_sigma=sum(c[1] for c in curv) / n,
        g2=sum(c[0] for c in plain) / n,
        trace_sigma=sum(c[1] for c in plain) / n,
        repeats=n,
        b_small=small,
        b_big=big,
        hessian_batch=hessian,
        b_preconditioned=b_pre,
        b_preconditioned_stderr=b_pre_se,
    )


def _head(batch: Any, k: int) -> Any:
    """The first ``k`` samples of a batch of tensors (a tensor, or a tuple/list of them)."""
    if isinstance(batch, torch.Tensor):
        return batch[:k]
    return type(batch)(t[:k] if isinstance(t, torch.Tensor) else t for t in batch)
