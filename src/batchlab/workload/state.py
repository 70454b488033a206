"""Take and restore everything a training step changes, bitwise.

A probe runs real training steps: the optimizer moves the weights, Adam creates its moments, BatchNorm
updates its running statistics, an LR scheduler advances, ``make_batch`` draws from the RNG. A
:class:`StateSnapshot` records all of it before the first probe and puts it back after every probe, so the
search never trains the user's model and every probe starts from the state the user's own first step will
start from (no optimizer state yet, if there was none) -- which is why the optimizer state's creation is
counted in every measured peak.

What is copied is what a step can change -- parameters, buffers, existing gradients, the optimizer's state,
GradScaler and LR-scheduler state -- never the model object itself. Frozen parameters (``requires_grad=False``)
are copied too: an EMA model's weights are frozen and updated in place every step (Ultralytics' ``ModelEMA``),
and code that writes through ``.data`` leaves no trace in the version counter, so "unchanged" cannot be
inferred. Identity is kept too: a step that *reassigns* a parameter or buffer (``module.w =
nn.Parameter(...)``) gets the original object back, and gradients are restored into the original ``.grad``
tensors (DDP's ``gradient_as_bucket_view`` makes them views into its buckets; a new tensor would break
that). Copies live on the host -- in RAM, or in a temporary folder on disk when RAM cannot hold them
(:func:`copy_storage`) -- so a CUDA search does not spend GPU memory on its own bookkeeping.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchlab.errors import BatchlabError
from batchlab.memory import held_bytes
from batchlab.units import format_bytes

# A copy in RAM may take at most this share of the host's free memory: the rest is the probes' (CPU) or the
# runtime's (CUDA). Above it the copy goes to disk when there is room there, else the search refuses.
HOST_COPY_FRACTION = 0.5
STORAGES = ("auto", "memory", "disk")
_TMPFS_TYPES = {"tmpfs", "ramfs"}  # a "disk" copy there would sit in RAM after all


def _nbytes(tensor: torch.Tensor) -> int:
    return held_bytes(tensor)


@dataclass(frozen=True)
class _Copy:
    """One tensor's values on the host: ``values`` in RAM, or a file at ``path``; ``device`` to go back to."""

    values: torch.Tensor | None
    path: str | None
    device: torch.device
    nbytes: int


class _Store:
    """Host copies of tensors: in RAM, or (``directory`` given) one file per tensor in that folder."""

    def __init__(self, directory: str | None = None):
        self.directory = tempfile.mkdtemp(prefix="batchlab-state-", dir=directory) if directory else None
        self.ram_bytes = 0
        self.disk_bytes = 0
        self._count = 0
        if self.directory is not None:
            weakref.finalize(self, shutil.rmtree, self.directory, True)

    def put(self, tensor: torch.Tensor) -> _Copy:
        values = tensor.detach().to("cpu", copy=True)
        nbytes = _nbytes(values)
        if self.directory is None:
            self.ram_bytes += nbytes
            return _Copy(values, None, tensor.device, nbytes)
        path = os.path.join(self.directory, f"{self._count}.pt")
        self._count += 1
        torch.save(values, path)
        self.disk_bytes += nbytes
        return _Copy(None, path, tensor.device, nbytes)

    @staticmethod
    def values(saved: _Copy) -> torch.Tensor:
        if saved.values is not None:
            return saved.values
        return torch.load(saved.path, mmap=True, weights_only=True)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _save(value: Any, store: _Store) -> Any:
    """A deep copy with every tensor copied to the host store (values only; no autograd history)."""
    if isinstance(value, torch.Tensor):
        return store.put(value)
    if isinstance(value, dict):
        return {key: _save(item, store) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_save(item, store) for item in value)
    return copy.deepcopy(value)


def _load(saved: Any) -> Any:
    """A fresh live copy of something :func:`_save` produced, each tensor back on its own device."""
    if isinstance(saved, _Copy):
        return _Store.values(saved).to(saved.device, copy=True)
    if isinstance(saved, dict):
        return {key: _load(item) for key, item in saved.items()}
    if isinstance(saved, (list, tuple)):
        return type(saved)(_load(item) for item in saved)
    return copy.deepcopy(saved)


def _state_nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return _nbytes(value)
    if isinstance(value, dict):
        return sum(_state_nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_nbytes(item) for item in value)
    return 0


@dataclass
class RNGState:
    """The global random states a step may draw from: Python, NumPy, torch CPU and every CUDA device.

    CUDA is initialised lazily; when a probe is what initialises it, there is no earlier CUDA state to copy.
    Then :meth:`restore` reseeds each CUDA generator with its own initial seed (offset 0) -- exactly the state
    a first initialisation gives, including a seed queued by ``torch.manual_seed`` before it.
    """

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None  # None: CUDA was not initialised when captured

    @classmethod
    def capture(cls) -> RNGState:
        initialized = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda = torch.cuda.get_rng_state_all() if initialized else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        elif torch.cuda.is_available() and torch.cuda.is_initialized():  # the probe initialised CUDA
            for index in range(torch.cuda.device_count()):
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(torch.cuda.initial_seed())


class _GradScalerCopy:
    """A GradScaler's state, including the parts ``state_dict`` leaves out.

    ``state_dict`` holds scale and growth tracker; two private attributes matter too: a scaler that has never
    scaled has no scale tensor yet (``_scale is None``, created lazily from the initial scale), and a probe that
    failed between ``unscale_`` and ``update`` leaves a per-optimizer stage behind (``_per_optimizer_states``)
    that would make the user's next ``unscale_`` raise. Both are put back; this is the one place batchlab
    touches GradScaler internals (checked with ``hasattr``, tested in tests/test_state.py).
    """

    def __init__(self, scaler: Any):
        self.state = scaler.state_dict()
        self.lazy = getattr(scaler, "_scale", None) is None
        self.per_optimizer = copy.deepcopy(getattr(scaler, "_per_optimizer_states", None))

    def restore(self, scaler: Any) -> None:
        if self.state:  # a disabled scaler has none
            scaler.load_state_dict(self.state)
        if self.lazy and hasattr(scaler, "_scale"):
            scaler._scale = None
            scaler._growth_tracker = None
        if self.per_optimizer is not None:
            scaler._per_optimizer_states = copy.deepcopy(self.per_optimizer)


def is_grad_scaler(obj: Any) -> bool:
    """True for ``torch.amp.GradScaler`` (and ``torch.cuda.amp.GradScaler``, a subclass)."""
    return isinstance(obj, torch.amp.GradScaler)


def is_lr_scheduler(obj: Any) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)


_MISSING = object()


@dataclass
class StateSnapshot:
    """A copy of modules', optimizers' and schedulers' state (and the RNGs), restorable any number of times.

    Use :meth:`capture` to take one, :meth:`restore` to put it back and :meth:`close` when done (a copy on disk
    is deleted then). ``nbytes`` is the host RAM the copy holds (on a CPU search it sits in the measured
    process, so it is reported, not hidden) and ``disk_bytes`` what it keeps on disk.
    """

    modules: list[torch.nn.Module] = field(default_factory=list)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)  # GradScalers, LR schedulers, objects with state_dict()
    _store: _Store = field(default_factory=_Store, repr=False)
    _registries: list[tuple[dict, dict]] = field(default_factory=list, repr=False)
    _values: list[tuple[torch.Tensor, _Copy]] = field(default_factory=list, repr=False)
    _grads: list[tuple[torch.Tensor, torch.Tensor | None, _Copy | None]] = field(
        default_factory=list, repr=False
    )
    _training: list[tuple[torch.nn.Module, bool]] = field(default_factory=list, repr=False)
    _optimizer_states: list[tuple[dict, list[dict], Any]] = field(default_factory=list, repr=False)
    _extra_states: list[Any] = field(default_factory=list, repr=False)
    _rng: RNGState | None = field(default=None, repr=False)

    @staticmethod
    def copy_bytes(
        modules: list[torch.nn.Module] | tuple = (), optimizers: list[torch.optim.Optimizer] | tuple = ()
    ) -> int:
        """Bytes a snapshot of these would copy, computed without copying anything."""
        tensors = _tensors(modules)
        grads = [t.grad for t in tensors if isinstance(t, torch.nn.Parameter) and t.grad is not None]
        return sum(_nbytes(t) for t in tensors + grads) + sum(
            _state_nbytes(values) for optimizer in optimizers for values in optimizer.state.values()
        )

    @classmethod
    def capture(
        cls,
        modules: list[torch.nn.Module] | tuple = (),
        optimizers: list[torch.optim.Optimizer] | tuple = (),
        extra: list[Any] | tuple = (),
        *,
        directory: str | os.PathLike | None = None,
    ) -> StateSnapshot:
        """Copy the state of ``modules``, ``optimizers`` and ``extra``; to files under ``directory`` if given."""
        snap = cls(
            list(modules), list(optimizers), list(extra), _Store(str(directory) if directory else None)
        )
        store = snap._store
        seen_modules: set[int] = set()
        for module in snap.modules:
            for sub in module.modules():
                if id(sub) in seen_modules:
                    continue
                seen_modules.add(id(sub))
                snap._training.append((sub, sub.training))
                for registry in (sub._parameters, sub._buffers):  # identity, so a reassignment is undone
                    snap._registries.append((registry, dict(registry)))
        for tensor in _tensors(snap.modules):
            snap._values.append((tensor, store.put(tensor)))
            if isinstance(tensor, torch.nn.Parameter):
                grad = tensor.grad
                snap._grads.append((tensor, grad, None if grad is None else store.put(grad)))
        for optimizer in snap.optimizers:
            state = {param: _save(values, store) for param, values in optimizer.state.items()}
            groups = [
                {key: _save(val, store) for key, val in group.items() if key != "params"}
                for group in optimizer.param_groups
            ]
            # An LR scheduler marks the optimizer when it steps (to warn about a scheduler step before it).
            snap._optimizer_states.append((state, groups, getattr(optimizer, "_opt_called", _MISSING)))
        snap._extra_states = [
            _GradScalerCopy(obj) if is_grad_scaler(obj) else _save(obj.state_dict(), store)
            for obj in snap.extra
        ]
        snap._rng = RNGState.capture()
        return snap

    @property
    def nbytes(self) -> int:
        """Host RAM held by the copies (parameters, buffers, gradients, optimizer state)."""
        return self._store.ram_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of the copy kept on disk instead of RAM (0 unless captured with ``directory``)."""
        return self._store.disk_bytes

    @property
    def storage(self) -> str:
        return "disk" if self._store.directory is not None else "memory"

    def restore(self) -> None:
        """Put every recorded value (and object) back, in place; safe to call repeatedly."""
        for registry, original in self._registries:
            if registry.keys() != original.keys() or any(registry[k] is not v for k, v in original.items()):
                registry.clear()
                registry.update(original)
        with torch.no_grad():
            for live, saved in self._values:
                live.copy_(_Store.values(saved))
        for param, original, saved in self._grads:
            if original is None:
                param.grad = None
                continue
            with torch.no_grad():
                original.copy_(_Store.values(saved))
            if param.grad is not original:
                param.grad = original
        for module, training in self._training:
            module.training = training
        for optimizer, (state, groups, called) in zip(self.optimizers, self._optimizer_states):
            optimizer.state.clear()
            for param, values in state.items():
                optimizer.state[param] = _load(values)
            for group, saved_group in zip(optimizer.param_groups, groups):
                params = group["params"]
                group.clear()
                group.update(_load(saved_group))
                group["params"] = params
            if called is _MISSING:
                vars(optimizer).pop("_opt_called", None)
            else:
                optimizer._opt_called = called
        for obj, saved in zip(self.extra, self._extra_states):
            if isinstance(saved, _GradScalerCopy):
                saved.restore(obj)
            else:
                obj.load_state_dict(_load(saved))
        if self._rng is not None:
            self._rng.restore()

    def close(self) -> None:
        """Delete a copy kept on disk (a copy in RAM is freed with the snapshot)."""
        self._store.close()


def _tensors(modules: list[torch.nn.Module] | tuple) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``, each once (tied weights are one tensor)."""
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            found.setdefault(id(tensor), tensor)
    return list(found.values())


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; "" where that cannot be read)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    resolved, best = str(path.resolve()), ("", "")
    for mount_point, fs_type in mounts:
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best[0]):
            best = (mount_point, fs_type)
    return best[1]


def copy_storage(
    copy_bytes: int,
    host_room_bytes: int,
    *,
    requested: str = "auto",
    directory: str | os.PathLike | None = None,
    must_leave_ram: bool = False,
) -> str | None:
    """Where the state copy goes: ``None`` for RAM, or a directory for a copy on disk; raise if neither fits.

    ``host_room_bytes`` is the host memory free for this process to grow into. ``"auto"`` keeps the copy in
    RAM when it takes at most ``HOST_COPY_FRACTION`` of that room (and ``must_leave_ram`` is False: the CPU
    search asks for disk when the copy would push its probes over the hard limit), else on disk -- a folder
    on a real disk (``directory``, ``BATCHLAB_STATE_DIR`` or the system's temporary folder; tmpfs is RAM).
    Raising before anything is copied is the point: a host out-of-memory is never the answer.
    """
    if requested not in STORAGES:
        raise ValueError(
            f"invalid state_copy {requested!r}: expected one of {', '.join(map(repr, STORAGES))}"
        )
    fits_ram = copy_bytes <= HOST_COPY_FRACTION * host_room_bytes
    if requested == "memory" or (requested == "auto" and fits_ram and not must_leave_ram):
        if not fits_ram:
            raise BatchlabError(
                f"the state copy needs {format_bytes(copy_bytes)} of host RAM and only "
                f"{format_bytes(host_room_bytes)} is free (a copy may take {HOST_COPY_FRACTION:.0%}); "
                "pass state_copy='disk' to keep it on disk"
            )
        return None
    folder = Path(directory or os.environ.get("BATCHLAB_STATE_DIR") or tempfile.gettempdir())
    if _filesystem_type(folder) in _TMPFS_TYPES:
        raise BatchlabError(
            f"the state copy ({format_bytes(copy_bytes)}) does not fit in host RAM and {folder} is a RAM "
            "filesystem; set BATCHLAB_STATE_DIR to a folder on a disk"
        )
    free = shutil.disk_usage(folder).free
    if copy_bytes > free:
        raise BatchlabError(
            f"the state copy needs {format_bytes(copy_bytes)}: more than the host RAM can spare "
            f"({format_bytes(host_room_bytes)} free) and the {format_bytes(free)} free in {folder}; set "
            "BATCHLAB_STATE_DIR to a folder with room"
        )
    return str(folder)
