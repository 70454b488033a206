"""The batch ramp: its sizes and hysteresis (pure, exact sequences) and BatchRamp in a plain training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchlab.advice.ramp import RampRule, ramp_sizes, round_batch
from batchlab.training import BatchRamp

# ------------------------------------------------------------------------------------------- sizes (pure)


def test_round_batch_to_whole_micro_batches():
    assert [round_batch(b, 64) for b in (3, 17, 100, 128, 200, 1000)] == [2, 16, 100, 128, 192, 960]
    assert round_batch(1, 64) == 2  # never below two micro-batches of one sample


def test_ramp_sizes_double_from_the_start_and_end_at_the_rounded_maximum():
    assert ramp_sizes(8, 512, 64) == (8, 16, 32, 64, 128, 256, 512)
    assert ramp_sizes(16, 100, 32) == (16, 32, 64, 96)  # 100 -> 3 x 32
    assert ramp_sizes(12, 12, 64) == (12,)
    assert ramp_sizes(10, 1000, 64, growth=4) == (10, 40, 128, 640, 960)


def test_ramp_sizes_refuse_a_maximum_below_the_start():
    with pytest.raises(
        ValueError, match=r"^invalid max_batch 8: below the current batch 16 \(a ramp only grows\)$"
    ):
        ramp_sizes(16, 8, 64)


# ---------------------------------------------------------------------------------------- hysteresis (pure)


def test_rule_grows_after_patience_readings_whose_lower_bound_clears_the_next_size():
    rule = RampRule((8, 16, 32, 64), patience=3, min_updates=2)
    readings = [(100.0, 1.0, 1), (20.0, 2.0, 2), (20.0, 2.0, 3), (15.0, 2.0, 4), (20.0, 2.0, 5), (40.0, 1.0, 6),
                (18.0, 1.0, 7)]  # fmt: skip
    out = [rule.observe(b, se, n) for b, se, n in readings]
    # 1 update < min_updates; 18 >= 16 (1), 18 (2); 13 < 16 breaks it; 18 (1), 39 (2), 17 (3): grow to the
    # largest size under the smallest lower bound of the streak, 17 -> 16 (not 32, where 39 alone points).
    assert [r.streak for r in out] == [0, 1, 2, 0, 1, 2, 3]
    assert [r.grow_to for r in out] == [None] * 6 + [16]
    assert out[0].why == "1 of 2 updates" and out[3].why == "lower bound 13 < next size 16"
    rule.moved(16)
    assert rule.current == 16 and rule.next_size == 32
    assert rule.observe(40.0, 1.0, 8).streak == 1  # the streak restarts after a move


def test_rule_jumps_several_sizes_when_the_whole_streak_clears_them_and_never_shrinks():
    rule = RampRule((8, 16, 32, 64, 128), patience=2, min_updates=1)
    assert rule.observe(70.0, 2.0, 5).grow_to is None
    assert rule.observe(80.0, 2.0, 6).grow_to == 64  # min lower bound 68 -> 64
    rule.moved(64)
    lows = [rule.observe(1.0, 0.5, n) for n in range(7, 12)]  # the estimate collapses
    assert all(r.grow_to is None for r in lows) and rule.current == 64
    with pytest.raises(ValueError, match="invalid size 32"):
        rule.moved(32)


def test_rule_target_scales_the_estimate_and_undefined_estimates_break_the_streak():
    rule = RampRule((8, 16), target=0.5, patience=2, min_updates=1)
    assert rule.observe(34.0, 1.0, 3).lower == pytest.approx(16.5)
    assert rule.observe(None, None, 4).streak == 0  # |G|^2 <= 0: no defined estimate
    assert rule.observe(34.0, math.inf, 5).streak == 0
    assert rule.observe(34.0, 1.0, 6).grow_to is None and rule.observe(34.0, 1.0, 7).grow_to == 16
    top = RampRule((8,), min_updates=1)
    assert top.observe(1e9, 1.0, 9).why == "at the maximum"


@pytest.mark.parametrize("target", [0, -1.0, float("nan")])
def test_rule_refuses_a_non_positive_target(target):
    with pytest.raises(
        ValueError, match=r"^invalid target .*: expected a number > 0 \(the multiple of B_simple"
    ):
        RampRule((8, 16), target=target)


# -------------------------------------------------------------------------------------- BatchRamp (torch)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _noisy_problem(seed: int = 0):
    """Random labels on a linear model: the true gradient vanishes as it learns the class frequencies while the
    per-sample noise stays, so B_simple grows within tens of steps."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4096, 16, generator=gen), torch.randint(0, 4, (4096,), generator=gen)
    torch.manual_seed(seed)
    return nn.Linear(16, 4), x, y


def _train(model, optimizer, ramp, x, y, steps, after_update=None):
    """``steps`` steps at the ramp's split; ``after_update()`` runs between the optimizer step and the ramp's."""
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        history.append((ramp.batch_size, ramp.micro_batch, ramp.accumulation, ramp.lr))
        for _ in range(ramp.accumulation):
            index = torch.randint(0, len(x), (ramp.micro_batch,), generator=gen)
            (nn.functional.cross_entropy(model(x[index]), y[index]) / ramp.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_update is not None:
            after_update()
        ramp.step()
    return history


def test_plain_loop_ramp_grows_toward_the_noise_scale_with_lr_carried_and_whole_micro_batches():
    model, x, y = _noisy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    with BatchRamp(
        optimizer, batch_size=8, max_batch=128, max_micro_batch=8, patience=2, min_updates=5
    ) as ramp:
        history = _train(model, optimizer, ramp, x, y, 120)
    batches = [h[0] for h in history]
    assert batches == sorted(batches) and batches[-1] >= 32  # grew, never shrank
    assert ramp.estimate().updates == 120  # every step measured (two micro-batches at least)
    assert [e.batch_after for e in ramp.events] == sorted({*batches} - {8})
    assert {h[:3] for h in history} >= {(8, 4, 2), (32, 8, 4), (64, 8, 8)}  # micro <= 8: accumulation grows
    for batch, micro, accumulation, _ in history:
        assert micro * accumulation == batch and micro <= 8 and accumulation >= 2 and batch <= 128
    for event in ramp.events:
        assert event.lr_after == pytest.approx(
            event.lr_before * math.sqrt(event.batch_after / event.batch_before)
        )
        assert event.b_simple - event.b_simple_stderr >= event.batch_after  # it grew only where the bound was
    assert history[-1][3] == pytest.approx(3e-2 * math.sqrt(batches[-1] / 8))
    assert optimizer.param_groups[0]["betas"][1] < 0.999  # betas carried too


def test_each_doubling_maps_beta1_until_the_sde_bound_then_keeps_it():
    """A ramp's change is a doubling (k = 2): beta1 0.9 -> 0.8 -> 0.6, then kept at 0.6 (2 x (1 - 0.6) = 0.8
    passes the SDE bound 0.5; before the bound 0.2 and then 0, clamped); beta2 maps at every change."""
    model, _, _ = _noisy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with BatchRamp(optimizer, batch_size=8, max_batch=128, max_micro_batch=8) as ramp:
        betas = [ramp.apply(b).carry["groups"][0]["betas"] for b in (16, 32, 64, 128)]
    assert [b[0] for b in betas] == pytest.approx([0.8, 0.6, 0.6, 0.6])
    assert [b[1] for b in betas] == pytest.approx([0.998, 0.996, 0.992, 0.984])
    assert "beta1 kept" in ramp.events[-1].carry["changes"][1]["rule"]


def test_measure_every_reads_one_step_in_k_and_grows_only_on_measured_steps():
    """measure_every=3: 60 of 180 steps measured; each growth follows a measured step (the 1st, 4th, ...), and
    the unmeasured steps in between never count toward the patience."""
    model, x, y = _noisy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    with BatchRamp(
        optimizer, batch_size=8, max_batch=128, max_micro_batch=8, patience=2, min_updates=5, measure_every=3
    ) as ramp:
        history = _train(model, optimizer, ramp, x, y, 180)
    assert ramp.estimate().updates == 60 and ramp.collector.skipped_steps == 120
    assert ramp.events and all(event.step % 3 == 1 for event in ramp.events)
    assert ramp.events[0].step >= 3 * (5 - 1) + 1 + 3  # min_updates 5, then a streak of 2 measured readings
    assert [h[0] for h in history][-1] >= 32


def test_bad_input_is_refused_before_training():
    model, _, _ = _noisy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(
        ValueError, match=r"^invalid max_batch 16: below the current batch 32 \(a ramp only grows\)$"
    ):
        BatchRamp(optimizer, batch_size=32, max_batch=16, max_micro_batch=32)
    with pytest.raises(ValueError, match=r"^invalid target 0: expected a number > 0"):
        BatchRamp(optimizer, batch_size=8, max_batch=64, max_micro_batch=32, target=0)
    with pytest.raises(ValueError, match=r"^invalid max_batch -4: expected an int >= 1$"):
        BatchRamp(optimizer, batch_size=8, max_batch=-4, max_micro_batch=32)
    with pytest.raises(ValueError, match=r"^invalid measure_every 0: expected an int >= 1$"):
        BatchRamp(optimizer, batch_size=8, max_batch=64, max_micro_batch=32, measure_every=0)
    adagrad = torch.optim.Adagrad(model.parameters())
    with pytest.raises(
        ValueError, match=r"^no batch-change rule for optimizer 'Adagrad': known ones are SGD"
    ):
        BatchRamp(adagrad, batch_size=8, max_batch=64, max_micro_batch=32)
    BatchRamp(adagrad, batch_size=8, max_batch=64, max_micro_batch=32, rule="sqrt").close()  # explicit rule
    # Nothing was hooked by the refused ones: a backward runs no collector.
    model(torch.randn(2, 16)).sum().backward()


def test_a_failure_mid_ramp_leaves_the_last_good_batch_and_lr_and_training_goes_on():
    model, x, y = _noisy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    failures = []

    def on_change(event):
        if not failures:
            failures.append(event)
            raise RuntimeError("tracking server unreachable")

    ramp = BatchRamp(optimizer, batch_size=8, max_batch=64, max_micro_batch=32, patience=2, min_updates=5,
                     schedulers=[scheduler], on_change=on_change)  # fmt: skip
    with pytest.raises(RuntimeError, match="tracking server unreachable"):
        _train(model, optimizer, ramp, x, y, 100)
    failed = failures[0]
    assert (ramp.batch_size, ramp.micro_batch, ramp.accumulation) == (8, 4, 2)
    assert ramp.lr == failed.lr_before == 3e-2 and scheduler.base_lrs == [3e-2]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999) and ramp.events == []
    _train(model, optimizer, ramp, x, y, 20)  # the next reading past the bound grows it, now without error
    assert ramp.events and ramp.events[0].batch_before == 8
    assert ramp.lr == pytest.approx(3e-2 * math.sqrt(ramp.batch_size / 8))
    assert scheduler.base_lrs == [pytest.approx(ramp.lr)]
    ramp.close()


def test_a_failed_change_puts_adams_rescaled_moments_back():
    """A change rescales Adam's moments with its betas (carry_over); the undo of a failed change scales them back,
    so the state is the one the last good step left (to float rounding)."""
    model, x, y = _noisy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)

    def on_change(event):
        raise RuntimeError("tracking server unreachable")

    ramp = BatchRamp(optimizer, batch_size=8, max_batch=64, max_micro_batch=32, patience=2, min_updates=5,
                     on_change=on_change)  # fmt: skip
    last_good = {}

    def save_state():
        last_good.update(
            {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
        )

    with pytest.raises(RuntimeError, match="tracking server unreachable"):
        _train(model, optimizer, ramp, x, y, 100, after_update=save_state)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999) and last_good
    for param, state in last_good.items():
        for key, value in state.items():
            torch.testing.assert_close(optimizer.state[param][key], value, rtol=1e-6, atol=0)
    ramp.close()


# ------------------------------------------------------------------------------------------- the example


@pytest.mark.usefixtures("one_thread")
def test_the_plain_loop_example_grows_its_batch_and_needs_fewer_steps_than_fixed_16(capsys):
    """examples/ramp_plain_loop.py as a user runs it (~5 s): the ramp grows, and on seed 0 reaches digits'
    target in fewer optimizer steps than the same loop held at 16, for no more samples."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "ramp_plain_loop.py"
    spec = importlib.util.spec_from_file_location("ramp_plain_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--seed", "0"])
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == "ramp from 16:"
        and out[1].startswith("  batch ramp at step ")
        and "batch 16 -> 32" in out[1]
    )
    reached = [line for line in out if "validation loss < 0.12 after" in line]
    assert len(reached) == 2 and "fixed 16:" in out

    def steps_samples(line):
        words = line.split()
        return int(words[words.index("optimizer") - 1]), int(words[words.index("samples") - 1])

    (ramp_steps, ramp_samples), (fixed_steps, fixed_samples) = map(steps_samples, reached)
    assert ramp_steps < fixed_steps and ramp_samples <= fixed_samples
