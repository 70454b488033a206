"""OOMGuard: an out-of-memory error mid-run halves the micro-batch, keeps the effective batch and loses no step.

The OOM is injected: the loss function raises ``torch.OutOfMemoryError`` when its micro-batch is larger than a
"memory threshold" that drops mid-run (a neighbour grabbed memory, a longer sequence arrived). The reference
run uses the smaller micro-batch with accumulation from the start; the guarded run must match it step by step.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from batchlab import OOMGuard
from batchlab.training import GuardEvent
from test_release import BranchNet

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


def test_an_oom_inside_backward_frees_the_failed_graph_before_the_retry():
    """pytorch#82218: the failed backward's saved tensors must be gone when the guard retries, not only after
    the retry's own backward happens to drain them."""
    model = BranchNet(fails=lambda batch_size: batch_size > 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    alive_at_retry = []
    guard = OOMGuard(optimizer, BATCH, on_event=lambda event: alive_at_retry.append(model.alive()))
    x, y = torch.randn(BATCH, 8), torch.randint(0, 3, (BATCH,))
    guard.step((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]))
    assert [(e.micro_before, e.micro_after) for e in guard.events] == [(32, 16), (16, 8)]
    assert alive_at_retry == [0, 0]


# ------------------------------------------------------------------------------------------ optimizer.step


class _OOMAt(TorchFunctionMode):
    """Raise an injected out-of-memory error from the ``at``-th call (1-based) of the torch function or tensor
    method named ``name`` -- once, or on every call from then on with ``always`` -- as a real allocation there
    would: everything the step did before that call stays done."""

    def __init__(self, name: str, at: int = 1, always: bool = False):
        super().__init__()
        self.name, self.at, self.always = name, at, always
        self.calls = self.raised = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == self.name:
            self.calls += 1
            if self.calls >= self.at and (self.always or not self.raised):
                self.raised += 1
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected in {self.name})")
        return func(*args, **(kwargs or {}))


def _loss(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1])


def _run(make_optimizer, steps=1, inject=None, scaler=False, wrap=None):
    """``steps`` guarded steps of the reference problem; ``inject`` (an _OOMAt) is active during the last."""
    model, _, x, y = _problem()
    optimizer = make_optimizer(model.parameters())
    guard = OOMGuard(
        wrap(optimizer) if wrap else optimizer,
        BATCH,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaler else None,
    )
    for index, batch in enumerate(_batches(x, y)[:steps]):
        with inject if (inject is not None and index == steps - 1) else contextlib.nullcontext():
            guard.step(batch, _loss(model))
    return model, optimizer, guard


def _assert_same_training_state(model, optimizer, model_ref, optimizer_ref):
    for got, want in zip(model.parameters(), model_ref.parameters()):
        assert torch.equal(got, want)
    state, state_ref = optimizer.state_dict()["state"], optimizer_ref.state_dict()["state"]
    assert state.keys() == state_ref.keys()
    for index, entry in state.items():
        assert entry.keys() == state_ref[index].keys()
        for key, value in entry.items():
            assert torch.equal(value, state_ref[index][key]), (index, key)


@pytest.mark.parametrize(
    ("make_optimizer", "scaler"),
    [
        (lambda params: torch.optim.Adam(params, lr=1e-2, foreach=False), False),
        (lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True), False),
        (lambda params: torch.optim.Adam(params, lr=1e-2, foreach=False), True),
        # fused: GradScaler sets grad_scale/found_inf on the optimizer; a leftover would scale the retry twice
        (lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True), True),
    ],
    ids=["single-tensor", "foreach", "single-tensor+scaler", "fused+scaler"],
)
def test_an_oom_creating_adams_state_in_the_first_step_is_retried_and_changes_nothing(make_optimizer, scaler):
    """The third zeros_like is the second parameter's first moment: the first parameter's state exists, the
    second's is half made, nothing is applied. The retry must train exactly as a step that never failed."""
    model_ref, optimizer_ref, _ = _run(make_optimizer, scaler=scaler)
    inject = _OOMAt("zeros_like", at=3)
    model, optimizer, guard = _run(make_optimizer, inject=inject, scaler=scaler)
    assert inject.raised == 1
    assert [(e.phase, e.step, e.micro_before, e.micro_after) for e in guard.events] == [
        ("optimizer", 0, 32, 32)
    ]
    assert guard.steps == 1 and (guard.micro_batch, guard.accumulation) == (BATCH, 1)
    _assert_same_training_state(model, optimizer, model_ref, optimizer_ref)
    if scaler:
        assert guard.scaler.get_scale() == 2.0**4  # one update, no inf: the scale held


def test_an_oom_in_the_retried_optimizer_step_is_reraised_with_the_optimizer_as_before():
    model, optimizer, x, y = _problem()
    initial = [p.detach().clone() for p in model.parameters()]
    guard = OOMGuard(optimizer, BATCH)
    with _OOMAt("zeros_like", always=True), pytest.raises(torch.OutOfMemoryError, match="injected") as info:
        guard.step((x[:BATCH], y[:BATCH]), _loss(model))
    assert [e.phase for e in guard.events] == ["optimizer"]  # one retry, not a loop
    assert len(optimizer.state) == 0  # the half-made state of both tries was dropped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    assert guard.steps == 0
    if sys.version_info >= (3, 11):
        assert "again after releasing memory; nothing was applied" in "".join(info.value.__notes__)


@pytest.mark.parametrize(
    ("make_optimizer", "steps", "name", "at", "why"),
    [
        # foreach Adam bumps the steps and updates both moments in place before it allocates the square root
        (lambda ps: torch.optim.Adam(ps, foreach=True), 1, "_foreach_sqrt", 1, "optimizer state it created"),
        (lambda ps: torch.optim.Adam(ps, foreach=True), 2, "_foreach_sqrt", 1, "updated optimizer state"),
        # foreach AdamW decays the parameters first
        (
            lambda ps: torch.optim.AdamW(ps, weight_decay=0.1, foreach=True),
            2,
            "_foreach_sqrt",
            1,
            "parameters",
        ),
        # the single-tensor loop has updated the first parameter when the second one's square root runs out
        (lambda ps: torch.optim.Adam(ps, foreach=False), 2, "sqrt", 2, "updated parameters"),
        # SGD keeps no step counter: its first parameter's update is what shows
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False), 1, "clone", 2, "parameters"),
        # a fused kernel leaves no version trace on what it writes, but its group's step counters moved first
        (lambda ps: torch.optim.AdamW(ps, fused=True), 1, "_fused_adamw_", 1, "optimizer state it created"),
    ],
    ids=["adam-foreach-first", "adam-foreach-later", "adamw-foreach", "adam-single", "sgd-momentum", "fused"],
)
def test_an_oom_after_part_of_the_update_was_applied_is_reraised_with_the_reason(
    make_optimizer, steps, name, at, why
):
    with pytest.raises(torch.OutOfMemoryError, match=f"injected in {name}") as info:
        _run(make_optimizer, steps=steps, inject=_OOMAt(name, at=at))
    if sys.version_info >= (3, 11):
        notes = "".join(info.value.__notes__)
        assert f"at step {steps - 1}, not retried: " in notes and why in notes
        assert "partly applied update cannot be undone" in notes


def test_an_oom_in_an_optimizer_the_guard_cannot_check_is_reraised():
    """Nothing was applied here (a pre-hook raises before the step), but for a subclass the guard cannot know
    how updates are written, so it does not guess."""

    class MyAdam(torch.optim.Adam):
        pass

    model, _, x, y = _problem()
    optimizer = MyAdam(model.parameters())
    optimizer.register_step_pre_hook(lambda *args: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    guard = OOMGuard(optimizer, BATCH)
    with pytest.raises(torch.OutOfMemoryError, match="injected") as info:
        guard.step((x[:BATCH], y[:BATCH]), _loss(model))
    assert guard.events == []
    if sys.version_info >= (3, 11):
        assert "MyAdam is not one of the torch.optim optimizers" in "".join(info.value.__notes__)


def test_the_torch_optimizer_inside_a_framework_wrapper_is_checked():
    class Wrapper:  # the shape of Lightning's LightningOptimizer and Accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

        def step(self):
            self.optimizer.step()

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    make = lambda params: torch.optim.Adam(params, lr=1e-2, foreach=False)  # noqa: E731
    model_ref, optimizer_ref, _ = _run(make)
    model, optimizer, guard = _run(make, inject=_OOMAt("zeros_like", at=3), wrap=Wrapper)
    assert [e.phase for e in guard.events] == ["optimizer"]
    _assert_same_training_state(model, optimizer, model_ref, optimizer_ref)


# ------------------------------------------------------------------------------------------------- evaluate


def _evaluating(model, limit, sizes):
    def fn(inputs):
        sizes.append(len(inputs))
        if len(inputs) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected): chunk {len(inputs)} > {limit}")
        return model(inputs)

    return fn


def test_evaluate_halves_its_own_chunk_and_never_the_training_micro_batch():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, BATCH, micro_batch=16)
    sizes: list[int] = []
    logits = guard.evaluate(x[:64], _evaluating(model, 10, sizes))
    assert sizes == [64, 32, 16] + [8] * 8
    torch.testing.assert_close(logits, model(x[:64]), rtol=1e-6, atol=1e-6)
    assert not logits.requires_grad  # evaluated under no_grad
    assert [(e.phase, e.micro_before, e.micro_after, e.accumulation_after) for e in guard.events] == [
        ("evaluate", 64, 32, 2),
        ("evaluate", 32, 16, 4),
        ("evaluate", 16, 8, 8),
    ]
    assert guard.eval_micro_batch == 8
    assert (guard.micro_batch, guard.accumulation) == (16, 2)  # transformers #32215: training is untouched

    sizes.clear()  # the next evaluation starts at the chunk that fitted
    guard.evaluate(x[64:96], _evaluating(model, 10, sizes))
    assert sizes == [8] * 4 and len(guard.events) == 3
    calls: list = []
    _train(guard, model, x, y, calls=calls)
    assert {size for _, size in calls} == {16}


def test_evaluate_keeps_the_structure_of_the_outputs_and_uneven_chunks():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, BATCH)
    sizes: list[int] = []

    def fn(batch):
        sizes.append(len(batch["x"]))
        if len(batch["x"]) > 7:
            raise torch.OutOfMemoryError("out of memory (injected)")
        logits = model(batch["x"])
        return {"logits": logits, "loss": F.cross_entropy(logits, batch["y"], reduction="none")}

    out = guard.evaluate({"x": x[:30], "y": y[:30]}, fn)
    assert sizes == [30, 15, 7, 7, 7, 7, 2]
    assert out["logits"].shape == (30, 3) and out["loss"].shape == (30,)
    torch.testing.assert_close(
        out["loss"].mean(), F.cross_entropy(model(x[:30]), y[:30]), rtol=1e-6, atol=1e-6
    )


def test_evaluate_needs_per_sample_outputs_and_reraises_what_it_cannot_fix():
    model, optimizer, x, y = _problem()
    guard = OOMGuard(optimizer, BATCH)
    with pytest.raises(TypeError, match=r"per-sample outputs.*shape \(\).*reduction='none'"):
        guard.evaluate((x[:8], y[:8]), lambda b: F.cross_entropy(model(b[0]), b[1]))
    with pytest.raises(ValueError, match="shape bug"):
        guard.evaluate(x[:8], lambda b: (_ for _ in ()).throw(ValueError("shape bug")))
    assert guard.events == []
    sizes: list[int] = []
    with pytest.raises(torch.OutOfMemoryError, match="chunk 1 > 0"):
        guard.evaluate(x[:4], _evaluating(model, 0, sizes))
    assert sizes == [4, 2, 1] and guard.eval_micro_batch == 1
    with pytest.raises(TypeError, match="batch dimension"):
        guard.evaluate("not a batch", model)


def test_an_oom_before_the_optimizers_own_step_began_is_reraised():
    """GradScaler unscales each device/dtype group in place without bumping version counters: an error between
    two groups leaves some gradients unscaled and others not, which no retry could tell apart."""
    torch.manual_seed(0)
    single = nn.Parameter(torch.randn(3))
    double = nn.Parameter(torch.randn(3, dtype=torch.float64))
    optimizer = torch.optim.Adam([single, double], lr=1e-2)
    guard = OOMGuard(optimizer, 4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    batch = torch.randn(4, 3)
    loss_fn = lambda b: ((b * single).sum() + (b.double() * double).sum().float()) / len(b)  # noqa: E731
    with (
        _OOMAt("_amp_foreach_non_finite_check_and_unscale_", at=2),
        pytest.raises(torch.OutOfMemoryError, match="injected") as info,
    ):
        guard.step(batch, loss_fn)
    assert guard.events == [] and not optimizer.state
    if sys.version_info >= (3, 11):
        assert "before optimizer.step() began" in "".join(info.value.__notes__)


def test_an_oom_in_a_fused_sgd_step_is_reraised():
    """A fused SGD kernel writes parameters and momentum without bumping a version or a step counter: whether
    it ran cannot be told, so nothing is retried -- even here, where the kernel itself is what failed."""
    with pytest.raises(torch.OutOfMemoryError, match="injected") as info:
        _run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True), inject=_OOMAt("_fused_sgd_"))
    if sys.version_info >= (3, 11):
        assert "a fused SGD writes without a trace" in "".join(info.value.__notes__)
