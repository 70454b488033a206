"""batchlab.noise.backward_norms: the fused per-backward norms are the per-sample truth, and touch nothing.

Issue 13, item 5: the accumulation collector now reads one fused norm per backward instead of running
arithmetic in a hook per tensor. The reference here is computed from per-sample gradients (torch.func), not
from the collector's own arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from batchlab.noise import AccumulationCollector, SplitBatchCollector
from batchlab.noise.backward_norms import BackwardNorms, squared_sums

MICRO, ACCUM = 6, 4


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _per_sample_reference(model, x, y):
    """(mean over micro-batches of |micro-batch mean gradient|², |mean gradient of all samples|²), in float64,
    from per-sample gradients: the definition, independent of how the collector gets there."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_sample.values()], 1).double()  # [samples, params]
    micro = flat.reshape(ACCUM, MICRO, -1).mean(1)  # each micro-batch's mean gradient
    return float((micro**2).sum(1).mean()), float((flat.mean(0) ** 2).sum())


def _accumulate(model, x, y, scaler=None):
    for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
        loss = F.cross_entropy(model(xb), yb) / ACCUM
        (scaler.scale(loss) if scaler is not None else loss).backward()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_fused_collector_matches_per_sample_reference_and_leaves_grads_bitwise_alone():
    x, y = _data(MICRO * ACCUM)
    twin, model = _model(), _model()
    _accumulate(twin, x, y)  # the same loop without the collector
    gns = AccumulationCollector(model.parameters(), MICRO)
    _accumulate(model, x, y)
    pair = gns.step()
    want_small, want_big = _per_sample_reference(model, x, y)
    assert (pair.b_small, pair.b_big) == (MICRO, MICRO * ACCUM)
    assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
    assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)
    for mine, theirs in zip(_grads(model), _grads(twin), strict=True):
        assert torch.equal(mine, theirs)  # bitwise: the collector never writes .grad
    gns.close()


def test_fused_collector_with_grad_scaler_exact_whether_or_not_unscale_comes_first():
    """Scaled fp32 gradients, unscaled before step() or not (GradScaler.unscale_ writes .grad without bumping
    its version: nothing read at step() could tell): every step matches the per-sample reference."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, so one reference serves
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gns = AccumulationCollector(model.parameters(), MICRO, scaler=scaler)
    x, y = _data(MICRO * ACCUM)
    want_small, want_big = _per_sample_reference(model, x, y)
    for unscale_first in (True, False, True):
        opt.zero_grad(set_to_none=True)
        _accumulate(model, x, y, scaler)
        if unscale_first:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        pair = gns.step()
        scaler.step(opt)
        scaler.update()
        assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
        assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)
    assert gns.unmeasured_steps == 0


def test_a_window_shorter_than_the_last_is_counted_not_guessed():
    """|.grad|² is read from the pass count learned from the previous step on: a shorter step is unmeasured."""
    model = _model()
    x, y = _data(MICRO * ACCUM)
    gns = AccumulationCollector(model.parameters(), MICRO)
    _accumulate(model, x, y)  # 4 micro-batches
    assert gns.step() is not None
    model.zero_grad(set_to_none=True)
    for xb, yb in zip(x[: 2 * MICRO].split(MICRO), y[: 2 * MICRO].split(MICRO), strict=True):
        F.cross_entropy(model(xb), yb).backward()  # 2 micro-batches
    assert gns.step() is None and gns.unmeasured_steps == 1
    model.zero_grad(set_to_none=True)
    _accumulate(model, x, y)  # 4 again: the count learned from the short step reads every pass from the 2nd
    want_small, want_big = _per_sample_reference(model, x, y)
    pair = gns.step()
    assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
    assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)


def test_step_after_zero_grad_set_to_none_is_still_exact():
    model = _model()
    x, y = _data(MICRO * ACCUM)
    want_small, want_big = _per_sample_reference(model, x, y)
    gns = AccumulationCollector(model.parameters(), MICRO)
    for _ in range(2):  # |.grad|² was read at the end of the last backward: zero_grad first does not matter
        _accumulate(model, x, y)
        model.zero_grad(set_to_none=True)
        pair = gns.step()
        assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
        assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)


def test_every_k_measures_one_step_in_k_exactly_with_no_hooks_in_between():
    """every=3: steps 1, 4, 7 match the per-sample reference; the others return None, are counted, and run
    with no hook on any parameter (the point: they cost nothing); .grad is bitwise what the plain loop gives."""
    model, twin = _model(), _model()
    x, y = _data(MICRO * ACCUM)
    want_small, want_big = _per_sample_reference(model, x, y)
    gns = AccumulationCollector(model.parameters(), MICRO, every=3)
    measured = []
    for step in range(1, 8):
        hooked = all(p._backward_hooks for p in model.parameters())
        bare = not any(p._backward_hooks for p in model.parameters())
        for net in (model, twin):
            net.zero_grad(set_to_none=True)
            _accumulate(net, x, y)
        for mine, theirs in zip(_grads(model), _grads(twin), strict=True):
            assert torch.equal(mine, theirs)
        pair = gns.step()
        assert hooked if pair is not None else bare, f"step {step}: hooks present on a skipped step"
        if pair is not None:
            measured.append(step)
            assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
            assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)
    assert measured == [1, 4, 7]
    assert gns.skipped_steps == 4 and gns.tracker.updates == 3
    gns.close()
    assert not any(p._backward_hooks for p in model.parameters())
    _accumulate(model, x, y)
    assert gns.step() is None and not any(p._backward_hooks for p in model.parameters())  # closed for good


def test_removing_the_hooks_leaves_each_parameter_as_it_was_found():
    """A removed handle leaves an empty hook dict, through which autograd still calls into Python on every
    backward (about +1% on mlp-digits' step, benchmarks/removed_hooks.py): a parameter with no hooks before is
    bare again (``None``, as a fresh one), between every-k steps and after close; one the user had hooked keeps
    its hook, which still fires."""
    model = _model()
    first, *others = list(model.parameters())
    fired = []
    first.register_hook(lambda g: fired.append(1))
    x, y = _data(MICRO * ACCUM)
    gns = AccumulationCollector(model.parameters(), MICRO, every=2)
    _accumulate(model, x, y)
    assert gns.step() is not None
    assert all(p._backward_hooks is None for p in others) and len(first._backward_hooks) == 1
    model.zero_grad(set_to_none=True)
    _accumulate(model, x, y)
    assert gns.step() is None  # hooks back in for the next step
    assert all(len(p._backward_hooks) == 1 for p in others)
    gns.close()
    assert all(p._backward_hooks is None for p in others) and len(first._backward_hooks) == 1
    fired.clear()
    model.zero_grad(set_to_none=True)
    _accumulate(model, x, y)
    assert len(fired) == ACCUM  # the user's hook, once per micro-batch


def test_every_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="every"):
        AccumulationCollector(_model().parameters(), MICRO, every=0)


def test_reentrant_checkpointing_counts_each_backward_once():
    """A reentrant checkpoint runs a backward inside the backward: one micro-batch still counts once."""
    torch.manual_seed(0)
    first, second = nn.Sequential(nn.Linear(5, 16), nn.Tanh()), nn.Linear(16, 3)
    model = nn.Sequential(first, second)
    x, y = _data(MICRO * ACCUM)
    want_small, want_big = _per_sample_reference(model, x, y)
    gns = AccumulationCollector(model.parameters(), MICRO)
    for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
        hidden = checkpoint(first, xb.requires_grad_(), use_reentrant=True)
        (F.cross_entropy(second(hidden), yb) / ACCUM).backward()
    pair = gns.step()
    assert pair.b_big == MICRO * ACCUM
    assert pair.sq_norm_small == pytest.approx(want_small, rel=1e-5)
    assert pair.sq_norm_big == pytest.approx(want_big, rel=1e-5)


def test_held_gradients_flushed_early_give_the_same_norms():
    """bucket_bytes=1: every held gradient is normed the moment it arrives (the bounded-memory path)."""
    x, y = _data(MICRO * ACCUM)
    results = []
    for bucket in (1, 2**30):
        model = _model()
        norms = BackwardNorms(model.parameters(), bucket_bytes=bucket)
        _accumulate(model, x, y)
        window = norms.take()
        results.append((window.passes, *squared_sums(window.deltas, window.accumulated)))
        norms.remove()
    assert results[0][0] == results[1][0] == ACCUM
    assert results[0][1:] == pytest.approx(results[1][1:], rel=1e-6)


def test_split_collector_on_the_fused_norms_matches_the_reference():
    model = _model()
    x, y = _data(2 * MICRO)
    gns = SplitBatchCollector(model.parameters())
    gns.backward(lambda xb, yb: F.cross_entropy(model(xb), yb), x, y)
    halves = [_per_sample_reference_halves(model, x[:MICRO], y[:MICRO]), None]
    halves[1] = _per_sample_reference_halves(model, x[MICRO:], y[MICRO:])
    full = _per_sample_reference_halves(model, x, y)
    assert gns.last.sq_norm_small == pytest.approx((halves[0] + halves[1]) / 2, rel=1e-5)
    assert gns.last.sq_norm_big == pytest.approx(full, rel=1e-5)


def _per_sample_reference_halves(model, x, y):
    """|mean gradient|² over (x, y), float64, by autograd on the whole set (the plain definition)."""
    model.zero_grad(set_to_none=True)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return float(sum((g.double() ** 2).sum() for g in grads))
