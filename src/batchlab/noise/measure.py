"""The gradient noise scale measured through a :class:`~batchlab.Workload`: train briefly, then put it all back.

:func:`measure_noise_scale` runs ``steps`` real training steps of the workload (forward, loss, backward,
optimizer step -- the noise scale belongs to the point training is at, and moves with it) with one of
:mod:`batchlab.noise.collectors` hooked in, and returns the tracker's
:class:`~batchlab.noise.estimator.NoiseScaleEstimate`.
The model's parameters and buffers, the optimizer's state, gradients, the GradScaler and the RNG states are
restored bitwise afterwards (:meth:`Workload.snapshot`), and the collector's hooks removed -- also when a
step raises.

Which collector (cheapest first, see :mod:`batchlab.noise.collectors`):

- ``"accumulation"`` (collector a) when the workload accumulates (``grad_accum > 1``): its micro-batches vs
  their sum, free;
- ``"split"`` (collector c) otherwise: each batch runs as two halves, a second, smaller forward/backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from batchlab import checks
from batchlab.fit.search import check_host_room
from batchlab.noise.collectors import AccumulationCollector, NormPair, SplitBatchCollector
from batchlab.noise.estimator import DEFAULT_BETA, GradientNoiseScale, NoiseScaleEstimate
from batchlab.workload.workload import StepFunction, Workload

__all__ = [
    "measure_noise_scale",
    "noise_collector",
    "noise_batch_for",
    "require_workload",
    "measurement_dict",
    "COLLECTORS",
    "DEFAULT_NOISE_STEPS",
    "DEFAULT_NOISE_BATCH",
]

COLLECTORS = ("auto", "accumulation", "split")
# 100 steps: with the tracker's default EMA (beta 0.99) that is ~92 effective updates, which puts B_simple's
# standard error near 10-25% on the built-in workloads (measured: mlp-digits at batch 128) in a few seconds.
DEFAULT_NOISE_STEPS = 100
# 128: near the noise scale of small tasks early in training (mlp-digits measured ~100-250), where the
# two-batch estimate is most precise; it is capped by the dataset size.
DEFAULT_NOISE_BATCH = 128


def require_workload(workload: object, purpose: str = "measuring the noise scale") -> Workload:
    """``workload`` if it is a :class:`~batchlab.Workload`; a plain ``step(batch_size)`` callable is refused."""
    if isinstance(workload, StepFunction) or not isinstance(workload, Workload):
        raise ValueError(
            f"{purpose} needs a batchlab.Workload (model, make_batch, loss_fn, optimizer): the collectors hook "
            f"the model's gradients, which a plain step(batch_size) callable hides"
        )
    return workload


def noise_batch_for(workload: Workload, batch: int | None = None, largest: int | None = None) -> int:
    """The batch to measure at: ``batch`` if given, else :data:`DEFAULT_NOISE_BATCH` capped by the dataset
    and ``largest`` (e.g. the largest batch that fits), and at least 2 (the split collector halves it)."""
    if batch is not None:
        return batch
    caps = [c for c in (workload.dataset_size, largest) if c]
    return max(2, min([DEFAULT_NOISE_BATCH, *caps]))


def measurement_dict(
    estimate: NoiseScaleEstimate, collector: str, batch_size: int, steps: int, seconds: float
) -> dict:
    """The JSON of one measurement (``batchlab noise --json``, and ``noise`` in ``batchlab advise --json``)."""
    return {
        **estimate.to_dict(),
        "collector": collector,
        "batch_size": batch_size,
        "steps": steps,
        "seconds": seconds,
    }


def noise_collector(workload: Workload, collector: str = "auto") -> str:
    """The collector :func:`measure_noise_scale` uses: ``"accumulation"`` or ``"split"``.

    ``"auto"`` picks accumulation when the workload accumulates gradients (``grad_accum > 1``: free) and the
    split batch otherwise. Raises ``ValueError`` for an unknown name or accumulation without accumulation.
    """
    checks.choice("collector", collector, COLLECTORS)
    accum = getattr(workload, "grad_accum", 1)
    if collector == "auto":
        return "accumulation" if accum > 1 else "split"
    if collector == "accumulation" and accum < 2:
        raise ValueError(
            f"collector 'accumulation' needs a workload with grad_accum >= 2 (two micro-batch sizes), this one "
            f"has grad_accum={accum}; use collector='split'"
        )
    return collector


def measure_noise_scale(
    workload: Workload,
    batch_size: int,
    *,
    steps: int = DEFAULT_NOISE_STEPS,
    collector: str = "auto",
    beta: float = DEFAULT_BETA,
    on_step: Callable[[int, NormPair | None], None] | None = None,
) -> NoiseScaleEstimate:
    """Train ``workload`` for ``steps`` optimizer steps, measure B_simple, and restore its state bitwise.

    Args:
        workload: a :class:`~batchlab.Workload` (a plain ``step(batch_size)`` callable hides the gradients the
            collectors need, so it is refused).
        batch_size: as for :meth:`Workload.step`: the micro-batch. With collector ``"accumulation"`` the pair
            of sizes is (``batch_size``, ``batch_size x grad_accum``); with ``"split"`` one batch of
            ``batch_size`` per step is split into halves, so the pair is (~``batch_size/2``, ``batch_size``).
            The estimate is most precise when the larger size is near B_noise itself.
        steps: optimizer steps to run (each one a real update of the model, undone afterwards).
        collector: ``"auto"``, ``"accumulation"`` or ``"split"`` (:func:`noise_collector`).
        beta: the tracker's EMA decay (:class:`~batchlab.noise.estimator.GradientNoiseScale`).
        on_step: called after each step with its index and the pair of norms it gave (progress displays).

    Returns the tracker's :class:`~batchlab.noise.estimator.NoiseScaleEstimate`; its ``note`` also names the collector.
    Non-finite steps (fp16 overflow) are skipped by the collector and counted in ``skipped``.
    """
    require_workload(workload)
    batch_size = checks.integer("batch_size", batch_size)
    steps = checks.integer("steps", steps)
    kind = noise_collector(workload, collector)
    if kind == "split" and batch_size < 2:
        raise ValueError(
            f"the split collector needs batch_size >= 2 to split a batch in two, got {batch_size}"
        )
    tracker = GradientNoiseScale(beta)  # validates beta before anything runs
    check_host_room(workload, batch_size, what="the noise measurement")  # a CPU step past the RAM is killed

    params = [p for p in workload.model.parameters() if p.requires_grad]
    snapshot = workload.snapshot()
    try:
        if kind == "accumulation":
            gns = AccumulationCollector(params, batch_size, tracker, scaler=workload.scaler)
        else:
            gns = SplitBatchCollector(params, tracker, scaler=workload.scaler)
        with gns:  # removes the hooks on the way out
            for index in range(steps):
                _train_step(workload, gns, batch_size)
                if on_step is not None:
                    on_step(index, gns.last)
    finally:
        snapshot.restore()

    estimate = tracker.result()
    if kind == "accumulation":
        how = (
            f"collector: accumulation, {workload.grad_accum} micro-batches of {batch_size} vs their sum, "
            f"{steps} steps"
        )
    else:
        how = f"collector: split batch, {batch_size} as halves of {(batch_size + 1) // 2} and {batch_size // 2}, {steps} steps"
    return replace(estimate, note=f"{estimate.note}; {how}")


def _train_step(
    workload: Workload, gns: AccumulationCollector | SplitBatchCollector, batch_size: int
) -> None:
    """One optimizer step built from :class:`Workload`'s own pieces, with the collector in the backward.

    The collector reads the GradScaler's scale before ``scaler.update()`` (inside ``finish_step``).
    """
    workload.begin_step()
    if isinstance(gns, AccumulationCollector):
        for _ in range(workload.grad_accum):
            loss = (
                workload.loss(workload.next_batch(batch_size)) / workload.grad_accum
            )  # .grad: the mean gradient
            workload.backward(loss)
            del loss  # free this micro-batch's activations before the next one is built
        gns.step()  # before scaler.update(), which may change the scale
    else:
        gns.backward(workload.loss, workload.next_batch(batch_size))  # the collector scales each half itself
    workload.finish_step()
