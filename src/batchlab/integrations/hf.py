"""Hugging Face: the per-device batch for a ``transformers.Trainer`` that keeps the effective batch, and a
drop-in for Accelerate's ``find_executable_batch_size`` that searches instead of retrying at x0.9.

Trainer::

    from batchlab.integrations.hf import fit_trainer

    args = TrainingArguments(..., per_device_train_batch_size=64, gradient_accumulation_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    plan = fit_trainer(trainer)        # e.g. 16 per device x 4 accumulation steps = 64, as asked
    trainer.train()

The effective batch the user asked for -- ``per_device_train_batch_size x gradient_accumulation_steps x
devices`` -- is the target (or ``target_batch=``). batchlab finds the largest per-device micro-batch whose whole
step fits (the model's own loss from ``model(**batch).loss``, backward, the optimizer the Trainer builds --
``Trainer.get_optimizer_cls_and_kwargs`` -- its state created in the first step, under ``bf16``/``fp16`` and
gradient checkpointing as ``args`` says), then :func:`batchlab.scaling.plan_batch` splits the target into
micro-batch x accumulation steps, and both are written back. Under torchrun/accelerate (an initialised
process group) every process searches its own device and all take the smallest answer. HF's own ``auto_find_batch_size`` restarts
training at x0.9 and leaves ``gradient_accumulation_steps`` alone, so the effective batch silently shrinks.

:func:`fit_training_args` does the same before a Trainer exists (public API only). :func:`fit_trainer` must
also tell an existing Trainer, which copies the batch size into a private attribute when it is built; that
one write lives in :func:`_set_trainer_batch_size`, with a version check and its own test.

Accelerate::

    from batchlab.integrations.hf import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=256, probe=one_step)
    def train(batch_size, model, optimizer): ...

    train(model, optimizer)            # one_step(batch_size, model, optimizer) runs a single training step

With ``probe``, batchlab's search picks the size before the first call (up to ``starting_batch_size``), with
the model's and optimizer's state restored after every probe. Without one, or if the function still runs out
of memory later (evaluation, a longer sequence), the state of the modules and optimizers among the arguments
is restored and the size halves -- accelerate retries at x0.9 from wherever training had got to.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab import checks
from batchlab.advice.scaling import BatchPlan, plan_batch
from batchlab.devices import Device
from batchlab.devices.oom import is_out_of_memory
from batchlab.devices.release import devices_of, release_after_oom
from batchlab.fit import FitResult, Probe, SearchOptions, find_batch_size
from batchlab.integrations.distributed import agree_on_batch_size, all_gather_ints
from batchlab.workload.state import StateSnapshot
from batchlab.workload.workload import Workload

log = logging.getLogger("batchlab")

__all__ = ["HFBatchPlan", "fit_trainer", "fit_training_args", "find_executable_batch_size"]

# transformers versions whose Trainer keeps its batch size in `_train_batch_size` (read by get_train_dataloader
# and by train()); checked in 4.40 .. 5.x. Outside this range fit_trainer refuses rather than guess.
TRAINER_PRIVATE_VERSIONS = ((4, 40), (6, 0))


@dataclass
class HFBatchPlan:
    """What :func:`fit_trainer` / :func:`fit_training_args` decided and wrote into the TrainingArguments.

    ``effective_batch = per_device_train_batch_size x gradient_accumulation_steps x devices`` equals
    ``target_batch`` whenever the target is a multiple of the device count (``plan.note`` says otherwise).
    """

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    devices: int
    effective_batch: int
    target_batch: int
    largest_fitting: int
    plan: BatchPlan
    result: FitResult
    per_device_eval_batch_size: int | None = None  # set when an evaluation set was searched too
    eval_result: FitResult | None = None
    notes: list[str] = field(default_factory=list)  # what the batch sizes found do not cover

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["result"] = self.result.to_dict()
        data["eval_result"] = self.eval_result.to_dict() if self.eval_result is not None else None
        return data

    def summary(self) -> str:
        evaluation = (
            f"; evaluation {self.per_device_eval_batch_size} per device"
            if self.per_device_eval_batch_size is not None
            else ""
        )
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return (
            f"{self.per_device_train_batch_size} per device x {self.gradient_accumulation_steps} accumulation x "
            f"{self.devices} device(s) = {self.effective_batch} (asked {self.target_batch}; largest that fits "
            f"per device: {self.largest_fitting}){evaluation}{notes}"
        )


# The Trainer's evaluation loop keeps every batch's predictions on the device until ``eval_accumulation_steps``
# batches have run, and with it unset until the whole evaluation set has (transformers' TrainingArguments docs;
# Trainer.evaluation_loop): the largest evaluation batch fits one batch's forward, not that growth.
KEPT_PREDICTIONS = (
    "the Trainer keeps every evaluation batch's predictions (logits) on the device until "
    "eval_accumulation_steps batches have run, and it is unset: over the whole evaluation set they grow past "
    "the room beside the evaluation batch found; set args.eval_accumulation_steps (1 moves them off after each "
    "batch), or reduce them with preprocess_logits_for_metrics"
)


def _kept_predictions(args: Any, compute_metrics: Any) -> bool:
    """Whether an evaluation will gather every batch's predictions on the device: metrics are computed from
    them (``compute_metrics``; None where the caller cannot know, as :func:`fit_training_args`), and neither
    ``prediction_loss_only``, ``batch_eval_metrics`` nor ``eval_accumulation_steps`` stops the growth."""
    if getattr(args, "prediction_loss_only", False) or getattr(args, "batch_eval_metrics", False):
        return False
    return compute_metrics is not None and getattr(args, "eval_accumulation_steps", None) is None


def _devices(args: Any) -> int:
    return int(args.world_size) * max(1, int(getattr(args, "n_gpu", 1) or 1))


def _amp(args: Any) -> str | None:
    return "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else None


def _map_style(dataset: Any, what: str) -> None:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"batchlab needs a map-style {what} dataset (len() and indexing) to draw probe batches from, "
            f"got {type(dataset).__name__}; pass target_batch= and a map-style sample of it to fit_training_args"
        )


def _eval_loss(output: Any, batch: Any) -> torch.Tensor:
    """The evaluation's loss where the batch has labels (as ``Trainer.prediction_step`` computes it), else 0:
    the forward is what takes the memory."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if loss is not None else torch.zeros(())


def _sampler(dataset: Any, collate: Callable[[list], Any]) -> Callable[[int], Any]:
    """make_batch(b): the next b samples of a map-style dataset, cycling, through the collator."""
    position = 0

    def make_batch(batch_size: int) -> Any:
        nonlocal position
        samples = [dataset[(position + i) % len(dataset)] for i in range(batch_size)]
        position += batch_size
        return collate(samples)

    return make_batch


def _fit(
    model: torch.nn.Module,
    args: Any,
    dataset: Any,
    collate: Callable[[list], Any],
    *,
    target_batch: int | None,
    options: SearchOptions,
    evaluation: tuple[Any, Callable[[list], Any]] | None = None,
    compute_metrics: Any = None,
) -> HFBatchPlan:
    from transformers import Trainer

    _map_style(dataset, "training")
    if evaluation is not None:
        _map_style(evaluation[0], "evaluation")
    devices = _devices(args)
    target = int(
        target_batch or args.per_device_train_batch_size * args.gradient_accumulation_steps * devices
    )
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    workload = Workload(
        model,
        _sampler(dataset, collate),
        None,  # model(**batch).loss, as the Trainer computes it
        lambda params: optimizer_cls(params, **optimizer_kwargs),
        amp=_amp(args),
        dataset_size=len(dataset),
        name=type(model).__name__,
    )
    checkpointing = bool(getattr(args, "gradient_checkpointing", False)) and not getattr(
        model, "is_gradient_checkpointing", True
    )
    if checkpointing:  # the Trainer turns it on when training starts; measure what it will run
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    results: list[FitResult] = []

    def search() -> int:
        # never more than one device's share of the target
        results.append(options.run(workload, max_batch_size=-(-target // devices), training_follows=True))
        return results[0].batch_size

    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # Under torchrun/accelerate every process searches its own device; all take the smallest answer.
    gather = all_gather_ints if distributed else (lambda value: [value])
    rank = dist.get_rank() if distributed else 0
    try:
        largest, _ = agree_on_batch_size(search, gather, rank=rank)
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
    result = results[0]
    plan = plan_batch(target, largest, devices)
    # The training batch is written before the evaluation is searched, and nothing the evaluation finds
    # changes it: an evaluation's out-of-memory error does not shrink training (transformers#32215).
    args.per_device_train_batch_size = plan.micro_batch
    args.gradient_accumulation_steps = plan.accumulation_steps
    eval_size, eval_result = None, None
    if evaluation is not None:
        eval_dataset, eval_collate = evaluation
        eval_workload = Workload(model, _sampler(eval_dataset, eval_collate), _eval_loss, workload.optimizer,
                                 amp=_amp(args), dataset_size=len(eval_dataset), name=type(model).__name__)  # fmt: skip
        eval_results: list[FitResult] = []

        def search_eval() -> int:
            # between training steps, so beside the gradients and optimizer state the training search measured
            eval_results.append(
                options.with_changes(mode="eval").run(eval_workload, beside=result, training_follows=True)
            )
            return eval_results[0].batch_size

        eval_size, _ = agree_on_batch_size(search_eval, gather, rank=rank)
        eval_result = eval_results[0]
        args.per_device_eval_batch_size = eval_size
    kept = eval_size is not None and _kept_predictions(args, compute_metrics)
    fitted = HFBatchPlan(
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation_steps,
        devices=devices,
        effective_batch=plan.effective_batch,
        target_batch=target,
        largest_fitting=largest,
        plan=plan,
        result=result,
        per_device_eval_batch_size=eval_size,
        eval_result=eval_result,
        notes=[KEPT_PREDICTIONS] if kept else [],
    )
    # a warning when the summary carries a note (what the batch sizes found do not cover)
    log.log(logging.WARNING if fitted.notes else logging.INFO, "batchlab: %s", fitted.summary())
    return fitted


def fit_training_args(
    model: torch.nn.Module,
    args: Any,
    train_dataset: Any,
    *,
    data_collator: Callable[[list], Any] | None = None,
    target_batch: int | None = None,
    batch: int | float | str = -1,
    memory_budget: int | str | None = None,
    device: str | torch.device | Device | None = None,
    multiple_of: int = 1,
    on_probe: Callable[[Probe], None] | None = None,
    eval_dataset: Any = None,
) -> HFBatchPlan:
    """Set ``args.per_device_train_batch_size`` and ``gradient_accumulation_steps`` before building a Trainer.

    ``train_dataset`` must be map-style and already hold model inputs (with ``labels``); ``data_collator``
    defaults to ``transformers.default_data_collator``. The model is measured where it is: move it to its
    training device first. The effective batch kept is ``target_batch``, or what ``args`` asks for now.
    With ``eval_dataset`` (map-style) ``args.per_device_eval_batch_size`` is set too: the largest evaluation
    batch (forward under ``no_grad``, the model in eval mode) that fits beside the training state. That is one
    batch's forward: a Trainer given ``compute_metrics`` also keeps every batch's predictions on the device
    unless ``args.eval_accumulation_steps`` is set (:func:`fit_trainer`, which sees the trainer, says so).
    """
    if data_collator is None:
        from transformers import default_data_collator as data_collator
    return _fit(
        model,
        args,
        train_dataset,
        data_collator,
        target_batch=target_batch,
        evaluation=(eval_dataset, data_collator) if eval_dataset is not None else None,
        options=SearchOptions(
            batch=batch,
            memory_budget=memory_budget,
            device=device,
            multiple_of=multiple_of,
            on_probe=on_probe,
        ),  # fmt: skip
    )


def fit_trainer(
    trainer: Any,
    *,
    target_batch: int | None = None,
    batch: int | float | str = -1,
    memory_budget: int | str | None = None,
    device: str | torch.device | Device | None = None,
    multiple_of: int = 1,
    on_probe: Callable[[Probe], None] | None = None,
    evaluation: bool = False,
) -> HFBatchPlan:
    """Find the per-device batch for ``trainer`` and set it with the accumulation that keeps the effective batch.

    Samples come from ``trainer.get_train_dataloader()`` (its dataset, with the columns the model does not
    take removed, and its collator), the model and arguments from the trainer. Call it before
    ``trainer.train()``; the model's state is left exactly as it was. ``evaluation=True`` also sets
    ``args.per_device_eval_batch_size`` from ``trainer.get_eval_dataloader()``: the largest evaluation batch
    that fits beside the training state (the Trainer reads it from ``args`` each time it evaluates), found
    apart from the training batch, which it never changes. Where the trainer computes metrics from predictions
    it keeps on the device over the whole evaluation (``eval_accumulation_steps`` unset), the plan's ``notes``
    say so and a warning is logged: that growth is not in the batch found.
    """
    loader = trainer.get_train_dataloader()
    eval_loader = trainer.get_eval_dataloader() if checks.flag("evaluation", evaluation) else None
    fitted = _fit(
        trainer.model,
        trainer.args,
        loader.dataset,
        loader.collate_fn,
        target_batch=target_batch,
        evaluation=(eval_loader.dataset, eval_loader.collate_fn) if eval_loader is not None else None,
        compute_metrics=trainer.compute_metrics,
        options=SearchOptions(
            batch=batch,
            memory_budget=memory_budget,
            device=device,
            multiple_of=multiple_of,
            on_probe=on_probe,
        ),  # fmt: skip
    )
    _set_trainer_batch_size(trainer, trainer.args.train_batch_size)
    return fitted


# --------------------------------------------------------------------------- the one private access (adapter)


def _set_trainer_batch_size(trainer: Any, train_batch_size: int) -> None:
    """Tell a built ``Trainer`` its new batch size: ``Trainer.__init__`` copies ``args.train_batch_size`` into
    ``trainer._train_batch_size``, which ``get_train_dataloader()`` and ``train()`` read. There is no public
    setter, so this is the one private write; it is version-checked and tested (tests/test_integration_hf.py).
    """
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    low, high = TRAINER_PRIVATE_VERSIONS
    if not (low <= version < high) or not hasattr(trainer, "_train_batch_size"):
        raise RuntimeError(
            f"batchlab.fit_trainer supports transformers {low[0]}.{low[1]} to <{high[0]}.{high[1]} (found "
            f"{transformers.__version__}); call fit_training_args(model, args, dataset) before building the Trainer"
        )
    trainer._train_batch_size = train_batch_size


# ------------------------------------------------------------------------ find_executable_batch_size drop-in


def _stateful(values: Sequence[Any]) -> tuple[list[torch.nn.Module], list[torch.optim.Optimizer]]:
    modules = [v for v in values if isinstance(v, torch.nn.Module)]
    optimizers = [v for v in values if isinstance(v, torch.optim.Optimizer)]
    return modules, optimizers


def find_executable_batch_size(
    function: Callable[..., Any] | None = None,
    starting_batch_size: int = 128,
    reduce_batch_size_fn: Callable[[], int] | None = None,
    *,
    probe: Callable[..., Any] | None = None,
    device: str | torch.device | Device = "auto",
    batch: int | float | str = -1,
    memory_budget: int | str | None = None,
    preserve: Sequence[Any] | None = None,
    on_probe: Callable[[Probe], None] | None = None,
) -> Callable[..., Any]:
    """Drop-in for ``accelerate.utils.find_executable_batch_size``: same call, batchlab's search.

    ``function(batch_size, *args, **kwargs)`` is called with the batch size first, as with accelerate.

    Args:
        starting_batch_size: the largest size to consider (accelerate starts here and shrinks).
        reduce_batch_size_fn: accelerate's hook: returns the next size after an out-of-memory error
            (default here: half the size that failed).
        probe: ``probe(batch_size, *args, **kwargs)`` runs one training step; batchlab searches with it before
            the first call and restores the state of ``preserve`` after each probe.
        device, batch, memory_budget, on_probe: as for :func:`batchlab.find_batch_size`.
        preserve: modules and optimizers whose state a failed call must not leave changed; default: every
            ``nn.Module`` and ``Optimizer`` among the arguments.

    The wrapper's ``batchlab_result`` holds the search's :class:`~batchlab.FitResult` (None without a probe)
    and ``batch_sizes_tried`` every size the function was called with.
    """
    if function is None:
        return functools.partial(
            find_executable_batch_size,
            starting_batch_size=starting_batch_size,
            reduce_batch_size_fn=reduce_batch_size_fn,
            probe=probe,
            device=device,
            batch=batch,
            memory_budget=memory_budget,
            preserve=preserve,
            on_probe=on_probe,
        )
    if (
        isinstance(starting_batch_size, bool)
        or not isinstance(starting_batch_size, int)
        or starting_batch_size < 1
    ):
        raise ValueError(f"invalid starting_batch_size {starting_batch_size!r}: expected a positive int")
    params = list(inspect.signature(function).parameters)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if len(params) < len(args) + 1:
            given = ", ".join(f"{name}=..." for name in params[1 : len(args)])
            raise TypeError(
                f"the decorator passes the batch size to `{function.__name__}` as its first argument; "
                f"call it without one: `{function.__name__}({given})`"
            )
        modules, optimizers = _stateful(list(args) + list(kwargs.values()) if preserve is None else preserve)
        wrapper.batchlab_result, wrapper.batch_sizes_tried = None, []  # this call's, not the previous one's
        size = starting_batch_size
        if probe is not None:
            result = find_batch_size(
                lambda b: probe(b, *args, **kwargs),
                device=device,
                batch=batch,
                memory_budget=memory_budget,
                max_batch_size=starting_batch_size,
                preserve=modules + optimizers,
                on_probe=on_probe,
            )
            wrapper.batchlab_result = result
            size = result.batch_size
        snapshot = StateSnapshot.capture(modules, optimizers)
        while True:
            wrapper.batch_sizes_tried.append(size)
            failed = None
            try:
                return function(size, *args, **kwargs)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                failed = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                )
            # Outside the except block (its traceback held the failed call's tensors): put the state back, then
            # the one release path -- a failed backward's graph (pytorch#82218), cycles, the CUDA cache.
            snapshot.restore()
            release_after_oom(*devices_of(*modules, *optimizers))
            smaller = reduce_batch_size_fn() if reduce_batch_size_fn is not None else size // 2
            log.warning(
                "batchlab: batch %d ran out of memory (%s); retrying at %d from the same state",
                size,
                failed,
                smaller,
            )
            if smaller < 1:
                raise RuntimeError("No executable batch size found, reached zero.")
            size = smaller

    wrapper.batchlab_result = None
    wrapper.batch_sizes_tried = []
    return wrapper
