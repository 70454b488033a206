"""The evaluation step: forward (and loss) without gradients, the model in eval mode, nothing of training.

Inference keeps no activations for a backward, creates no gradients and no optimizer state, so its largest
batch is several times the training one -- and an evaluation that runs out of memory must not be answered by
shrinking the training batch, as Hugging Face's ``auto_find_batch_size`` does (transformers#32215). An
:class:`EvalStep` is searched like any step (``find_batch_size(..., mode="eval")`` builds one from a
:class:`~batchlab.Workload`; the Lightning callback builds one from ``validation_step``): each call puts the
modules in eval mode, runs the forward under ``torch.no_grad()`` and puts every module's training flag back,
even when the forward raises. ``no_grad`` rather than ``inference_mode``: the memory is the same, and a
module that caches a tensor during the forward (a rotary table) would otherwise hand an inference tensor to
the next training step, which refuses it. The state copy restored after each probe holds the modules only:
an evaluation never touches an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab.labels import Label
from batchlab.memory import MemoryBreakdown
from batchlab.workload.workload import StepFunction, Workload


class StepMode(Label):
    """Which step a search measures."""

    TRAIN = "train"  # the full training step: forward, loss, backward, optimizer step
    EVAL = "eval"  # the evaluation step: forward and loss under no_grad, the model in eval mode


class EvalStep(StepFunction):
    """``forward(batch_size)`` as an evaluation step of ``modules``: eval mode and ``no_grad`` around it.

    ``tensor_bytes``: as for :class:`~batchlab.workload.workload.StepFunction` (a Workload's own, from :meth:`of`).
    """

    def __init__(
        self,
        forward: Callable[[int], Any],
        modules: Sequence[torch.nn.Module],
        *,
        dataset_size: int | None = None,
        name: str | None = None,
        tensor_bytes: Callable[[], MemoryBreakdown] | None = None,
    ):
        if not modules or not all(isinstance(module, torch.nn.Module) for module in modules):
            raise TypeError(f"EvalStep needs the nn.Module(s) it evaluates, got {modules!r}")
        super().__init__(
            forward, preserve=tuple(modules), dataset_size=dataset_size, name=name, tensor_bytes=tensor_bytes
        )

    @classmethod
    def of(cls, workload: Workload) -> EvalStep:
        """The evaluation step of a Workload: its batch and loss (under its autocast), no backward, no update."""
        return cls(
            lambda b: workload.loss(workload.next_batch(b)),
            [workload.model],
            dataset_size=workload.dataset_size,
            name=f"{workload.name} (eval)",
            tensor_bytes=workload.tensor_bytes,
        )

    def step(self, batch_size: int) -> None:
        flags = [(sub, sub.training) for module in self._modules for sub in module.modules()]
        try:
            for module in self._modules:
                module.eval()
            with torch.no_grad():
                self._step(batch_size)  # the output is dropped here, as an evaluation loop drops each batch's
        finally:
            for sub, training in flags:
                sub.training = training


def for_mode(work: Workload | StepFunction, mode: str) -> Workload | StepFunction:
    """``work`` as the step ``mode`` names; an EvalStep is already one. A plain step callable cannot be turned
    into an evaluation (batchlab cannot see what it runs), so ``mode="eval"`` refuses it in one line."""
    if mode == StepMode.TRAIN or isinstance(work, EvalStep):
        return work
    if isinstance(work, Workload):
        return EvalStep.of(work)
    raise ValueError(
        "mode='eval' needs a Workload: a plain step(batch_size) callable runs what it runs; search your own "
        "evaluation step with batchlab.workload.EvalStep(forward, [model]) instead"
    )
