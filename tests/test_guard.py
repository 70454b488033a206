"""OOMGuard: an out-of-memory error mid-run halves the micro-batch, keeps the effective batch and loses no step.

The OOM is injected: the loss function raises ``torch.OutOfMemoryError`` when its micro-batch is larger than a
"memory threshold" that drops mid-run (a neighbour grabbed memory, a longer sequence arrived). The reference
run uses the smaller micro-batch with accumulation from the start; the guarded run must match it step by step.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchlab import GuardEvent, OOMGuard

STEPS, BATCH, FEATURES = 6, 32, 5


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH, FEATURES, generator=gen)
    y = torch.randint(0, 3, (STEPS * BATCH,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, x, y


def _batches(x, y):
    return [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(STEPS)]


def _train(guard: OOMGuard, model, x, y, threshold=lambda step: None, calls: list | None = None):
    """Train STEPS steps; ``threshold(step)`` is the largest micro-batch that 'fits' at that step (None: all)."""
    losses = []
    for step, batch in enumerate(_batches(x, y)):

        def loss_fn(micro, step=step):
            limit = threshold(step)
            if calls is not None:
                calls.append((step, len(micro[0])))
            if limit is not None and len(micro[0]) > limit:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (injected): micro-batch {len(micro[0])} > {limit}"
                )
            return F.cross_entropy(model(micro[0]), micro[1])

        losses.append(guard.step(batch, loss_fn).item())
    return losses


def test_oom_mid_run_keeps_effective_batch_and_matches_the_small_micro_batch_run(caplog):
    """Tolerance 1e-5 relative: the guarded run sums the same per-sample gradients as the reference in a
    different grouping (one 32-sample mean for the first steps vs four weighted 8-sample means)."""
    model_ref, opt_ref, x, y = _problem()
    reference = OOMGuard(opt_ref, BATCH, micro_batch=8)
    assert (reference.micro_batch, reference.accumulation) == (8, 4)
    ref_losses = _train(reference, model_ref, x, y)

    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, BATCH)  # starts at 32 x 1
    calls: list = []
    with caplog.at_level(logging.WARNING, logger="batchlab"):
        losses = _train(guard, model, x, y, threshold=lambda step: None if step < 3 else 8, calls=calls)

    assert [(e.step, e.micro_before, e.micro_after, e.accumulation_after) for e in guard.events] == [
        (3, 32, 16, 2),
        (3, 16, 8, 4),
    ]
    assert all(e.effective_batch == BATCH for e in guard.events)
    assert (guard.micro_batch, guard.accumulation, guard.effective_batch) == (8, 4, BATCH)
    assert guard.steps == STEPS  # no step skipped
    assert (
        opt_ref.state[next(iter(model_ref.parameters()))]["step"]
        == optimizer.state[next(iter(model.parameters()))]["step"]
        == STEPS
    )
    # step 3 was retried with the same data: 32 (fails), 16 (fails), then 8 x 4; later steps run at 8 directly
    assert [size for step, size in calls if step == 3] == [32, 16, 8, 8, 8, 8]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for got, want in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "retrying the same step as 8 x 4" in caplog.text


def test_oom_after_a_partial_accumulation_discards_the_partial_gradient():
    """An OOM on the second micro-batch: the first one's gradient must not be counted twice in the retry."""
    model_ref, opt_ref, x, y = _problem()
    _train(OOMGuard(opt_ref, BATCH, micro_batch=8), model_ref, x, y)

    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, BATCH, micro_batch=16)
    failures = {"left": 1}
    seen = []
    for step, batch in enumerate(_batches(x, y)):

        def loss_fn(micro, step=step):
            seen.append((step, len(micro[0])))
            if step == 2 and len(micro[0]) == 16 and seen.count((2, 16)) == 2 and failures["left"]:
                failures["left"] -= 1  # the second 16-sample micro-batch of step 2 runs out of memory
                raise RuntimeError("CUDA error: out of memory")
            return F.cross_entropy(model(micro[0]), micro[1])

        guard.step(batch, loss_fn)

    assert [(e.step, e.micro_after, e.accumulation_after) for e in guard.events] == [(2, 8, 4)]
    for got, want in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_uneven_halving_keeps_the_effective_batch_exact():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, 30, micro_batch=30)
    batch = (x[:30], y[:30])
    sizes = []

    def loss_fn(micro):
        sizes.append(len(micro[0]))
        if len(micro[0]) > 7:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return F.cross_entropy(model(micro[0]), micro[1])

    guard.step(batch, loss_fn)
    # 30 -> at most 15 (15 x 2) -> at most 7 (6 x 5: the exact split of 30 with the fewest steps)
    assert [(e.micro_after, e.accumulation_after) for e in guard.events] == [(15, 2), (6, 5)]
    assert guard.effective_batch == 30
    assert sizes == [30, 15, 6, 6, 6, 6, 6]


def test_non_oom_errors_propagate_unchanged_and_leave_no_gradient():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, BATCH, micro_batch=8)

    def loss_fn(micro):
        loss = F.cross_entropy(model(micro[0]), micro[1])
        if len(micro[0]) == 8 and not guard.events:
            loss.backward()  # a gradient exists when the user's bug fires
            raise ValueError("shape bug in the user's model")
        return loss

    with pytest.raises(ValueError, match="shape bug"):
        guard.step((x[:BATCH], y[:BATCH]), loss_fn)
    assert guard.events == [] and guard.steps == 0


def test_at_the_minimum_micro_batch_the_oom_is_reraised():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, 8, micro_batch=4, min_micro_batch=2)

    def loss_fn(micro):
        raise torch.OutOfMemoryError("out of memory (injected): nothing fits")

    with pytest.raises(torch.OutOfMemoryError, match="nothing fits"):
        guard.step((x[:8], y[:8]), loss_fn)
    assert [(e.micro_before, e.micro_after) for e in guard.events] == [(4, 2)]
    assert guard.steps == 0


def test_hooks_backward_scaler_and_before_step_are_used():
    model, optimizer, x, y = _problem()
    backwards, before = [], []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)  # a power of two: scaling is exact
    events: list[GuardEvent] = []
    guard = OOMGuard(
        optimizer,
        16,
        micro_batch=8,
        scaler=scaler,
        backward=lambda loss: (backwards.append(float(loss.detach())), loss.backward()),
        before_optimizer_step=lambda: before.append(guard.steps),
        on_event=events.append,
    )
    loss = guard.step((x[:16], y[:16]), lambda m: F.cross_entropy(model(m[0]), m[1]))
    assert len(backwards) == 2 and before == [0]
    assert sum(backwards) == pytest.approx(float(loss) * 2.0**4, rel=1e-6)  # the scaler scaled each backward
    assert guard.steps == 1 and events == []


def test_dict_batches_are_split_along_dimension_zero():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, 16, micro_batch=4)
    seen = []

    def loss_fn(micro):
        seen.append((micro["x"].shape[0], micro["name"]))
        return F.cross_entropy(model(micro["x"]), micro["y"])

    guard.step({"x": x[:16], "y": y[:16], "name": "kept"}, loss_fn)
    assert seen == [(4, "kept")] * 4


def test_bad_arguments_are_named():
    model, optimizer, *_ = _problem()
    with pytest.raises(ValueError, match="batch_size"):
        OOMGuard(optimizer, 0)
    with pytest.raises(ValueError, match="reduction"):
        OOMGuard(optimizer, 8, reduction="avg")
    with pytest.raises(TypeError, match="step\\(\\) and zero_grad\\(\\)"):
        OOMGuard(model, 8)
    with pytest.raises(ValueError, match="below min_micro_batch"):
        OOMGuard(optimizer, 8, micro_batch=1, min_micro_batch=2)
