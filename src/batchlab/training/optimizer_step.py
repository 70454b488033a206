"""Can a failed optimizer step run again? Proof that it applied nothing, and the undo of what it created.

:class:`StepRecord` reads, just before ``optimizer.step()``, what the step may change -- the version counters of
every parameter and state tensor, the state entries, what a GradScaler sets on a fused optimizer -- so that
after an out-of-memory error inside the step it can tell whether anything was applied (see
:mod:`batchlab.training.guard` for the rule and why it is safe) and, when nothing was, drop the state the
step had begun to create.
"""

from __future__ import annotations

from typing import Any

import torch

# The optimizers whose unapplied step the guard can prove (module docstring): every write to a parameter or a
# state tensor is in place and bumps its version counter. Fused kernels write without bumping it; only those of
# the second tuple bump their group's "step" counters first (read in torch 2.14's optim/adam.py, adagrad.py,
# sgd.py).
_VERSIONED = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.ASGD,
)
_FUSED_COUNTED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)
# What GradScaler.step sets on an optimizer that unscales inside its own (fused) step, and deletes only after
# the step returns: left behind by a failed step, the retry would multiply the scale in twice.
_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")
# The ends of the reasons a failed optimizer step is not retried.
_PARTLY = "; a partly applied update cannot be undone: restore a checkpoint"
_UNKNOWN = ", so it cannot tell whether the update was partly applied"


class StepRecord:
    """What an optimizer step may change, read just before it runs: enough to prove afterwards that a step
    which raised applied nothing (version counters, module docstring), and to put back the state it created."""

    def __init__(self, optimizer: Any):
        inner = getattr(optimizer, "optimizer", None)  # Lightning's and Accelerate's wrappers keep it here
        self.optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self.began = False
        self.unprovable = self._unprovable()
        if self.unprovable is not None:
            return
        opt = self.optimizer
        self.params = [p for group in opt.param_groups for p in group["params"]]
        self.param_versions = [p._version for p in self.params]
        self.present = {p for p in self.params if p in opt.state}  # a defaultdict: never index it to look
        self.state = {p: dict(opt.state[p]) for p in self.present if opt.state[p]}
        self.state_versions = {
            p: {k: v._version for k, v in entry.items()} for p, entry in self.state.items()
        }
        self.attributes = {name: getattr(opt, name) for name in _SCALER_ATTRIBUTES if hasattr(opt, name)}
        self._hook = opt.register_step_pre_hook(self._begin)

    def _unprovable(self) -> str | None:
        opt = self.optimizer
        if type(opt) not in _VERSIONED:
            name = type(opt).__name__
            return (
                f"{name} is not one of the torch.optim optimizers whose steps the guard can check{_UNKNOWN}"
            )
        if any(group.get("fused") for group in opt.param_groups) and type(opt) not in _FUSED_COUNTED:
            return f"a fused {type(opt).__name__} writes without a trace the guard can check{_UNKNOWN}"
        for entry in opt.state.values():
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor):
                    return (
                        f"its state holds a {type(value).__name__} ({key!r}) the guard cannot check{_UNKNOWN}"
                    )
        return None

    def _begin(self, *args: Any) -> None:
        self.began = True

    def close(self) -> None:
        if self.unprovable is None:
            self._hook.remove()

    def applied(self) -> str | None:
        """Why the failed step cannot be retried (what it changed), or None when it applied nothing."""
        if self.unprovable is not None:
            return self.unprovable
        opt = self.optimizer
        if not self.began:
            # What runs before it -- GradScaler's unscale_, a wrapper's own, step pre-hooks -- may have changed
            # the gradients, and the unscale kernel does not bump their version counters (measured, torch 2.14).
            return (
                "the error came before optimizer.step() began (in a GradScaler's unscale or a step pre-hook), "
                "which may have changed the gradients without a trace"
            )
        if any(p._version != v for p, v in zip(self.params, self.param_versions)):
            return "it had already updated parameters" + _PARTLY
        for p, entry in self.state.items():
            now = opt.state.get(p, {})
            if now.keys() != entry.keys() or any(now[k] is not v for k, v in entry.items()):
                return "it had already replaced optimizer state" + _PARTLY
            if any(v._version != self.state_versions[p][k] for k, v in entry.items()):
                return "it had already updated optimizer state" + _PARTLY
        for p in self.params:
            if p not in self.state and p in opt.state:
                for value in opt.state[p].values():
                    if not isinstance(value, torch.Tensor) or value._version != 0:
                        return "it had already updated the optimizer state it created" + _PARTLY
        return None

    def drop_created_state(self) -> None:
        """Put the optimizer back as it was before the step: without the state entries the step created, and
        without what GradScaler set on it for the step."""
        opt = self.optimizer
        for p in self.params:
            if p not in self.state and p in opt.state:
                if p in self.present:
                    opt.state[p].clear()  # it held an empty entry before
                else:
                    del opt.state[p]
        for name in _SCALER_ATTRIBUTES:
            if name in self.attributes:
                setattr(opt, name, self.attributes[name])
            elif hasattr(opt, name):
                delattr(opt, name)
