"""batchlab.scaling: LR rules, accumulation plans and epoch arithmetic, table-driven."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

from batchlab.advice.scaling import RULES, SDE_BETA_BOUND, plan_batch, scale_lr, schedule

# ---------------------------------------------------------------------------------------------- scale_lr

# (lr, base_batch, new_batch, rule, kwargs) -> (lr, betas, eps, warmup_epochs)
SCALE_CASES = [
    # linear (Goyal et al. 2017): lr·k, 5 warmup epochs only when the batch grows
    ((0.1, 256, 1024, "linear", {}), (0.4, None, None, 5.0)),
    ((0.1, 256, 128, "linear", {}), (0.05, None, None, 0.0)),
    ((0.1, 256, 256, "linear", {}), (0.1, None, None, 0.0)),
    ((0.1, 256, 1024, "linear", {"betas": (0.9, 0.999)}), (0.4, (0.9, 0.999), None, 5.0)),  # passed through
    # sqrt (Malladi et al. 2022): lr·√k, 1-β -> k(1-β), ε/√k
    ((1e-3, 32, 128, "sqrt", {}), (2e-3, None, None, 0.0)),
    ((1e-3, 32, 128, "sqrt", {"betas": (0.9, 0.999), "eps": 1e-8}), (2e-3, (0.6, 0.996), 5e-9, 0.0)),
    ((1e-3, 128, 32, "sqrt", {"betas": (0.9, 0.999), "eps": 1e-8}), (5e-4, (0.975, 0.99975), 2e-8, 0.0)),
    (
        (1e-3, 32, 160, "sqrt", {"betas": (0.9, 0.999)}),
        (math.sqrt(5) * 1e-3, (0.5, 0.995), None, 0.0),
    ),  # k(1-β1) = 0.5
    ((1e-3, 32, 512, "sqrt", {"betas": (0.9, 0.999)}), (4e-3, (0.9, 0.984), None, 0.0)),  # β1 kept: 1.6 > 0.5
    ((1e-3, 32, 32, "sqrt", {"betas": (0.0, 0.5), "eps": 0.0}), (1e-3, (0.0, 0.5), 0.0, 0.0)),
    # adascale (Johnson et al. 2020): r = (1 + B_noise/B0)/(1 + B_noise/B)
    ((1e-3, 32, 128, "adascale", {"noise_scale": 64}), (2e-3, None, None, 0.0)),  # (1+2)/(1+0.5)
    ((1e-3, 32, 128, "adascale", {"noise_scale": 0}), (1e-3, None, None, 0.0)),  # no noise: gain 1
    ((1e-3, 32, 128, "adascale", {"noise_scale": math.inf}), (4e-3, None, None, 0.0)),  # all noise: k
    ((1e-3, 128, 32, "adascale", {"noise_scale": 64}), (5e-4, None, None, 0.0)),  # (1+0.5)/(1+2)
    # none
    ((3e-4, 32, 4096, "none", {"betas": (0.9, 0.95), "eps": 1e-6}), (3e-4, (0.9, 0.95), 1e-6, 0.0)),
]


@pytest.mark.parametrize(("args", "expected"), SCALE_CASES)
def test_scale_lr_table(args, expected):
    lr, base, new, rule, kwargs = args
    want_lr, want_betas, want_eps, want_warmup = expected
    out = scale_lr(lr, base, new, rule, **kwargs)
    assert out.rule == rule and out.k == new / base
    assert out.lr == pytest.approx(want_lr, rel=1e-12)
    assert out.factor == pytest.approx(want_lr / lr, rel=1e-12)
    assert out.warmup_epochs == want_warmup
    if want_betas is None:
        assert out.betas is None
    else:
        assert out.betas == pytest.approx(want_betas, rel=1e-12, abs=1e-15)
    assert out.eps == (None if want_eps is None else pytest.approx(want_eps, rel=1e-12))
    json.dumps(out.to_dict(), allow_nan=False)


def test_scale_lr_default_rule_is_sqrt():
    assert scale_lr(1e-3, 32, 128).rule == "sqrt"


@pytest.mark.parametrize(
    ("k", "betas", "mapped", "kept"),
    [
        (4, (0.9, 0.999), (0.6, 0.996), ()),  # k(1 - beta1) = 0.4: mapped, as before the bound
        (5, (0.9, 0.999), (0.5, 0.995), ()),  # 0.5: on the bound, still mapped
        (1 / 4, (0.9, 0.999), (0.975, 0.99975), ()),  # a shrinking batch is always inside it
        (6, (0.9, 0.999), (0.9, 0.994), ("beta1",)),  # 0.6 > 0.5: beta1 kept, beta2 (0.006) mapped
        (32, (0.9, 0.999), (0.9, 0.968), ("beta1",)),  # advise_check run 4's k: beta1 was clamped to 0
        (64, (0.9, 0.99), (0.9, 0.99), ("beta1", "beta2")),  # 6.4 and 0.64: both kept
    ],
)
def test_sqrt_rule_keeps_a_beta_past_the_sde_bound_and_says_so(k, betas, mapped, kept):
    """1 - beta -> k(1 - beta) while k(1 - beta) <= SDE_BETA_BOUND (0.5, scaling.py says why); past it the beta
    is kept, named in kept_betas and in a note with its k(1 - beta) -- never clamped to 0 (issue 13)."""
    out = scale_lr(1e-3, 32, round(32 * k), "sqrt", betas=betas)
    assert SDE_BETA_BOUND == 0.5
    assert out.betas == pytest.approx(mapped, rel=1e-12) and out.kept_betas == kept
    assert out.lr == pytest.approx(1e-3 * math.sqrt(k))  # the LR follows the rule either way
    for name, beta in zip(("beta1", "beta2"), betas):
        said = [n for n in out.notes if n.startswith(f"{name} {beta:g} kept: k(1 - {name}) = ")]
        assert len(said) == (name in kept)
        if said:
            assert f"= {k * (1 - beta):.3g} is past 0.5" in said[0]
    assert out.to_dict()["kept_betas"] == list(kept)


def test_scale_lr_linear_warmup_note_and_unused_noise_scale_note():
    out = scale_lr(0.1, 256, 1024, "linear", noise_scale=100.0)
    assert any("5 epochs" in n for n in out.notes)
    assert any("noise_scale is used only by rule 'adascale'" in n for n in out.notes)


NAN = float("nan")
BAD_SCALE_ARGS = [
    # (kwargs overriding a valid call, substring the message must contain)
    ({"lr": 0}, "invalid lr 0: expected a number > 0"),
    ({"lr": -0.1}, "invalid lr -0.1: expected a number > 0"),
    ({"lr": NAN}, "invalid lr nan: expected a number > 0"),
    ({"lr": math.inf}, "invalid lr inf: expected a number > 0"),
    ({"lr": True}, "invalid lr True: expected a number > 0"),
    ({"lr": "0.1"}, "invalid lr '0.1': expected a number > 0"),
    ({"base_batch": 0}, "invalid base_batch 0: expected an int >= 1"),
    ({"base_batch": -32}, "invalid base_batch -32: expected an int >= 1"),
    ({"base_batch": 32.0}, "invalid base_batch 32.0: expected an int >= 1"),
    ({"base_batch": NAN}, "invalid base_batch nan: expected an int >= 1"),
    ({"base_batch": True}, "invalid base_batch True: expected an int >= 1"),
    ({"new_batch": 0}, "invalid new_batch 0: expected an int >= 1"),
    ({"new_batch": False}, "invalid new_batch False: expected an int >= 1"),
    ({"rule": "cubic"}, "invalid rule 'cubic': expected one of 'linear', 'sqrt', 'adascale', 'none'"),
    ({"rule": None}, "invalid rule None"),
    ({"rule": "adascale"}, "rule 'adascale' needs noise_scale"),
    ({"rule": "adascale", "noise_scale": -1.0}, "invalid noise_scale -1.0: expected a number >= 0 or inf"),
    ({"rule": "adascale", "noise_scale": NAN}, "invalid noise_scale nan: expected a number >= 0 or inf"),
    ({"rule": "adascale", "noise_scale": True}, "invalid noise_scale True: expected a number >= 0 or inf"),
    ({"betas": (1.0, 0.999)}, "beta1 must be a number in [0, 1), got 1.0"),
    ({"betas": (0.9, -0.1)}, "beta2 must be a number in [0, 1), got -0.1"),
    ({"betas": (0.9, NAN)}, "beta2 must be a number in [0, 1), got nan"),
    ({"betas": (0.9,)}, "betas must be a pair (beta1, beta2)"),
    ({"betas": 0.9}, "betas must be a pair (beta1, beta2) with each in [0, 1), got 0.9"),
    ({"eps": -1e-8}, "invalid eps -1e-08: expected a number >= 0"),
    ({"eps": NAN}, "invalid eps nan: expected a number >= 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_SCALE_ARGS)
def test_scale_lr_rejects(override, message):
    kwargs = {"lr": 1e-3, "base_batch": 32, "new_batch": 128, "rule": "sqrt", **override}
    with pytest.raises(ValueError, match=re.escape(message)):
        scale_lr(**kwargs)


def test_rules_constant():
    assert RULES == ("linear", "sqrt", "adascale", "none")


# ---------------------------------------------------------------------------------------------- plan_batch

# (target, max_micro, world) -> (micro, accumulation, effective, difference)
PLAN_CASES = [
    ((256, 64, 1), (64, 4, 256, 0)),
    ((256, 32, 2), (32, 4, 256, 0)),
    ((256, 512, 1), (256, 1, 256, 0)),  # fits: no accumulation
    ((100, 64, 1), (50, 2, 100, 0)),  # fewest steps (2), not 64 + remainder
    ((96, 40, 1), (32, 3, 96, 0)),
    ((1, 1, 1), (1, 1, 1, 0)),
    ((127, 64, 1), (1, 127, 127, 0)),  # prime: exact only as 127 × 1; the note names the fuller split
    ((256, 64, 3), (17, 5, 255, -1)),  # world does not divide: 255 (-1) is nearer than 258 (+2)
    ((10, 64, 4), (2, 1, 8, -2)),  # tie between 8 and 12: the smaller
    ((11, 64, 4), (3, 1, 12, 1)),  # 12 (+1) is nearer than 8 (-3)
    ((3, 8, 4), (1, 1, 4, 1)),  # fewer samples than ranks: one each
    ((1000, 48, 8), (25, 5, 1000, 0)),
]


@pytest.mark.parametrize(("args", "expected"), PLAN_CASES)
def test_plan_batch_table(args, expected):
    plan = plan_batch(*args)
    assert (plan.micro_batch, plan.accumulation_steps, plan.effective_batch, plan.difference) == expected
    assert plan.world_size == args[2] and plan.target_global_batch == args[0]
    assert plan.exact == (expected[3] == 0)
    assert plan.per_rank_batch == plan.micro_batch * plan.accumulation_steps
    json.dumps(plan.to_dict())


def test_plan_batch_notes_say_what_happened():
    assert plan_batch(256, 64).note == "exact: 64 per micro-batch × 4 accumulation steps = 256"
    inexact = plan_batch(10, 64, 4).note
    assert "10 is not a multiple of world size 4" in inexact and "2 fewer than asked" in inexact
    prime = plan_batch(127, 64).note
    assert "needs 127 accumulation steps of 1" in prime and "2 steps of 64 would give 128 (+1)" in prime


@given(
    target=st.integers(1, 5000),
    max_micro=st.integers(1, 600),
    world=st.integers(1, 16),
)
def test_plan_batch_properties(target, max_micro, world):
    plan = plan_batch(target, max_micro, world)
    assert 1 <= plan.micro_batch <= max_micro
    assert plan.effective_batch == plan.micro_batch * plan.accumulation_steps * world
    assert plan.exact == (target % world == 0)
    # nearest multiple of world (at least world), smaller on a tie
    best = min(
        range(max(1, target // world), target // world + 2), key=lambda n: (abs(n * world - target), n)
    )
    assert plan.effective_batch == best * world
    # no exact split of the per-rank batch has fewer accumulation steps
    for a in range(1, plan.accumulation_steps):
        assert plan.per_rank_batch % a or plan.per_rank_batch // a > max_micro


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 64, 1), "invalid target_global_batch 0: expected an int >= 1"),
        ((-256, 64, 1), "invalid target_global_batch -256: expected an int >= 1"),
        ((256.0, 64, 1), "invalid target_global_batch 256.0: expected an int >= 1"),
        ((NAN, 64, 1), "invalid target_global_batch nan: expected an int >= 1"),
        ((True, 64, 1), "invalid target_global_batch True: expected an int >= 1"),
        ((256, 0, 1), "invalid max_micro_batch 0: expected an int >= 1"),
        ((256, -1, 1), "invalid max_micro_batch -1: expected an int >= 1"),
        ((256, 64, 0), "invalid world_size 0: expected an int >= 1"),
        ((256, 64, False), "invalid world_size False: expected an int >= 1"),
    ],
)
def test_plan_batch_rejects(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_batch(*args)


# ------------------------------------------------------------------------------------------------ schedule

# (dataset_size, batch_size, epochs, accumulation, world_size, drop_last) ->
# (iterations/epoch, last batch, steps/epoch, last step's micro-batches, samples/epoch, padded, dropped)
SCHEDULE_CASES = [
    ((1000, 32, 3, 1, 1, False), (32, 8, 32, 1, 1000, 0, 0)),
    ((1000, 32, 3, 1, 1, True), (31, 32, 31, 1, 992, 0, 8)),
    ((1024, 32, 2, 4, 1, False), (32, 32, 8, 4, 1024, 0, 0)),  # everything divides
    ((1000, 32, 1, 5, 1, False), (32, 8, 7, 2, 1000, 0, 0)),  # partial last accumulation still steps
    ((1000, 32, 1, 1, 3, False), (11, 14, 11, 1, 1002, 2, 0)),  # 334 per rank: sampler pads 2
    ((1000, 32, 1, 1, 3, True), (10, 32, 10, 1, 960, 0, 40)),  # 333 per rank, 13 of them dropped per rank
    ((100, 256, 1, 1, 1, False), (1, 100, 1, 1, 100, 0, 0)),  # batch > dataset: one short batch
    ((100, 256, 1, 1, 2, False), (1, 50, 1, 1, 100, 0, 0)),
    ((3, 8, 1, 1, 4, False), (1, 1, 1, 1, 4, 1, 0)),  # fewer samples than ranks: padded to one each
    ((10, 3, 2, 8, 1, False), (4, 1, 1, 4, 10, 0, 0)),  # accumulation > iterations: one partial step
]


@pytest.mark.parametrize(("args", "expected"), SCHEDULE_CASES)
def test_schedule_table(args, expected):
    s = schedule(*args)
    got = (
        s.iterations_per_epoch,
        s.last_batch_size,
        s.steps_per_epoch,
        s.last_step_micro_batches,
        s.samples_per_epoch,
        s.padded_samples,
        s.dropped_samples,
    )
    assert got == expected
    n, b, e, a, w, _ = args
    assert s.global_batch == b * a * w
    assert s.total_iterations == s.iterations_per_epoch * e and s.total_steps == s.steps_per_epoch * e
    assert s.total_samples == s.samples_per_epoch * e
    json.dumps(s.to_dict())


def test_schedule_notes():
    assert schedule(1024, 32, 1).note == "every epoch divides evenly"
    assert "accumulates 2 of 5 micro-batches" in schedule(1000, 32, 1, accumulation=5).note
    assert "repeats 2 sample(s)" in schedule(1000, 32, 1, world_size=3).note
    assert "40 sample(s) per epoch are dropped" in schedule(1000, 32, 1, world_size=3, drop_last=True).note
    assert "one short batch per epoch" in schedule(100, 256, 1).note


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((100, 256, 1, 1, 1, True), "batch_size 256 with drop_last=True is larger than the 100 samples"),
        ((100, 64, 1, 1, 2, True), "batch_size 64 with drop_last=True is larger than the 50 samples"),
        ((3, 1, 1, 1, 4, True), "dataset_size 3 is smaller than world_size 4"),
    ],
)
def test_schedule_zero_iterations_raise(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedule(*args)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_schedule_matches_dataloader_and_distributed_sampler(world, drop_last):
    """The counts agree with what torch's DataLoader + DistributedSampler actually yield, on every rank."""
    for n in (1, 7, 10, 100, 101):
        for b in (1, 3, 10, 64, 200):
            loaders = [
                DataLoader(
                    range(n),
                    batch_size=b,
                    sampler=DistributedSampler(
                        range(n), num_replicas=world, rank=r, shuffle=False, drop_last=drop_last
                    ),
                    drop_last=drop_last,
                )
                for r in range(world)
            ]
            batches = [[len(x) for x in loader] for loader in loaders]
            if not batches[0]:
                with pytest.raises(ValueError, match="drop_last=True"):
                    schedule(n, b, 1, world_size=world, drop_last=drop_last)
                continue
            s = schedule(n, b, 1, world_size=world, drop_last=drop_last)
            for rank_batches in batches:
                assert len(rank_batches) == s.iterations_per_epoch, (n, b)
                assert rank_batches[-1] == s.last_batch_size, (n, b)
            assert sum(map(sum, batches)) == s.samples_per_epoch, (n, b)
            seen = {int(i) for loader in loaders for x in loader for i in x}
            assert n - len(seen) == s.dropped_samples, (n, b)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dataset_size": 0}, "invalid dataset_size 0: expected an int >= 1"),
        ({"dataset_size": -5}, "invalid dataset_size -5: expected an int >= 1"),
        ({"dataset_size": NAN}, "invalid dataset_size nan: expected an int >= 1"),
        ({"batch_size": 0}, "invalid batch_size 0: expected an int >= 1"),
        ({"batch_size": 32.5}, "invalid batch_size 32.5: expected an int >= 1"),
        ({"batch_size": True}, "invalid batch_size True: expected an int >= 1"),
        ({"epochs": 0}, "invalid epochs 0: expected an int >= 1"),
        ({"epochs": -1}, "invalid epochs -1: expected an int >= 1"),
        ({"accumulation": 0}, "invalid accumulation 0: expected an int >= 1"),
        ({"accumulation": NAN}, "invalid accumulation nan: expected an int >= 1"),
        ({"world_size": 0}, "invalid world_size 0: expected an int >= 1"),
        ({"world_size": True}, "invalid world_size True: expected an int >= 1"),
        ({"drop_last": "yes"}, "invalid drop_last 'yes': expected True or False"),
        ({"drop_last": 1}, "invalid drop_last 1: expected True or False"),
    ],
)
def test_schedule_rejects(override, message):
    kwargs = {"dataset_size": 1000, "batch_size": 32, "epochs": 1, **override}
    with pytest.raises(ValueError, match=re.escape(message)):
        schedule(**kwargs)
