"""Fake device: a training step's memory from fake tensors -- shapes and dtypes, no data, no memory, no device.

:class:`FakeDevice` copies the workload's model and optimizer into torch's ``FakeTensorMode`` (every tensor
becomes metadata on the meta device) and runs the workload's own training step there under torch's
``MemTracker``, which follows every tensor's storage and labels it parameter, buffer, gradient, activation,
temporary or optimizer state. Two steps run, so the optimizer state created by the first ``step()`` (Adam's
two moments) is live during the second -- the same count the real devices make. The peak is read per
category at the moment it happens; nothing of the batch's size is ever allocated.

The user's model and optimizer are never touched: the copy is made by ``copy.deepcopy`` under a mode that
turns each tensor into a fake one (as torch's ``FakeCopyMode`` does), so parameters, buffers, gradients,
optimizer state and its param groups stay bitwise as they were, and no real memory is spent on the copied
tensors (other attributes -- a NumPy array kept on a module -- are copied for real). A model built on the
meta device works too: it never needs real weights.

For a CUDA target it adds what the caching allocator adds over the tensors (:class:`CachingAllocatorModel`:
512-byte blocks, small allocations packed into 2 MiB segments, mid-sized ones into 20 MiB, large ones rounded
to 2 MiB) and torch's cuBLAS workspace; the CUDA context is outside torch's counters and is taken off the
target's capacity instead (:mod:`batchlab.planning.cards`). Without CUDA in this torch build, fake CUDA tensors
cannot run a backward pass (autograd asks the missing CUDA backend for a stream and the process aborts), so
a CUDA target is emulated with fake CPU tensors: CPU autocast stands in for CUDA autocast (their op lists
differ slightly), attention picks CPU kernels, and the optimizer is told to use the ``foreach`` step torch
picks by default for CUDA tensors. The estimate says which way it ran (``FakeEstimate.emulated_on``).

Recurrent layers: on the CPU, ``nn.LSTM`` runs oneDNN's kernel (``aten.mkldnn_rnn_layer``, one call per layer
and direction), whose training workspace -- every step's gates and states, kept for the backward pass -- is
most of an LSTM's activation memory; torch's fake kernel returns it empty, so :class:`KernelWorkspaces` puts
back the size oneDNN allocates (:func:`batchlab.planning.kernels.onednn_lstm_workspace_bytes`). ``nn.GRU`` and ``nn.RNN`` run as
ordinary per-step ops on the CPU, which fake tensors count as they are. On a CUDA card all three run cuDNN,
whose reserve space torch's fake kernel also returns empty and cuDNN sizes at run time: with fake CUDA
tensors that kernel is refused; CUDA emulated on the CPU counts the CPU kernels' memory instead, and says so.

What fake tensors cannot run: a value-dependent op (``.item()``, ``bool(tensor)``, ``torch.nonzero``,
boolean-mask indexing), a kernel with no fake implementation (a custom op) or one whose memory the fake
kernel leaves out (cuDNN's RNN). Those raise :class:`FakeTensorError` naming the op; the real search
(``find_batch_size`` on the device) still works.

torch's pieces here are private modules (``torch._subclasses.fake_tensor``,
``torch.distributed._tools.mem_tracker``): they are imported in :func:`_torch_internals` only, with a
version check, and tested on their own.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from batchlab import checks
from batchlab.devices.base import Device, Measurement
from batchlab.errors import FakeTensorError, WorkloadError
from batchlab.memory import MemoryBreakdown
from batchlab.planning.allocator import CachingAllocatorModel
from batchlab.planning.cards import CUBLAS_WORKSPACE_BYTES_SM90, PlanTarget, resolve_target
from batchlab.planning.kernels import KernelWorkspaces, UncountedKernel
from batchlab.workload.workload import Workload

MIN_TORCH = (2, 5)  # MemTracker first shipped in torch 2.5


# MemTracker's category labels (the values of its private enum) -> batchlab's names.
_CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer_state",
    "Other": "other",
}


_internals: dict[str, Any] = {}


def _torch_internals() -> dict[str, Any]:
    """Import the private torch pieces once (MemTracker's import takes seconds: it pulls in torch.distributed)."""
    if not _internals:
        version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
        if version < MIN_TORCH:
            raise ImportError(
                f"the fake device needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (MemTracker); this is {torch.__version__}"
            )
        try:
            from torch._subclasses import fake_tensor
            from torch.distributed._tools.mem_tracker import MemTracker
        except ImportError as exc:  # a torch build without torch.distributed
            raise ImportError(
                f"the fake device needs torch.distributed._tools.mem_tracker, missing from this torch "
                f"({torch.__version__}): {exc}"
            ) from None
        _internals.update(
            FakeTensorMode=fake_tensor.FakeTensorMode,
            MemTracker=MemTracker,
            value_dependent=fake_tensor.DataDependentOutputException,
            dynamic_shape=fake_tensor.DynamicOutputShapeException,
            no_kernel=fake_tensor.UnsupportedOperatorException,
        )
    return _internals


@dataclass(frozen=True)
class FakeEstimate:
    """A fake-tensor estimate of ``steps`` training steps at ``batch_size``.

    ``peak_bytes`` is counted like the target's capacity (CUDA: reserved by the caching allocator, CPU: the
    tensors' bytes) and equals ``breakdown.total``; ``baseline_bytes`` is what the model's parameters,
    buffers, gradients and optimizer state held before the step, counted the same way; ``allocated_bytes``
    is the peak of live tensors (CUDA: 512-byte blocks plus the workspace, like ``max_memory_allocated``).
    """

    batch_size: int
    device_type: str
    emulated_on: str
    amp: str | None
    peak_bytes: int
    baseline_bytes: int
    allocated_bytes: int
    breakdown: MemoryBreakdown
    steps: int
    seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


class _FakeCopy(TorchFunctionMode):
    """Inside it, ``copy.deepcopy`` makes every tensor a fake one on ``device``: no data, no memory.

    The same interception as torch's ``FakeCopyMode`` (``Parameter.__deepcopy__`` clones ``.data``; plain
    tensors go through ``Tensor.__deepcopy__``), plus the move to the target device -- done on the fake, so it
    allocates nothing either.
    """

    def __init__(self, fake_mode: Any, device: torch.device):
        super().__init__()
        self.fake_mode = fake_mode
        self.device = device

    def _fake(self, tensor: torch.Tensor, *, parameter: bool = False) -> torch.Tensor:
        if tensor.dim() == 0 and tensor.device.type == "cpu" and not parameter:
            # CPU scalars (optimizer step counts, BatchNorm's num_batches_tracked) stay CPU constants: fake
            # tensors keep a constant's value, and optimizers read their step count with .item().
            value = (
                tensor.item()
            )  # read outside the fake mode, which would turn the real tensor into a fake one
            with self.fake_mode:
                return torch.tensor(value, dtype=tensor.dtype)
        fake = self.fake_mode.from_tensor(tensor, static_shapes=True)
        if fake.device != self.device:
            with self.fake_mode, torch.no_grad():
                fake = fake.to(
                    device=self.device
                )  # a torch.device with an index: "cuda" alone needs a real GPU
            if tensor.requires_grad:
                fake.requires_grad_(True)
        return fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.clone:  # only Parameter.__deepcopy__ clones during the copy
            return self._fake(args[0], parameter=True)
        if func is torch.Tensor.__deepcopy__:
            tensor, memo = args
            if id(tensor) not in memo:
                memo[id(tensor)] = self._fake(tensor)
            return memo[id(tensor)]
        return func(*args, **kwargs)


def _use_cuda_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Ask for the ``foreach`` step that torch picks for CUDA tensors when ``foreach`` is left as None.

    torch decides from the parameters' type and device (``_default_to_fused_or_foreach``); fake tensors fail
    the type check and emulated CUDA runs on the CPU, so without this the fake step would take the
    single-tensor path and miss the foreach path's temporaries (a copy of the state, per device and dtype).
    """
    for group in optimizer.param_groups:
        if (
            "foreach" in group
            and group["foreach"] is None
            and not group.get("fused")
            and not group.get("differentiable")
        ):
            group["foreach"] = True


def _op_name(exc: BaseException) -> str:
    func = getattr(exc, "func", None)
    if func is not None:
        return str(func)
    match = re.search(r"<CustomOpDef\(([^)]*)\)>", str(exc))
    return match.group(1) if match else "an operator"


def _fake_error(exc: BaseException, workload: str) -> FakeTensorError | None:
    """Classify an exception from a fake step: a :class:`FakeTensorError` naming the op, or None (not ours)."""
    torch_ = _torch_internals()
    if isinstance(exc, torch_["value_dependent"]):
        why = (
            "needs a tensor's value (.item(), .tolist(), bool(tensor) or Python control flow on a tensor); "
            "fake tensors carry shapes, not values"
        )
    elif isinstance(exc, torch_["dynamic_shape"]):
        why = (
            "has an output shape that depends on tensor values (torch.nonzero, boolean-mask indexing, "
            "torch.unique); fake tensors carry shapes, not values"
        )
    elif isinstance(exc, UncountedKernel):
        why = exc.why
    elif isinstance(exc, torch_["no_kernel"]) or (
        isinstance(exc, RuntimeError) and "no fake impl registered" in str(exc)
    ):
        why = "has no fake (meta) kernel -- a custom or third-party kernel; torch.library.register_fake adds one"
    else:
        return None
    op = _op_name(exc)
    return FakeTensorError(
        f"the fake-tensor estimate cannot run workload {workload!r}: {op} {why}. "
        "Measure on the device instead (batchlab fit / find_batch_size)",
        op=op,
        workload=workload,
    )


class FakeDevice(Device):
    """A device that runs the workload's step on fake tensors and reports the estimated peak -- no memory used.

    Args:
        workload: the :class:`~batchlab.Workload` to estimate (its model and optimizer are copied to fake
            tensors for every run and never modified). Its ``amp`` and ``grad_accum`` apply.
        target: what the step is planned for: a card name from :data:`batchlab.planning.cards.CARDS`, a memory size
            (``"24GiB"``) or a :class:`~batchlab.planning.cards.PlanTarget`. It sets the capacity a search holds
            estimates against. None: estimates only (:meth:`capacity_bytes` raises).
        device_type: ``"cuda"`` or ``"cpu"``: the target's device type when ``target`` is a memory size or
            None (default: ``"cuda"`` with a target, ``"cpu"`` without).

    :meth:`run` makes the fake device searchable like any other (``find_batch_size(..., device=fake)``); it
    runs its own fake copy of the workload's step and never calls the ``step`` callable it is given (the
    user's real step would allocate the real batch). Every estimate is kept in :attr:`estimates`.
    """

    def __init__(
        self,
        workload: Workload,
        *,
        target: str | int | PlanTarget | None = None,
        device_type: str | None = None,
    ) -> None:
        if not isinstance(workload, Workload):
            raise TypeError(
                "FakeDevice needs a batchlab.Workload (model, make_batch, loss_fn, optimizer) to copy to fake "
                f"tensors; a plain step callable cannot be copied. Got {type(workload).__name__}"
            )
        _torch_internals()  # fail here, before any search, on a torch without MemTracker
        if target is None:
            kind = device_type or "cpu"
            if kind not in ("cuda", "cpu"):
                raise ValueError(f"invalid device_type {device_type!r}: expected 'cuda' or 'cpu'")
            self.target = None
            self.device_type = kind
            self.cublas_workspace_bytes = CUBLAS_WORKSPACE_BYTES_SM90 if kind == "cuda" else 0
        else:
            self.target = resolve_target(target, device_type=device_type)
            self.device_type = self.target.device_type
            self.cublas_workspace_bytes = self.target.cublas_workspace_bytes
        self.workload = workload
        self.name = f"fake {self.device_type}" + (f" ({self.target.name})" if self.target else "")
        self.estimates: dict[int, FakeEstimate] = {}
        self.extra_notes: list[str] = []  # what a subclass adds to every estimate's notes

    @property
    def emulated_on(self) -> torch.device:
        """The device the fake tensors claim: the target's type, except CUDA without CUDA in this torch."""
        if self.device_type == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def capacity_bytes(self) -> int:
        if self.target is None:
            raise ValueError("this FakeDevice has no target: pass target='24GiB' or a card name to search it")
        return self.target.capacity_bytes

    def in_use_bytes(self) -> int:
        return 0  # fake tensors hold no memory

    def _begin(self) -> int:  # pragma: no cover - run() is overridden
        return 0

    def _end(self) -> tuple[int, None]:  # pragma: no cover - run() is overridden
        return 0, None

    def estimate(self, batch_size: int, steps: int = 2) -> FakeEstimate:
        """Estimate ``steps`` training steps at ``batch_size`` on fake tensors (two: optimizer state exists in the second).

        Raises :class:`FakeTensorError` when the step needs real values or a kernel fake tensors lack.
        """
        checks.integer("batch_size", batch_size)
        checks.integer("steps", steps)
        torch_ = _torch_internals()
        started = time.perf_counter()
        fake_mode = torch_["FakeTensorMode"](allow_non_fake_inputs=True)  # make_batch may index real data
        with self._environment():
            return self._estimate(torch_, fake_mode, batch_size, steps, started)

    def _environment(self) -> contextlib.AbstractContextManager:
        """What the fake step runs inside (a subclass: a fake process group); nothing here."""
        return contextlib.nullcontext()

    def _copy(self, fake_mode: Any, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The workload's model and optimizer as fake tensors on ``device`` (a subclass may shard them)."""
        work = self.workload
        try:
            with _FakeCopy(fake_mode, device):
                return copy.deepcopy((work.model, work.optimizer))  # one memo: tied weights stay tied
        except Exception as exc:  # a lock, a file handle, a generator held by the model: batchlab's limit
            raise WorkloadError(
                f"cannot copy workload {work.name!r}'s model and optimizer to fake tensors "
                f"({type(exc).__name__}: {exc}); measure on the device instead (batchlab fit / find_batch_size)"
            ) from exc

    def _tracker(
        self, torch_: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Any:
        """torch's MemTracker, following the copy's model and optimizer."""
        tracker = torch_["MemTracker"]()
        tracker.track_external(model, optimizer)
        return tracker

    # MemTracker's category labels (the values of its private enum) -> batchlab's names.
    categories: dict[str, str] = _CATEGORIES

    def _estimate(
        self, torch_: dict[str, Any], fake_mode: Any, batch_size: int, steps: int, started: float
    ) -> FakeEstimate:
        work = self.workload
        device = self.emulated_on
        model, optimizer = self._copy(fake_mode, device)
        notes = list(self.extra_notes)
        if self.device_type == "cuda":
            _use_cuda_foreach(optimizer)
            if device.type == "cpu":
                notes.append(
                    "CUDA emulated on fake CPU tensors (no CUDA in this torch build): CPU autocast and CPU "
                    "attention kernels stand in for CUDA's"
                )
                if any(isinstance(module, torch.nn.RNNBase) for module in model.modules()):
                    notes.append(
                        "recurrent layers counted as the CPU runs them (oneDNN's LSTM workspace, GRU/RNN step by "
                        "step); on the card cuDNN sizes its own reserve space at run time -- verify with batchlab fit"
                    )
        if work.amp == "fp16":
            notes.append("fp16: GradScaler skipped (its inf check reads a value); its unscale is in place")
        tracker = self._tracker(torch_, model, optimizer)

        def make_batch(batch_size: int) -> Any:
            tracker.reset_mod_stats()  # per-module stats only: MemTracker refuses a second root forward without it
            return work.make_batch(batch_size)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradScaler/autocast "CUDA is not available" for emulated CUDA
            shadow = Workload(
                model,
                make_batch,
                work.loss_fn,
                optimizer,
                amp=work.amp,
                grad_accum=work.grad_accum,
                name=work.name,
            )
        shadow.scaler = None
        allocator = CachingAllocatorModel() if self.device_type == "cuda" else None
        try:
            with fake_mode:
                start = tracker.get_tracker_snapshot("current").get(device, {})
                if allocator is not None:
                    for tensor in _state_tensors(model, optimizer):
                        allocator.track(tensor)
                    baseline_reserved = allocator.reserved
                # Order matters: MemTracker and the allocator model must see the workspaces put back.
                with (
                    KernelWorkspaces(),
                    tracker,
                    allocator if allocator is not None else contextlib.nullcontext(),
                ):
                    for _ in range(steps):
                        shadow.step(batch_size)
                peak = tracker.get_tracker_snapshot("peak").get(device, {})
        except Exception as exc:
            error = _fake_error(exc, work.name)
            if error is None:
                raise
            raise error from exc
        by_label = {getattr(key, "value", key): value for key, value in peak.items()}
        tensors_peak = int(by_label.get("Total", 0))
        counts: dict[str, int] = {}
        for label, name in self.categories.items():
            counts[name] = counts.get(name, 0) + int(by_label.get(label, 0))
        baseline = int(sum(value for key, value in start.items() if getattr(key, "value", key) != "Total"))
        if allocator is None:
            breakdown = MemoryBreakdown(**counts)
            allocated = tensors_peak
        else:
            rounding = max(0, allocator.peak_reserved - tensors_peak)
            breakdown = MemoryBreakdown(
                **counts, allocator_overhead=rounding, cuda_workspace=self.cublas_workspace_bytes
            )
            allocated = max(allocator.peak_allocated, tensors_peak) + self.cublas_workspace_bytes
            baseline = max(baseline, baseline_reserved)
        return FakeEstimate(
            batch_size=batch_size,
            device_type=self.device_type,
            emulated_on=device.type,
            amp=work.amp,
            peak_bytes=breakdown.total,
            baseline_bytes=baseline,
            allocated_bytes=allocated,
            breakdown=breakdown,
            steps=steps,
            seconds=time.perf_counter() - started,
            notes=tuple(notes),
        )

    def run(self, step: Any, batch_size: int, steps: int = 2) -> Measurement:
        """Estimate ``steps`` steps at ``batch_size`` as a :class:`Measurement` (``ok``: fake tensors never run out).

        ``step`` is not called: the fake device runs its own fake copy of its workload's step. Whether the
        estimate fits a budget is the search's call, as with every device.
        """
        estimate = self.estimate(batch_size, steps)
        self.estimates[batch_size] = estimate
        allocated = estimate.allocated_bytes if self.device_type == "cuda" else None
        return Measurement(
            batch_size, True, estimate.peak_bytes, estimate.baseline_bytes, estimate.seconds, steps, allocated
        )

    def __repr__(self) -> str:
        return f"FakeDevice({self.workload.name}, {self.name}, emulated on {self.emulated_on.type})"


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor that exists before a step: parameters, their gradients, buffers, optimizer state."""
    tensors: list[torch.Tensor] = []
    for param in model.parameters():
        tensors.append(param)
        if param.grad is not None:
            tensors.append(param.grad)
    tensors.extend(model.buffers())
    for state in optimizer.state.values():
        tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
    # a DTensor (a sharded copy, planning.sharded) holds its local shard's storage
    return [t.to_local() if callable(getattr(t, "to_local", None)) else t for t in tensors]


__all__ = ["FakeDevice", "FakeEstimate"]
