"""Make every probe step create the optimizer state, even when a GradScaler skips ``optimizer.step()``.

Under fp16 a GradScaler skips the optimizer step whenever the scaled gradients overflow (inf/NaN). At the
scaler's starting scale (2^16) that is common on the first steps of a run, and a two-step probe can then skip
both: Adam's moments (2x the parameters) are never created and the answer is too large by exactly that
memory (measured on a 512-4096-4096-512 MLP: 0 bytes of optimizer state in fp16 against 168 MB in fp32; see
DESIGN.md). The user's run *will* create them, at the first step that does not overflow.

While :func:`steps_always_create_state` is active, a skipped ``scaler.step(optimizer)`` is followed by the
step the scaler left out, on gradients set to zero: the optimizer allocates its state exactly as a real step
does, and the search restores every parameter, gradient and state tensor afterwards, so the zero-gradient
update never reaches the user. The scaler itself runs unchanged (it still backs off its scale, as in the
user's run). One mechanism serves every probed step: the Workload's, the Lightning and the Ultralytics
steps, and any ``step(batch_size)`` callable whose GradScaler is passed in ``preserve``.

The patch is an instance attribute on each scaler, removed on exit (``finally``); the class is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SkipRecord:
    """What happened to the optimizer steps while the patch was active.

    ``skipped``: steps a known GradScaler skipped (each then run on zeroed gradients), at ``scales``;
    ``optimizer_steps``: how many times the watched optimizers stepped at all -- 0 after a step that ran
    means something batchlab cannot see skipped them (a GradScaler not passed in ``preserve``).
    """

    skipped: int = 0
    scales: list[float] = field(default_factory=list)
    optimizer_steps: int = 0


def skip_note(skipped: int, scales: Sequence[float]) -> str | None:
    """One sentence for a FitResult's notes, or None when nothing was skipped."""
    if not skipped:
        return None
    shown = ", ".join(f"{scale:g}" for scale in sorted(set(scales), reverse=True))
    return (
        f"the GradScaler skipped optimizer.step() in {skipped} probe step(s) (inf/NaN gradients at scale "
        f"{shown}); batchlab ran each skipped step on zeroed gradients so the optimizer state was created and "
        "counted, as your first step that does not overflow will create it"
    )


def _step_on_zero_gradients(optimizer: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.zero_()
    optimizer.step()


def _patched_step(scaler: Any, record: SkipRecord) -> Any:
    original = scaler.step  # the bound method of the scaler's class

    def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        ran = []
        handle = optimizer.register_step_post_hook(lambda *_: ran.append(True))
        try:
            scale = float(scaler.get_scale())
            result = original(optimizer, *args, **kwargs)
        finally:
            handle.remove()
        if not ran:
            record.skipped += 1
            record.scales.append(scale)
            _step_on_zero_gradients(optimizer)
        return result

    return step


@contextlib.contextmanager
def steps_always_create_state(
    scalers: Sequence[Any], optimizers: Sequence[torch.optim.Optimizer] = ()
) -> Iterator[SkipRecord]:
    """While active, a step that any of ``scalers`` skips still creates the optimizer's state (see module doc);
    steps of ``optimizers`` are counted in the record.

    Disabled scalers (``enabled=False``, e.g. bf16 or fp32) never skip and are left alone.
    """
    record = SkipRecord()
    patched = []
    handles = []

    def count(*_: Any) -> None:
        record.optimizer_steps += 1

    try:
        handles = [optimizer.register_step_post_hook(count) for optimizer in optimizers]
        for scaler in scalers:
            if scaler.is_enabled() and "step" not in vars(scaler):
                scaler.step = _patched_step(scaler, record)
                patched.append(scaler)
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for scaler in patched:
            del scaler.step  # back to the class's method
