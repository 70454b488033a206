"""Ultralytics: ``model.train(batch=-1 | 0.7 | 16)`` with batchlab's search instead of AutoBatch.

One call::

    from ultralytics import YOLO
    from batchlab.integrations.ultralytics import train

    model = YOLO("yolo26n.yaml")
    train(model, data="data.yaml", epochs=1, imgsz=640, batch=-1)   # same keywords as model.train
    model.trainer.batchlab_result                                    # the FitResult: every probe, the memory

or, keeping your own ``model.train`` call, pass the trainer class::

    model.train(data="data.yaml", batch=0.7, trainer=trainer_class(model))

What changes against Ultralytics alone (``ultralytics/utils/autobatch.py``):

- ``batch=-1`` / ``batch=0.7`` run batchlab's verified search on GPU *and* CPU (AutoBatch returns 16 on the
  CPU), over the whole training step Ultralytics runs: the real loss (``model(batch)``, the same criterion),
  backward, gradient clipping, the optimizer Ultralytics builds (``trainer.build_optimizer``: AdamW's two
  moments are created in the first step, which AutoBatch never measures), the EMA copy and its update, and the
  validation forward at the validation batch size (2x the training batch for detection; "OOM in validation"
  is ultralytics#4679). Labels are the worst case AutoBatch itself assumes: ``max_num_obj`` boxes per image
  (the most boxes in any training image x 4 for mosaic).
- ``-1`` means 0.90 of memory (:data:`batchlab.spec.DEFAULT_FRACTION`, verified with real steps), not 0.60.
- A fixed ``batch=16`` is checked against memory once the trainer is set up (the real model, optimizer, EMA and
  GradScaler), and ``on_misfit`` says whether a misfit warns or raises :class:`~batchlab.DoesNotFitError`.
- ``multi_scale``: the batch is searched at the largest size training will draw (as AutoBatch does since
  ultralytics#24051: ``imgsz * (1 + multi_scale)`` rounded up to the stride) -- the worst case, which every
  step of the epoch fits. With ``shape_table=True`` the search runs over the multi-scale sizes
  (:func:`multi_scale_sizes`; ``find_batch_size(..., shapes=...)``), the largest first, and
  ``trainer.batchlab_shape_table`` keeps the largest batch of each size; training still uses the largest size's.

How it hooks in (public mechanisms only): Ultralytics' documented way to customise training is a trainer
subclass passed as ``model.train(trainer=...)``. :func:`trainer_class` subclasses the task's trainer
(``model.task_map[model.task]["trainer"]``) and overrides its public ``auto_batch()`` method -- which
Ultralytics calls exactly when ``batch < 1``, after the model is on its device and before the dataloaders are
built -- and registers an ``on_pretrain_routine_end`` callback (``add_callback``) for the fixed-batch check.
Every change the search makes to the model is undone (weights, BatchNorm statistics, gradients, modes, RNG,
the lazily built criterion); the optimizer, EMA and GradScaler of the search are its own and are dropped.

Limits: multi-GPU Ultralytics training starts workers with a generated script that cannot import a class
made at run time, and Ultralytics refuses ``batch<1`` there; run :func:`batchlab.find_batch_size` (or this
module on one GPU) first and pass ``batch=per_gpu * n_gpus``. Tasks other than detection probe with real,
augmented training samples (typical labels, not the worst case).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab import checks
from batchlab.devices import Device
from batchlab.errors import DoesNotFitError
from batchlab.fit import FitResult, Probe, SearchOptions
from batchlab.fit.shapes import ShapeTable
from batchlab.integrations.ultralytics_offline import make_synthetic_dataset, prepare_offline
from batchlab.spec import parse_batch
from batchlab.units import format_bytes

log = logging.getLogger("batchlab")

__all__ = [
    "prepare_offline",
    "make_synthetic_dataset",
    "multi_scale_sizes",
    "trainer_class",
    "train",
    "ULTRALYTICS_CPU_DEFAULT",
]

# AutoBatch returns DEFAULT_CFG.batch (16) on the CPU or on any error (ultralytics/utils/autobatch.py).
ULTRALYTICS_CPU_DEFAULT = 16
# Ultralytics' trainer clips the gradient norm at 10 before every optimizer step (BaseTrainer.optimizer_step).
CLIP_NORM = 10.0
# Mosaic puts 4 images in one: DetectionTrainer.auto_batch multiplies the most labels of any image by 4.
MOSAIC_OBJECTS = 4
# Tasks whose validation loader uses the training batch, not twice it (BaseTrainer._build_train_pipeline).
_SAME_VAL_BATCH_TASKS = {"obb", "semantic", "depth"}
_MISFIT = ("warn", "raise")
SHAPE_TABLE_SIZES = (
    5  # sizes in a multi-scale table: the smallest, the largest and three between (stride-aligned)
)


# ------------------------------------------------------------------------------------------ the training step


class _YoloStep:
    """One Ultralytics training step at batch ``b``, as ``BaseTrainer._do_train`` + ``optimizer_step`` run it.

    Forward through ``model(batch)`` (the model's own criterion), ``loss.sum()``, backward through the
    GradScaler, unscale, clip at ``CLIP_NORM``, optimizer step, zero_grad, EMA update; then, when
    ``val_factor``, an inference forward of the EMA model at ``val_factor * b`` images (the validation loader).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        make_batch: Callable[[int], dict],
        *,
        amp_dtype: torch.dtype | None,
        scaler: Any,
        ema: Any,
        val_factor: int,
    ):
        self.model, self.optimizer, self.make_batch = model, optimizer, make_batch
        self.amp_dtype, self.scaler, self.ema, self.val_factor = amp_dtype, scaler, ema, val_factor
        self.device_type = next(model.parameters()).device.type

    def _autocast(self):
        return torch.autocast(
            self.device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def __call__(self, batch_size: int, shape: tuple[int, int] | None = None) -> None:
        self.model.train()
        batch = self.make_batch(batch_size, shape)
        with self._autocast():
            loss, _ = self.model(batch)
            loss = loss.sum()
        self.scaler.scale(loss).backward()
        del loss  # the graph is freed; drop the handle before the optimizer allocates its state
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.val_factor:
            images = self.make_batch(batch_size * self.val_factor, shape)["img"]
            evaluated = self.ema.ema if self.ema is not None else self.model
            was_training = evaluated.training
            evaluated.eval()
            with torch.no_grad(), self._autocast():
                evaluated(images)
            evaluated.train(was_training)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def multi_scale_sizes(
    imgsz: int, multi_scale: float, stride: int, count: int = SHAPE_TABLE_SIZES
) -> list[int]:
    """The image sizes of a multi-scale table: ``count`` stride multiples from the smallest size training draws
    (``max(stride, imgsz * (1 - multi_scale))`` rounded down, ``DetectionTrainer.preprocess_batch``) to the
    largest (``imgsz * (1 + multi_scale)`` rounded up, ``BaseTrainer.auto_batch``), evenly spaced."""
    low = max(stride, int(imgsz * (1 - multi_scale))) // stride * stride
    high = -(-imgsz * (1 + multi_scale) // stride) * stride
    steps = int((high - low) // stride)
    picks = sorted({round(i * steps / max(count - 1, 1)) for i in range(count)})
    return [int(low + stride * k) for k in picks]


def _resized(batch: dict, shape: tuple[int, int] | None) -> dict:
    """The batch with its images resized to ``shape`` (h, w), as multi-scale training resizes them."""
    if shape is not None and tuple(batch["img"].shape[2:]) != tuple(shape):
        batch["img"] = torch.nn.functional.interpolate(
            batch["img"], size=shape, mode="bilinear", align_corners=False
        )
    return batch


def _detection_batches(model: torch.nn.Module, imgsz: int, max_num_obj: int, device: torch.device):
    """Synthetic worst-case detection batches: ``max_num_obj`` boxes in every image, random pixels; at
    ``imgsz`` square unless ``make(b, shape)`` asks for another ``(h, w)``."""
    channels = int(getattr(model, "yaml", {}).get("channels", 3))
    nc = int(getattr(model, "nc", 1))
    objects = max(int(max_num_obj), 1)

    def make(batch_size: int, shape: tuple[int, int] | None = None) -> dict:
        height, width = shape or (imgsz, imgsz)
        n = batch_size * objects
        xy = torch.rand(n, 2, device=device) * 0.6 + 0.2
        wh = torch.rand(n, 2, device=device) * 0.2 + 0.05
        return {
            "img": torch.rand(batch_size, channels, height, width, device=device),
            "batch_idx": torch.arange(batch_size, device=device).repeat_interleave(objects).float(),
            "cls": torch.randint(0, nc, (n, 1), device=device).float(),
            "bboxes": torch.cat([xy, wh], 1),
        }

    return make


def _dataset_batches(trainer: Any, dataset: Any):
    """Real training samples (augmented as in training), cycled through the dataset, collated, preprocessed."""
    position = 0

    def make(batch_size: int, shape: tuple[int, int] | None = None) -> dict:
        nonlocal position
        samples = [dataset[(position + i) % len(dataset)] for i in range(batch_size)]
        position += batch_size
        return _resized(trainer.preprocess_batch(dataset.collate_fn(samples)), shape)

    return make


def _training_dataset(trainer: Any) -> tuple[Any | None, int, int]:
    """(dataset, max_num_obj, size) as ``DetectionTrainer.auto_batch`` computes them; (None, 0, 0) if unknown."""
    cache = trainer.args.cache
    trainer.args.cache = False  # as Ultralytics does for this: do not fill a RAM cache just to count labels
    try:
        dataset = trainer.build_dataset(trainer.data["train"], mode="train", batch=16)
    except NotImplementedError:
        return None, 0, 0
    finally:
        trainer.args.cache = cache
    labels = getattr(dataset, "labels", None) or []
    counts = [len(label["cls"]) for label in labels if isinstance(label, dict) and "cls" in label]
    max_num_obj = max(counts, default=0) * MOSAIC_OBJECTS
    return dataset, max_num_obj, len(dataset)


# ------------------------------------------------------------------------------------------ the trainer class


class _Options:
    """What :func:`trainer_class` was asked for, validated before anything runs."""

    def __init__(
        self,
        *,
        memory_budget: int | str | None,
        device: str | torch.device | Device | None,
        max_batch_size: int | None,
        multiple_of: int,
        validate: bool,
        on_misfit: str,
        compare: bool,
        on_probe: Callable[[Probe], None] | None,
        shape_table: bool = False,
    ):
        if on_misfit not in _MISFIT:
            raise ValueError(
                f"invalid on_misfit {on_misfit!r}: expected one of {', '.join(map(repr, _MISFIT))}"
            )
        self.search = SearchOptions(memory_budget=memory_budget, device=device, max_batch_size=max_batch_size,
                                    multiple_of=multiple_of, on_probe=on_probe)  # fmt: skip
        self.validate = validate
        self.on_misfit = on_misfit
        self.compare = compare
        self.shape_table = checks.flag("shape_table", shape_table)


class _BatchlabTrainerMixin:
    """Mixed in before an Ultralytics task trainer by :func:`trainer_class`; see the module docstring.

    After training, ``batchlab_result`` holds the :class:`~batchlab.FitResult` (None when no search or check
    ran), ``batchlab_shape_table`` the multi-scale :class:`~batchlab.fit.shapes.ShapeTable` (``shape_table=True``
    with ``multi_scale > 0``; else None) and ``ultralytics_batch`` what Ultralytics' AutoBatch alone chose (only
    with ``compare=True``).
    """

    batchlab_options: _Options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batchlab_requested = self.args.batch
        self.batchlab_result: FitResult | None = None
        self.batchlab_shape_table: ShapeTable | None = None
        self.ultralytics_batch: int | None = None
        parse_batch(self.batchlab_requested)  # Ultralytics' -1 / 0.7 / 16 are batchlab's forms: fail early
        self.add_callback("on_pretrain_routine_end", _check_fixed_batch)

    def auto_batch(self, *args: Any, **kwargs: Any) -> int:
        """batchlab's search; ``BaseTrainer._setup_train`` calls this exactly when ``batch < 1``."""
        options = self.batchlab_options
        if options.compare:
            self.ultralytics_batch = int(super().auto_batch(*args, **kwargs))
        model = _unwrap(self.model)
        dataset, max_num_obj, dataset_size = _training_dataset(self)
        imgsz = self._batchlab_max_imgsz()
        if self.args.task == "detect" or dataset is None:
            make_batch = _detection_batches(model, imgsz, max_num_obj, self.device)
        else:
            make_batch = _dataset_batches(self, dataset)
        optimizer = self._batchlab_optimizer(model, dataset_size)
        amp_dtype = self._batchlab_amp_dtype()
        scaler = torch.amp.GradScaler(
            self.device.type if self.device.type == "cuda" else "cpu",
            enabled=amp_dtype is torch.float16,
        )
        from ultralytics.utils.torch_utils import ModelEMA

        ema = ModelEMA(model)  # the trainer builds one right after this call: its memory is part of training
        step = _YoloStep(
            model,
            optimizer,
            make_batch,
            amp_dtype=amp_dtype,
            scaler=scaler,
            ema=ema,
            val_factor=self._batchlab_val_factor(),
        )
        sizes = None
        if self.batchlab_options.shape_table and self.args.multi_scale > 0:
            stride = int(getattr(self, "stride", 32))
            sizes = [(s, s) for s in multi_scale_sizes(self.args.imgsz, self.args.multi_scale, stride)]
        result = self._batchlab_search(  # the scaler too: a step it skips must still create Adam's state
            step, (model, optimizer, scaler), self.batchlab_requested, dataset_size or None, sizes
        )
        if isinstance(result, ShapeTable):  # training draws every size: the largest one's batch fits them all
            self.batchlab_shape_table = result
            result = result.entries[-1].result
        del step, ema, optimizer, scaler, dataset
        self.batchlab_result = result
        log.info("batchlab: %s", result.summary())
        return result.batch_size

    # -- helpers (prefixed _batchlab_ so that they cannot shadow a trainer attribute)

    def _batchlab_max_imgsz(self) -> int:
        # As BaseTrainer.auto_batch: the largest multi-scale size, stride-aligned.
        stride = int(getattr(self, "stride", 32))
        return int(-(-self.args.imgsz * (1 + self.args.multi_scale) // stride) * stride)

    def _batchlab_amp_dtype(self) -> torch.dtype | None:
        if self.device.type == "cpu" or not bool(getattr(self, "amp", False)):
            return None
        return torch.bfloat16 if self.args.amp == "bf16" else torch.float16

    def _batchlab_val_factor(self) -> int:
        if not self.batchlab_options.validate:
            return 0
        return 1 if self.args.task in _SAME_VAL_BATCH_TASKS else 2

    def _batchlab_optimizer(self, model: torch.nn.Module, dataset_size: int) -> torch.optim.Optimizer:
        """The optimizer Ultralytics will build (``build_optimizer``), without its side effects on ``args``."""
        import math

        saved = dict(vars(self.args))  # optimizer="auto" rewrites args.optimizer, lr0 and warmup_bias_lr
        try:
            # Ultralytics' own count at the nominal batch (nbs=64): it picks the optimizer from it for "auto".
            iterations = math.ceil(max(dataset_size, 1) / self.args.nbs) * self.epochs
            return self.build_optimizer(
                model=model,
                name=self.args.optimizer,
                lr=self.args.lr0,
                momentum=self.args.momentum,
                decay=self.args.weight_decay,
                iterations=iterations,
            )
        finally:
            vars(self.args).update(saved)

    def _batchlab_search(
        self,
        step: Callable[[int], Any],
        preserve: Sequence[Any],
        batch: Any,
        dataset_size: int | None,
        shapes: list[tuple[int, int]] | None = None,
    ) -> FitResult | ShapeTable:
        options = self.batchlab_options
        model = _unwrap(self.model)
        criterion = getattr(model, "criterion", None)
        try:
            return options.search.with_changes(batch=batch).run(
                step,
                default_device=str(self.device),
                dataset_size=dataset_size,
                preserve=preserve,
                training_follows=True,
                shapes=shapes,
            )
        finally:
            model.criterion = criterion  # the loss builds it lazily on the first step: leave it as it was


def _check_fixed_batch(trainer: Any) -> None:
    """on_pretrain_routine_end: check a fixed ``batch=N`` with the trainer's own optimizer, EMA and GradScaler."""
    requested = parse_batch(trainer.batchlab_requested)
    if not requested.is_fixed:
        return
    model = _unwrap(trainer.model)
    if trainer.args.task == "detect":
        _, max_num_obj, _ = _training_dataset(trainer)
        make_batch = _detection_batches(model, trainer._batchlab_max_imgsz(), max_num_obj, trainer.device)
    else:
        make_batch = _dataset_batches(trainer, trainer.train_loader.dataset)
    per_device = max(requested.size // max(trainer.world_size, 1), 1)
    step = _YoloStep(
        model,
        trainer.optimizer,
        make_batch,
        amp_dtype=trainer._batchlab_amp_dtype(),
        scaler=trainer.scaler,
        ema=trainer.ema,
        val_factor=trainer._batchlab_val_factor(),
    )
    ema_updates = trainer.ema.updates if trainer.ema is not None else None
    preserve = (model, trainer.optimizer, trainer.scaler) + (
        (trainer.ema.ema,) if trainer.ema is not None else ()
    )
    try:
        result = trainer._batchlab_search(step, preserve, per_device, None)
    finally:
        if trainer.ema is not None:
            trainer.ema.updates = ema_updates
    trainer.batchlab_result = result
    if result.fits:
        log.info("batchlab: %s", result.summary())
        return
    message = (
        f"batch={requested.size} does not fit: one training step peaks at "
        f"{format_bytes(result.peak_bytes or result.predicted_peak_bytes)}, the budget is "
        f"{format_bytes(result.budget_bytes)} on {result.device}; use batch=-1 to find the largest that fits"
    )
    if trainer.batchlab_options.on_misfit == "raise":
        raise DoesNotFitError(
            message,
            batch_size=requested.size,
            needed_bytes=result.peak_bytes,
            budget_bytes=result.budget_bytes,
        )
    log.warning("batchlab: %s", message)


def trainer_class(
    model_or_trainer: Any,
    *,
    memory_budget: int | str | None = None,
    device: str | torch.device | Device | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    validate: bool = True,
    on_misfit: str = "warn",
    compare: bool = False,
    on_probe: Callable[[Probe], None] | None = None,
    shape_table: bool = False,
) -> type:
    """A subclass of the model's Ultralytics trainer whose batch size batchlab decides; pass it as ``trainer=``.

    Args:
        model_or_trainer: a ``YOLO`` model (its task's trainer is used) or an Ultralytics trainer class.
        memory_budget: treat the device as having this much memory ("6GiB"); default its capacity.
        device: where to measure; default the trainer's device. A :class:`~batchlab.devices.Device` is accepted
            (a ``SimulatedDevice`` in tests).
        max_batch_size, multiple_of: passed to :func:`batchlab.find_batch_size`.
        validate: also run the validation forward (EMA model, validation batch size) in every probe.
        on_misfit: what a fixed ``batch=N`` that does not fit does: ``"warn"`` (log) or ``"raise"``.
        compare: also run Ultralytics' own AutoBatch and keep its answer in ``trainer.ultralytics_batch``.
        on_probe: called with each :class:`~batchlab.Probe` as it completes.
        shape_table: with ``multi_scale > 0``, also find the largest batch at each multi-scale size
            (:func:`multi_scale_sizes`) into ``trainer.batchlab_shape_table``; training uses the largest size's.
    """
    options = _Options(
        memory_budget=memory_budget,
        device=device,
        max_batch_size=max_batch_size,
        multiple_of=multiple_of,
        validate=validate,
        on_misfit=on_misfit,
        compare=compare,
        on_probe=on_probe,
        shape_table=shape_table,
    )
    if isinstance(model_or_trainer, type):
        base = model_or_trainer
    else:
        task_map = getattr(model_or_trainer, "task_map", None)
        if task_map is None:
            raise TypeError(
                f"trainer_class expects an ultralytics YOLO model or trainer class, got {type(model_or_trainer).__name__}"
            )
        base = task_map[model_or_trainer.task]["trainer"]
    return type(f"Batchlab{base.__name__}", (_BatchlabTrainerMixin, base), {"batchlab_options": options})


def train(model: Any, *, memory_budget: int | str | None = None, **kwargs: Any) -> Any:
    """``model.train(**kwargs)`` with batchlab deciding ``batch=-1``/``0.7`` and checking a fixed ``batch=N``.

    batchlab options (``max_batch_size``, ``multiple_of``, ``validate``, ``on_misfit``, ``compare``, ``on_probe``,
    and ``batchlab_device`` -- a device to measure on, as ``device`` is Ultralytics' own) are taken out of
    ``kwargs``; everything else goes to ``model.train``. Returns what ``model.train`` returns; the search is in
    ``model.trainer.batchlab_result``; see :func:`trainer_class` for the options.
    """
    names = ("max_batch_size", "multiple_of", "validate", "on_misfit", "compare", "on_probe", "shape_table")
    ours = {name: kwargs.pop(name) for name in names if name in kwargs}
    if "batchlab_device" in kwargs:  # ``device`` itself is Ultralytics' own argument
        ours["device"] = kwargs.pop("batchlab_device")
    if "trainer" in kwargs:
        raise TypeError(
            "train() builds the trainer class itself; use trainer_class(YourTrainer, ...) instead"
        )
    return model.train(trainer=trainer_class(model, memory_budget=memory_budget, **ours), **kwargs)
