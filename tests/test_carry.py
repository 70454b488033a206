"""Hyper-parameters carried across a batch change: the pure rules (advice.transfer) and a live optimizer (carry_over)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchlab.advice.transfer import carry_hyperparameters
from batchlab.training import carry_over


def _params():
    torch.manual_seed(0)
    return list(nn.Linear(4, 3).parameters())


def test_adamw_sqrt_rule_and_weight_decay_timescale_kept():
    opt = torch.optim.AdamW(_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    carry = carry_over(opt, 32, 128)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(2e-3)  # sqrt(4)
    assert group["betas"] == pytest.approx((0.6, 0.996))  # 1 - beta -> 4 (1 - beta)
    assert group["eps"] == pytest.approx(5e-9)
    assert group["weight_decay"] == pytest.approx(0.2)  # lambda x k eta/eta' = 0.1 x 4 / 2
    tau = lambda b, lr, wd: b / (lr * wd)  # noqa: E731 -- B/(eta lambda D), D the same on both sides
    assert tau(128, group["lr"], group["weight_decay"]) == pytest.approx(tau(32, 1e-3, 0.1))
    assert (carry.old_batch, carry.new_batch, carry.rule, carry.optimizer) == (32, 128, "sqrt", "AdamW")


def test_sgd_linear_rule_keeps_weight_decay_and_momentum():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    carry = carry_over(opt, 64, 256)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (pytest.approx(0.4), 5e-4, 0.9)
    # The decay per epoch, eta lambda D / B, is what is kept: equal before and after.
    assert 0.1 * 5e-4 / 64 == pytest.approx(group["lr"] * group["weight_decay"] / 256)
    assert [c.name for c in carry.changes] == ["lr", "weight_decay", "momentum"]


def test_sgd_under_the_sqrt_rule_scales_weight_decay_to_keep_the_timescale():
    carry = carry_hyperparameters([{"lr": 0.1, "weight_decay": 1e-4}], 16, 64, optimizer="SGD", rule="sqrt")
    assert carry.groups[0] == {"lr": pytest.approx(0.2), "weight_decay": pytest.approx(2e-4)}


def test_adam_coupled_l2_is_kept_and_decoupled_flag_decays_like_adamw():
    coupled = carry_hyperparameters([{"lr": 1e-3, "weight_decay": 0.01}], 8, 32, optimizer="Adam")
    decoupled = carry_hyperparameters(
        [{"lr": 1e-3, "weight_decay": 0.01, "decoupled_weight_decay": True}], 8, 32, optimizer="Adam"
    )
    assert coupled.groups[0]["weight_decay"] == 0.01
    assert decoupled.groups[0]["weight_decay"] == pytest.approx(0.02)
    assert "part of the objective" in coupled.changes[-1].rule


def test_rmsprop_alpha_maps_as_beta2():
    opt = torch.optim.RMSprop(_params(), lr=0.01, alpha=0.99)
    carry_over(opt, 32, 64)
    assert opt.param_groups[0]["alpha"] == pytest.approx(0.98)


def test_per_group_values_and_scheduler_base_lrs_follow():
    params = _params()
    opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    carry_over(opt, 16, 64, schedulers=[sched])
    assert [g["weight_decay"] for g in opt.param_groups] == [pytest.approx(0.1), 0.0]
    assert sched.base_lrs == [pytest.approx(2e-3), pytest.approx(2e-3)]
    assert [g["initial_lr"] for g in opt.param_groups] == [pytest.approx(2e-3)] * 2
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3)] * 2  # 0.5 x 1e-3, carried x 2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3)] * 2  # the schedule at the new scale


def test_warmup_counted_in_samples_and_accumulation_within_the_fitted_micro_batch():
    opt = torch.optim.Adam(_params(), lr=1e-3)
    carry = carry_over(opt, 32, 256, warmup_steps=100, max_micro_batch=96)
    assert carry.warmup_steps == 13  # ceil(100 x 32 / 256): 3200 samples
    assert (carry.plan.micro_batch, carry.plan.accumulation_steps) == (64, 4)
    assert carry.plan.micro_batch <= 96


def test_apply_false_computes_only_and_capturable_tensor_lr_is_written_in_place():
    opt = torch.optim.Adam(_params(), lr=torch.tensor(1e-3), capturable=True)
    lr_tensor = opt.param_groups[0]["lr"]
    carry = carry_over(opt, 8, 32, apply=False)
    assert float(lr_tensor) == pytest.approx(1e-3) and carry.groups[0]["lr"] == pytest.approx(2e-3)
    carry_over(opt, 8, 32)
    assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(2e-3)


def test_audit_prints_each_value_before_and_after_with_rule_and_source():
    opt = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=0.1)
    text = carry_over(opt, 32, 128, warmup_steps=10).audit()
    assert text.splitlines()[0] == "batch 32 -> 128 (k = 4), AdamW, rule 'sqrt'"
    assert "group 0 lr: 0.001 -> 0.002  [sqrt: lr x 2; Malladi et al. 2022]" in text
    assert "group 0 weight_decay: 0.1 -> 0.2" in text and "Power Lines" in text
    assert "warmup_steps: 10 -> 3  [320 samples kept" in text
    d = carry_over(opt, 128, 128, apply=False).to_dict()
    assert d["changes"][0] == {"name": "lr", "group": 0, "before": 0.002, "after": 0.002,
                               "rule": "sqrt: lr x 1", "source": "Malladi et al. 2022"}  # fmt: skip


def test_unknown_optimizer_is_a_one_line_error_listing_the_known_ones_or_takes_a_rule():
    opt = torch.optim.Adagrad(_params(), lr=0.01, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"^no batch-change rule for optimizer 'Adagrad': known ones are SGD, Adam, AdamW, NAdam, RAdam, RMSprop; pass rule="):  # fmt: skip
        carry_over(opt, 8, 16)
    carry = carry_over(opt, 8, 32, rule="sqrt")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and "unknown" in carry.changes[-1].rule


def test_a_subclass_of_a_torch_optimizer_uses_its_base_rule():
    class MyAdamW(torch.optim.AdamW):
        pass

    assert carry_over(MyAdamW(_params(), lr=1e-3), 8, 32).optimizer == "AdamW"


def test_bad_arguments_fail_before_anything_is_written():
    opt = torch.optim.AdamW(_params(), lr=1e-3)
    with pytest.raises(ValueError, match="invalid new_batch 0: expected an int >= 1"):
        carry_over(opt, 8, 0)
    with pytest.raises(ValueError, match="invalid rule 'cubic'"):
        carry_over(opt, 8, 16, rule="cubic")
    with pytest.raises(ValueError, match="rule 'adascale' needs noise_scale"):
        carry_over(opt, 8, 16, rule="adascale")
    assert opt.param_groups[0]["lr"] == 1e-3


def test_a_failed_write_puts_every_group_back():
    class Fragile(dict):
        """A param group whose weight_decay cannot be written (after lr and betas were)."""

        def __setitem__(self, key, value):
            if key == "weight_decay" and value != self.get(key):
                raise RuntimeError("read-only weight_decay")
            super().__setitem__(key, value)

    opt = torch.optim.AdamW(_params(), lr=1e-3)
    opt.param_groups[0] = Fragile(opt.param_groups[0])
    before = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    with pytest.raises(RuntimeError, match="read-only weight_decay"):
        carry_over(opt, 8, 32)
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == before


def test_adascale_carries_the_gain():
    carry = carry_hyperparameters([{"lr": 0.1}], 32, 128, optimizer="SGD", rule="adascale", noise_scale=64)
    assert carry.lr_factor == pytest.approx((1 + 64 / 32) / (1 + 64 / 128)) and math.isfinite(carry.k)


def test_keep_leaves_named_values_as_they_are_and_says_so():
    opt = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=0.1)
    carry = carry_over(opt, 8, 64, keep=("betas",))
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] < 1e-8
    assert "group 0 betas: (0.9, 0.999) -> (0.9, 0.999)  [kept on request; keep=]" in carry.audit()
    with pytest.raises(
        ValueError, match=r"^invalid keep entry 'lr': expected one of 'betas', 'alpha', 'eps'"
    ):
        carry_over(opt, 8, 64, keep=("lr",))


def test_a_large_batch_change_keeps_beta1_past_the_sde_bound_and_the_audit_says_so():
    """k = 32 (advise_check run 4, MNIST-1D): k(1 - beta1) = 3.2 is past 0.5, so beta1 stays 0.9 (it was clamped
    to 0); beta2 (k(1 - beta2) = 0.032) and RMSprop's alpha inside the bound map as before."""
    opt = torch.optim.Adam(_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    carry = carry_over(opt, 32, 1024)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.968))
    assert (
        "group 0 betas: (0.9, 0.999) -> (0.9, 0.968)  [beta1 kept: k(1 - beta1) = 3.2 > 0.5, past the SDE "
        "rule's bound; beta2: 1 - beta -> k(1 - beta); Malladi et al. 2022]" in carry.audit()
    )
    assert "note: group 0: beta1 0.9 kept: k(1 - beta1) = 32*(1 - 0.9) = 3.2 is past 0.5" in carry.audit()
    small = carry_hyperparameters([{"lr": 1e-3, "betas": (0.9, 0.999)}], 32, 128, optimizer="Adam")
    assert small.groups[0]["betas"] == pytest.approx((0.6, 0.996)) and not small.notes
    assert "[1 - beta -> k(1 - beta); Malladi et al. 2022]" in small.audit()
    rms = torch.optim.RMSprop(_params(), lr=0.01, alpha=0.99)
    carry = carry_over(rms, 32, 2048)  # k(1 - alpha) = 0.64
    assert rms.param_groups[0]["alpha"] == 0.99
    assert (
        "alpha kept: k(1 - alpha) = 0.64 > 0.5, past the SDE rule's bound (RMSprop's beta2)" in carry.audit()
    )


def _trained(optimizer_class, steps=34, **options):
    """A parameter after ``steps`` Adam-type steps under a constant gradient (so every update reads exactly lr)."""
    param = nn.Parameter(torch.zeros(4))
    opt = optimizer_class([param], lr=1e-3, **options)
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for _ in range(steps):
        param.grad = grad.clone()
        opt.step()
    return param, opt, grad


def _updates_over_lr(param, opt, grad, steps=5):
    out = []
    for _ in range(steps):
        before = param.detach().clone()
        param.grad = grad.clone()
        opt.step()
        out.append(((param.detach() - before).abs() / opt.param_groups[0]["lr"]).max().item())
    return out


@pytest.mark.parametrize("optimizer_class, options", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.0}),
                                                      (torch.optim.Adam, {"amsgrad": True}),
                                                      (torch.optim.Adam, {"foreach": True}),
                                                      (torch.optim.Adam, {"fused": True})])  # fmt: skip
def test_a_change_of_the_betas_early_in_training_keeps_adams_bias_corrected_moments(optimizer_class, options):
    """torch divides Adam's moments by 1 - beta^t with the group's current beta: after beta2 0.999 -> 0.992 at
    step 34 the same v would read 6x too small and the next update would be 2.44x lr. Rescaled, the update under a
    constant gradient stays lr, at the new lr, from the first step after the change."""
    param, opt, grad = _trained(optimizer_class, **options)
    carry = carry_over(opt, 16, 128)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.992))
    assert _updates_over_lr(param, opt, grad) == pytest.approx([1.0] * 5, rel=1e-5)
    factor = (1 - 0.992**34) / (1 - 0.999**34)
    shown = f"exp_avg_sq x{factor:.4g}" + (f", max_exp_avg_sq x{factor:.4g}" if "amsgrad" in options else "")
    assert (
        f"note: group 0: {shown}, so the bias-corrected moments read as before the betas changed"
        in carry.audit()
    )
    param, opt, grad = _trained(optimizer_class, **options)
    carry_over(opt, 16, 128, keep=("betas",))  # nothing to rescale: the moments are left bitwise
    assert _updates_over_lr(param, opt, grad, 1) == pytest.approx([1.0], rel=1e-5)


def test_a_doubling_rescales_both_moments_and_nadam_only_its_second():
    param, opt, grad = _trained(torch.optim.Adam, steps=10)
    carry = carry_over(opt, 16, 32)  # beta1 0.9 -> 0.8, beta2 0.999 -> 0.998
    m = f"{(1 - 0.8**10) / (1 - 0.9**10):.4g}"
    assert f"group 0: exp_avg x{m}, exp_avg_sq x{(1 - 0.998**10) / (1 - 0.999**10):.4g}," in carry.audit()
    assert _updates_over_lr(param, opt, grad) == pytest.approx([1.0] * 5, rel=1e-5)
    param, opt, grad = _trained(torch.optim.NAdam, steps=10)
    exp_avg = opt.state[param]["exp_avg"].clone()
    carry = carry_over(opt, 16, 32)
    assert torch.equal(opt.state[param]["exp_avg"], exp_avg)  # corrected by mu_product, fixed step by step
    assert "group 0: exp_avg_sq x" in carry.audit() and "exp_avg x" not in carry.audit()


def test_undoing_a_carry_puts_the_moments_back_and_an_unknown_optimizer_keeps_its_state():
    from batchlab.training.carry import hyperparameter_snapshot

    param, opt, _ = _trained(torch.optim.Adam, steps=20)
    state = {key: value.clone() for key, value in opt.state[param].items()}
    restore = hyperparameter_snapshot(opt)
    carry_over(opt, 16, 64)
    assert not torch.allclose(opt.state[param]["exp_avg_sq"], state["exp_avg_sq"])
    restore()
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["lr"] == 1e-3
    for key, value in state.items():
        torch.testing.assert_close(opt.state[param][key], value, rtol=1e-6, atol=0)
    param, opt, _ = _trained(torch.optim.Adamax, steps=5)
    state = {key: value.clone() for key, value in opt.state[param].items()}
    carry = carry_over(opt, 16, 32, rule="sqrt")
    assert (
        "note: group 0: Adamax's state is kept as it is: how it bias-corrects its moments is unknown"
        in carry.audit()
    )
    assert all(torch.equal(opt.state[param][key], value) for key, value in state.items())


def test_bias_correction_rescale_is_one_before_the_first_step_and_late_in_training():
    from batchlab.advice.transfer import bias_correction_rescale

    assert bias_correction_rescale(0.999, 0.992, 34) == pytest.approx(7.145, rel=1e-3)
    assert bias_correction_rescale(0.999, 0.992, 0) == 1.0
    assert bias_correction_rescale(0.9, 0.8, 10_000) == 1.0
    with pytest.raises(ValueError, match="invalid step -1"):
        bias_correction_rescale(0.9, 0.8, -1)
    with pytest.raises(ValueError, match=r"invalid beta_before 1.0: expected a decay rate in \[0, 1\)"):
        bias_correction_rescale(1.0, 0.8, 5)
