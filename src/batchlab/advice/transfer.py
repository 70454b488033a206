"""Hyper-parameters carried across a batch change: LR, Adam betas and eps, weight decay, warm-up, accumulation.

Pure functions over numbers (no torch): given an optimizer's param-group values (``lr``, ``betas``, ``eps``,
``weight_decay``, ...), the old and the new global batch and a rule, :func:`carry_hyperparameters` returns
the values to use at the new batch and an audit of every value before and after, with the rule and its
source. :func:`batchlab.training.carry_over` applies it to a live optimizer. Rules by optimizer
(:data:`OPTIMIZERS`), with k = B'/B:

- **LR, betas, eps** go through :func:`batchlab.advice.scaling.scale_lr` (not restated here): ``"linear"`` for
  SGD (Goyal et al. 2017), ``"sqrt"`` for Adam-type optimizers (Malladi et al. 2022's SDE rule: lr·√k,
  1−β → k(1−β), ε/√k). RMSprop's ``alpha`` is its β₂ and maps the same way (Malladi et al. treat RMSprop
  and Adam alike).
- **Decoupled weight decay** (AdamW; any group with ``decoupled_weight_decay=True``): keep the timescale
  τ = B/(η·λ·D) constant (Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale model and
  dataset size"; Bergsma et al. 2025, "Power Lines"). D, the dataset size, is the same before and after, so
  λ' = λ·k·η/η'; under the sqrt rule λ' = λ·√k. 1/τ is the fraction of the weights decayed per epoch.
- **SGD's weight decay** shrinks θ by η·λ per step too (θ ← θ − η(g + λθ)), so the same timescale is kept:
  the decay per epoch, η·λ·D/B. Under the linear rule that is λ' = λ, as in Goyal et al. 2017 (λ = 10⁻⁴ at
  every batch size while the LR scales linearly). Momentum is kept (they keep m = 0.9); torch's SGD buffers
  gradients (u ← m·u + g, θ ← θ − η·u), the form in which a change of η needs no momentum correction.
- **Adam's coupled L2** (``weight_decay`` with ``decoupled_weight_decay=False``): the term is part of the
  objective and passes through Adam's preconditioner, so it is not a decay with a timescale (Loshchilov &
  Hutter 2019); λ is kept.
- **Adam's moments** are divided by 1 − β^t with the current β, so a change of the betas at step t rescales
  them by :func:`bias_correction_rescale` (applied per parameter by ``carry_over``); the bias-corrected
  estimates, and so the next update, carry over unchanged.
- **Warm-up** is counted in samples: the remaining warm-up steps scale by B/B' (rounded up).
- **Accumulation**: :func:`batchlab.advice.scaling.plan_batch` splits the new batch into micro-batches of at
  most the fitted maximum; when it cannot hit the batch exactly (world size), the batch that runs is the one
  the hyper-parameters are carried to.

An optimizer this table does not know needs an explicit ``rule``; its weight decay is then left as it is (the
audit says so), since how it decays is unknown. The SDE rule is derived for small k(1 − β): a beta (or
RMSprop's ``alpha``) whose k(1 − β) passes :data:`batchlab.advice.scaling.SDE_BETA_BOUND` (0.5; β₁ = 0.9 at
k > 5) is kept, and the audit says so with the number. ``keep`` leaves named values as they are whatever k
(e.g. ``("betas",)``); the audit lists them as kept on request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from batchlab import checks
from batchlab.advice.scaling import RULES, SDE_BETA_BOUND, BatchPlan, plan_batch, scale_lr

__all__ = [
    "OPTIMIZERS",
    "OptimizerRule",
    "Change",
    "CarryOver",
    "bias_correction_rescale",
    "carry_hyperparameters",
    "optimizer_rule",
]

# The audit's sources, short (the module docstring has the titles).
GOYAL = "Goyal et al. 2017"
MALLADI = "Malladi et al. 2022"
ADASCALE = "Johnson et al. 2020 (AdaScale)"
TIMESCALE = "Wang & Aitchison 2024; Bergsma et al. 2025 (Power Lines)"
L2 = "Loshchilov & Hutter 2019"
SAMPLES = "warm-up counted in samples"
KEEPABLE = ("betas", "alpha", "eps", "weight_decay", "initial_lr")  # what keep= may leave as it is (not lr)
_RULE_SOURCE = {"linear": GOYAL, "sqrt": MALLADI, "adascale": ADASCALE, "none": "unchanged"}


@dataclass(frozen=True)
class OptimizerRule:
    """How an optimizer's hyper-parameters follow the batch: the LR ``rule`` (a :data:`RULES` name), whether
    its weight decay keeps a timescale (``decay``: ``"timescale"``, ``"objective"`` = kept as part of the
    loss, or ``"unknown"``), the keys kept unchanged as ``(key, why, source)``, and ``moments``: the state
    tensors torch divides by a bias correction 1 − β^t, as ``(state key, index of their beta)``, which a change
    of the betas rescales (:func:`bias_correction_rescale`)."""

    name: str
    rule: str
    decay: str
    kept: tuple[tuple[str, str, str], ...] = ()
    moments: tuple[tuple[str, int], ...] = ()


_NO_RULE = "kept: no rule known", "none"
# Adam's and RAdam's m and v are divided by 1 - beta1^t and 1 - beta2^t (AMSGrad's running maximum of v too);
# NAdam corrects m by the running product of its momentum schedule, fixed step by step, and v by 1 - beta2^t.
_ADAM_MOMENTS = (("exp_avg", 0), ("exp_avg_sq", 1), ("max_exp_avg_sq", 1))
OPTIMIZERS: dict[str, OptimizerRule] = {
    "SGD": OptimizerRule("SGD", "linear", "timescale",
                         (("momentum", "kept: torch's form needs no momentum correction", GOYAL),)),
    "Adam": OptimizerRule("Adam", "sqrt", "objective", moments=_ADAM_MOMENTS),
    "AdamW": OptimizerRule("AdamW", "sqrt", "timescale", moments=_ADAM_MOMENTS),
    "NAdam": OptimizerRule("NAdam", "sqrt", "objective", (("momentum_decay", *_NO_RULE),),
                           moments=(("exp_avg_sq", 1),)),
    "RAdam": OptimizerRule("RAdam", "sqrt", "objective", moments=_ADAM_MOMENTS[:2]),
    "RMSprop": OptimizerRule("RMSprop", "sqrt", "objective", (("momentum", *_NO_RULE),)),
}  # fmt: skip
"""The optimizers whose rules are known, by their torch.optim class name."""


def optimizer_rule(name: str, rule: str | None = None) -> OptimizerRule:
    """The rule for optimizer ``name``; ``rule`` overrides its LR rule. An unknown optimizer needs ``rule``."""
    if rule is not None:
        checks.choice("rule", rule, RULES)
    known = OPTIMIZERS.get(name)
    if known is None:
        if rule is None:
            raise ValueError(
                f"no batch-change rule for optimizer {name!r}: known ones are {', '.join(OPTIMIZERS)}; "
                f"pass rule= (one of {', '.join(RULES)}) to carry its lr (and betas/eps) by that rule"
            )
        return OptimizerRule(name, rule, "unknown")
    return known if rule is None else replace(known, rule=rule)


def bias_correction_rescale(beta_before: float, beta_after: float, step: float) -> float:
    """The factor that keeps a bias-corrected moment estimate as it was when its decay rate changes at ``step``.

    Adam divides its moments by 1 − β^t (Kingma & Ba 2015, Algorithm 1) and torch reads β from the param group
    at every step, so after β changes at step t the same moment reads as m/(1 − β'^t): another estimate, far
    off early in training (β₂ 0.999 -> 0.992 at t = 34 reads v 6x too small; the next update is 2.44x lr
    under a constant gradient, and still 1.9x five steps later). Scaled by (1 − β'^t)/(1 − β^t) the estimate is
    kept and the update under a constant gradient stays exactly lr. Late in training (β^t ≈ 0) the factor is 1.
    """
    checks.number("step", step, inclusive=True)
    for name, beta in (("beta_before", beta_before), ("beta_after", beta_after)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"invalid {name} {beta!r}: expected a decay rate in [0, 1)")
    if step == 0 or beta_before == beta_after:
        return 1.0
    return (1.0 - beta_after**step) / (1.0 - beta_before**step)


@dataclass(frozen=True)
class Change:
    """One value before and after a batch change, in param group ``group`` (-1: not a group's value)."""

    name: str
    group: int
    before: Any
    after: Any
    rule: str
    source: str

    def to_dict(self) -> dict:
        """Plain dict of every field (tuples as lists)."""
        d = asdict(self)
        for key in ("before", "after"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    def line(self) -> str:
        where = f"group {self.group} " if self.group >= 0 else ""
        return (
            f"{where}{self.name}: {_show(self.before)} -> {_show(self.after)}  [{self.rule}; {self.source}]"
        )


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)


@dataclass(frozen=True)
class CarryOver:
    """The hyper-parameters for a new batch: ``groups`` (each param group's new values, only the keys that
    were given), ``changes`` (the audit, one :class:`Change` per value), ``plan`` (the micro-batch split, or
    None without a ``max_micro_batch``), ``warmup_steps`` (the remaining warm-up at the new batch, or None).
    ``new_batch`` is the batch that runs (the plan's, when it could not hit the one asked exactly)."""

    optimizer: str
    rule: str
    old_batch: int
    new_batch: int
    k: float
    lr_factor: float
    groups: tuple[dict[str, Any], ...]
    changes: tuple[Change, ...]
    plan: BatchPlan | None
    warmup_steps: int | None
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field."""
        return {
            "optimizer": self.optimizer,
            "rule": self.rule,
            "old_batch": self.old_batch,
            "new_batch": self.new_batch,
            "k": self.k,
            "lr_factor": self.lr_factor,
            "groups": [
                {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in self.groups
            ],
            "changes": [c.to_dict() for c in self.changes],
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "warmup_steps": self.warmup_steps,
            "notes": list(self.notes),
        }

    def audit(self) -> str:
        """The audit as text: the batch change, then each value before and after with its rule and source."""
        head = f"batch {self.old_batch} -> {self.new_batch} (k = {self.k:.4g}), {self.optimizer}, rule {self.rule!r}"
        lines = [head, *(f"  {c.line()}" for c in self.changes), *(f"  note: {n}" for n in self.notes)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.audit()


def _number(value: Any) -> float:
    return float(value)  # a 0-d tensor (capturable optimizers) reads as its value


def _kept_rule(name: str, beta: float, k: float) -> str:
    return (
        f"{name} kept: k(1 - {name}) = {k * (1.0 - beta):.3g} > {SDE_BETA_BOUND:g}, past the SDE rule's bound"
    )


def _beta_rule(rule: str, kept: tuple[str, ...], *, k: float, betas: tuple[float, ...]) -> str:
    """The audit's rule for the betas: the mapping, or per beta that it was kept past the SDE rule's bound."""
    if not kept:
        return rule
    return "; ".join(
        _kept_rule(name, beta, k) if name in kept else f"{name}: {rule}"
        for name, beta in zip(("beta1", "beta2"), betas)
    )


def _carry_group(
    index: int,
    values: Mapping[str, Any],
    old: int,
    new: int,
    spec: OptimizerRule,
    noise_scale: float | None,
    keep: tuple[str, ...],
) -> tuple[dict[str, Any], list[Change], list[str], float]:
    lr = checks.number(f"group {index} lr", _number(values["lr"]), inclusive=True)
    betas = tuple(_number(b) for b in values["betas"]) if values.get("betas") is not None else None
    eps = _number(values["eps"]) if values.get("eps") is not None else None
    # The factor does not depend on the LR's value, so an LR of 0 (a warm-up's start) is carried as 1 would be.
    scaled = scale_lr(lr or 1.0, old, new, spec.rule, noise_scale=noise_scale, betas=betas, eps=eps)
    source = _RULE_SOURCE[spec.rule]
    notes = [f"group {index}: {n}" for n in scaled.notes]
    factor = scaled.factor
    out: dict[str, Any] = {"lr": lr * factor}
    changes = [Change("lr", index, lr, out["lr"], f"{spec.rule}: lr x {factor:.4g}", source)]
    if "initial_lr" in values:  # what LR schedulers start from
        out["initial_lr"] = _number(values["initial_lr"]) * factor
        changes.append(Change("initial_lr", index, _number(values["initial_lr"]), out["initial_lr"],
                              f"{spec.rule}: x {factor:.4g}, as lr", source))  # fmt: skip
    beta_rule = "1 - beta -> k(1 - beta)" if spec.rule == "sqrt" else "kept"
    if betas is not None:
        out["betas"] = scaled.betas
        changes.append(
            Change(
                "betas",
                index,
                betas,
                scaled.betas,
                _beta_rule(beta_rule, scaled.kept_betas, k=new / old, betas=betas),
                source,
            )
        )
    if "alpha" in values and "betas" not in values:  # RMSprop: alpha is its beta2 (Malladi et al. 2022)
        alpha = _number(values["alpha"])
        mapped = scale_lr(1.0, old, new, spec.rule, noise_scale=noise_scale, betas=(alpha, alpha))
        out["alpha"] = mapped.betas[1]
        rule = beta_rule if "beta2" not in mapped.kept_betas else _kept_rule("alpha", alpha, new / old)
        changes.append(Change("alpha", index, alpha, out["alpha"], rule + " (RMSprop's beta2)", source))
        notes += [
            f"group {index}: {n.replace('beta2', 'alpha')}" for n in mapped.notes if n.startswith("beta2")
        ]
    if eps is not None:
        out["eps"] = scaled.eps
        eps_rule = "eps / sqrt(k)" if spec.rule == "sqrt" else "kept"
        changes.append(Change("eps", index, eps, scaled.eps, eps_rule, source))
    if "weight_decay" in values:
        wd = checks.number(f"group {index} weight_decay", _number(values["weight_decay"]), inclusive=True)
        decoupled = bool(values.get("decoupled_weight_decay", False))
        decay = "timescale" if decoupled else spec.decay
        if decay == "timescale":
            out["weight_decay"] = wd * (new / old) / factor
            what = "decoupled" if decoupled or spec.name != "SGD" else "SGD's, eta*lambda per step"
            rule = f"{what}: timescale tau = B/(eta*lambda*D) kept, lambda x k*eta/eta'"
            changes.append(Change("weight_decay", index, wd, out["weight_decay"], rule, TIMESCALE))
        else:
            out["weight_decay"] = wd
            known = decay == "objective"
            rule = (
                "kept: coupled L2 is part of the objective"
                if known
                else f"kept: how {spec.name} decays is unknown"
            )
            changes.append(Change("weight_decay", index, wd, wd, rule, L2 if known else "no rule"))
    for key, why, where in spec.kept:
        if key in values:
            changes.append(Change(key, index, values[key], values[key], why, where))
    for key in keep:
        if out.pop(key, None) is not None:
            changes = [Change(key, index, c.before, c.before, "kept on request", "keep=") if c.name == key else c
                       for c in changes]  # fmt: skip
    return out, changes, notes, factor


def carry_hyperparameters(
    groups: Sequence[Mapping[str, Any]],
    old_batch: int,
    new_batch: int,
    *,
    optimizer: str,
    rule: str | None = None,
    noise_scale: float | None = None,
    warmup_steps: int | None = None,
    max_micro_batch: int | None = None,
    world_size: int = 1,
    keep: Sequence[str] = (),
) -> CarryOver:
    """The hyper-parameters of ``groups`` (param-group values, e.g. ``{"lr": 1e-3, "betas": (0.9, 0.999),
    "eps": 1e-8, "weight_decay": 0.01}``) carried from global batch ``old_batch`` to ``new_batch``.

    ``optimizer`` is the torch.optim class name (:data:`OPTIMIZERS`); ``rule`` overrides its LR rule and is
    required for an optimizer the table does not know. ``noise_scale`` is for rule ``"adascale"``.
    ``warmup_steps``: the warm-up steps still to run at the old batch (kept in samples). ``max_micro_batch``
    (and ``world_size``): plan the accumulation that keeps each micro-batch within it. ``keep``: values to leave
    as they are (any of ``betas``, ``alpha``, ``eps``, ``weight_decay``, ``initial_lr``). Raises ``ValueError``
    naming any invalid argument, before anything is computed.
    """
    old = checks.integer("old_batch", old_batch)
    asked = checks.integer("new_batch", new_batch)
    spec = optimizer_rule(optimizer, rule)
    checks.integer("warmup_steps", warmup_steps, minimum=0, none=True)
    checks.integer("max_micro_batch", max_micro_batch, none=True)
    checks.integer("world_size", world_size)
    keep = tuple(keep)
    for key in keep:
        checks.choice("keep entry", key, KEEPABLE)
    if not groups:
        raise ValueError("groups is empty: pass the optimizer's param-group values (at least one group)")
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping) or "lr" not in g:
            raise ValueError(f"group {i} must be a mapping with an 'lr', got {g!r}")
    notes: list[str] = []
    changes: list[Change] = []
    plan = None
    new = asked
    if max_micro_batch is not None:
        before_plan = plan_batch(old, max_micro_batch, world_size)
        plan = plan_batch(asked, max_micro_batch, world_size)
        new = plan.effective_batch
        if plan.difference:
            notes.append(
                f"batch {asked} cannot run exactly ({plan.note}); carried to {new}, the batch that runs"
            )
        changes.append(Change("micro_batch x accumulation", -1,
                              f"{before_plan.micro_batch} x {before_plan.accumulation_steps}",
                              f"{plan.micro_batch} x {plan.accumulation_steps}",
                              f"micro-batch <= {max_micro_batch}", "plan_batch"))  # fmt: skip
    out_groups = []
    factor = 1.0
    for i, g in enumerate(groups):
        values, group_changes, group_notes, factor = _carry_group(i, g, old, new, spec, noise_scale, keep)
        out_groups.append(values)
        changes.extend(group_changes)
        notes.extend(group_notes)
    warmup = None
    if warmup_steps is not None:
        warmup = math.ceil(warmup_steps * old / new)
        changes.append(Change("warmup_steps", -1, warmup_steps, warmup,
                              f"{warmup_steps * old} samples kept: steps x B/B'", SAMPLES))  # fmt: skip
    return CarryOver(
        optimizer=spec.name,
        rule=spec.rule,
        old_batch=old,
        new_batch=new,
        k=new / old,
        lr_factor=factor,
        groups=tuple(out_groups),
        changes=tuple(changes),
        plan=plan,
        warmup_steps=warmup,
        notes=tuple(notes),
    )
