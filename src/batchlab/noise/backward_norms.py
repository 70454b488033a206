"""Squared gradient norms per backward pass, fused: what the noise-scale collectors read from a training loop.

For the backward passes over a set of parameters since the last :meth:`BackwardNorms.take`, it gives

- |Δ|² for each pass: the squared norm of that backward's own contribution Δ to ``.grad`` (one micro-batch's
  gradient), and
- |A|²: the squared norm of ``.grad`` after the last pass (the gradient the passes accumulated),

which is all McCandlish's two-batch estimator needs (Σ_i |Δ_i|² over the micro-batches, |A_n|² of their sum).
Issue 13, item 5: the collector must be cheap enough to leave on. The first version ran several tensor
operations per parameter tensor per backward inside tensor hooks (a norm and a dot product with the
accumulated gradient, each a dispatch): +25% on mlp-digits' 5 ms step (benchmarks/RESULTS.md).

How, and why this way (all of these are exact; they differ in passes over the gradients, dispatches, memory):

- *A running copy* of ``.grad``, |A_i − A_{i−1}|² after each backward: three fused passes per micro-batch
  (subtract, norm, copy) and a persistent copy of the gradients. Measured on mlp-digits: +18%.
- *Norms inside the hooks* (one ``vector_norm`` per tensor per micro-batch): one dispatch per tensor; +15%.
- *Here*: the tensor hook on each parameter does no arithmetic. It keeps a reference to the incoming gradient
  Δ_p -- only when ``.grad`` already exists; when it does not, Δ_p *becomes* ``.grad`` and is read there, so
  autograd still steals it instead of copying -- and asks autograd once per backward for a callback at its
  end (the engine callback DDP's reducer uses). The callback takes **one** ``torch._foreach_norm`` over the
  held Δ's (per-tensor norms in one dispatch; a fused multi-tensor kernel on CUDA). |A|² is needed only after
  a window's last pass, which a hook cannot know is the last: the window's length is learned from the one
  before (accumulation is the same every step in nearly every loop), and from that pass on ``.grad`` joins
  the same fused call. A window shorter than the one before has no |A|² (the collector counts it as
  unmeasured); a longer one reads it at every extra pass; the first reads it at every pass. Held Δ's are
  normed early whenever they exceed :data:`BUCKET_BYTES`, so the extra memory is bounded. The per-tensor
  norms stay on the device until :func:`squared_sums`: one sync per optimizer step.

Why not read |A|² at :meth:`take` instead: by then the loop may have unscaled or clipped ``.grad``, and
``GradScaler.unscale_`` writes it without bumping its version counter (measured, torch 2.14), so a changed
gradient cannot even be detected. ``.grad`` is read only at the end of a backward and never written.

What remains on a tiny step is the per-tensor cost of a Python hook call (measured ~1-2% of mlp-digits' step,
with hooks that do nothing) and a few dispatches per micro-batch. ``.grad`` is never written. Each parameter
gets one gradient per backward; passes are counted per parameter (the largest count), so a backward nested in
another (reentrant activation checkpointing) is not counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

__all__ = ["BackwardNorms", "Window", "squared_sums", "BUCKET_BYTES"]

# Incoming gradients held at most before their norms are taken mid-backward: DDP's default bucket
# (bucket_cap_mb=25, torch.nn.parallel.DistributedDataParallel), the transient copy DDP already holds.
BUCKET_BYTES = 25 * 1024 * 1024
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # norms of these are computed in float32


def engine_hooks() -> tuple:
    """The two private autograd entry points this module needs, checked once: (queue_callback, graph_task_id).

    ``Variable._execution_engine.queue_callback`` runs a function when the current backward has finished
    (every gradient accumulated); ``torch._C._current_graph_task_id`` tells one backward from another (torch's
    own ``register_multi_grad_hook`` uses it). Both exist from torch 2.1; tests/test_noise_norms.py checks the
    behaviour this module relies on."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    if queue is None or task_id is None or not hasattr(torch, "_foreach_norm"):
        raise RuntimeError(
            f"torch {torch.__version__} lacks the autograd engine callback or the fused norm the noise-scale "
            f"collectors use (Variable._execution_engine.queue_callback, torch._C._current_graph_task_id, "
            f"torch._foreach_norm); torch >= 2.1 has them"
        )
    return queue, task_id


def _norms(tensors: Sequence[torch.Tensor], mixed: bool = True) -> list[torch.Tensor]:
    """Per-tensor 2-norms (0-d tensors, order kept): one fused call when every tensor is fp32/fp64 (known when
    ``mixed`` is False), else one per precision group (fp16/bf16 computed in fp32, as a sum of many small
    squares needs)."""
    if not tensors:
        return []
    if not mixed or not any(t.dtype in _LOW_PRECISION for t in tensors):
        return list(torch._foreach_norm(tensors))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for low, dtype in ((True, torch.float32), (False, None)):
        index = [i for i, t in enumerate(tensors) if (t.dtype in _LOW_PRECISION) == low]
        if index:
            for i, n in zip(index, torch._foreach_norm([tensors[i] for i in index], 2, dtype)):
                out[i] = n
    return out  # type: ignore[return-value]


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t  # rare (sparse embeddings); correctness over speed


@dataclass
class Window:
    """What the backward passes since the last :meth:`BackwardNorms.take` left: per-tensor norms, on the device.

    ``deltas``: the norms of each pass's contribution Δ_p (every pass, every parameter it reached);
    ``accumulated``: the norms of ``.grad`` after the last pass; ``passes``: how many backward passes.
    """

    deltas: list[torch.Tensor] = field(default_factory=list)
    accumulated: list[torch.Tensor] = field(default_factory=list)
    passes: int = 0


def squared_sums(*lists: list[torch.Tensor]) -> list[float]:
    """Σ‖·‖² of each list of per-tensor norms, in float64, with one device sync for all of them."""
    flat = [n for lst in lists for n in lst]
    if not flat:
        return [0.0] * len(lists)
    dev = flat[0].device
    if any(n.device != dev for n in flat):  # model parallel: gather on one device first
        flat = [n.to(dev) for n in flat]
    values = torch.stack(flat).tolist()  # the one sync
    sums, start = [], 0
    for lst in lists:
        sums.append(sum(v * v for v in values[start : start + len(lst)]))
        start += len(lst)
    return sums


class BackwardNorms:
    """Records |Δ_p| per backward pass and |.grad_p| after the last one (module docstring: how, and its cost).

    ``active`` False makes the hooks ignore backward passes (the split collector records only its own).
    Assumes nothing but autograd writes ``.grad`` during a backward. :meth:`remove` takes the hooks out.
    """

    def __init__(self, params: Iterable[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params has no tensor that requires grad; pass model.parameters()")
        self._queue, self._task_id = engine_hooks()
        self._bytes = [p.numel() * p.element_size() for p in self.params]
        self._mixed = any(
            p.dtype in _LOW_PRECISION for p in self.params
        )  # a gradient has its parameter's dtype
        self.bucket_bytes = bucket_bytes
        self.active = True
        self._expected = 1  # passes per window, learned from the last one: |.grad|² is read from this pass on
        self._queued_for: int | None = None  # the backward (graph task) whose end callback is queued
        self.clear()
        self._handles: list = []
        self._unhooked: list[torch.Tensor] = []  # parameters with no hooks before ours: restored on remove
        self.install()

    def clear(self) -> None:
        """Forget the current window and anything held from an unfinished backward."""
        self._held: list[torch.Tensor] = []  # incoming Δ_p not yet normed
        self._held_bytes = 0
        self._fresh: list[int] = []  # parameters whose Δ became .grad (no .grad before): read at the end
        self._deltas: list[torch.Tensor] = []
        self._accumulated: tuple[int, list[torch.Tensor]] | None = None  # (pass, |.grad_p| after it)
        self._fires = [0] * len(self.params)

    def _hook(self, i: int, grad: torch.Tensor) -> None:
        """Tensor hook, before autograd adds ``grad`` into ``.grad``: bookkeeping only, no arithmetic."""
        if not self.active:
            return
        task = self._task_id()
        if task != self._queued_for:  # the first gradient of this backward: norms at its end
            self._queued_for = task
            self._queue(self._after_backward)
        self._fires[i] += 1
        if self.params[i].grad is None:
            self._fresh.append(i)  # autograd makes grad itself (or a copy) the .grad: read it there
            return
        self._held.append(_dense(grad))
        self._held_bytes += self._bytes[i]
        if self._held_bytes >= self.bucket_bytes:
            self._deltas.extend(_norms(self._held, self._mixed))
            self._held, self._held_bytes = [], 0

    def _after_backward(self) -> None:
        """Engine callback at the end of a backward: every gradient of it is in ``.grad`` now."""
        self._queued_for = None
        params = self.params
        tensors = self._held + [_dense(params[i].grad) for i in self._fresh if params[i].grad is not None]
        deltas = len(tensors)
        passes = max(self._fires)
        last = passes >= self._expected  # this may be the window's last pass: |.grad|² too, in the same call
        if last:
            tensors += [_dense(p.grad) for p in params if p.grad is not None]
        norms = _norms(tensors, self._mixed)  # the one fused call of a backward
        self._deltas.extend(norms[:deltas])
        if last:
            self._accumulated = (passes, norms[deltas:])
        self._held, self._held_bytes, self._fresh = [], 0, []

    def take(self) -> Window:
        """The window since the last take, and start a new one.

        ``accumulated`` is empty when it was not read after the last pass: the window had fewer passes than
        the one before it (see the module docstring); the next window expects this one's count.
        """
        passes = max(self._fires)
        accumulated: list[torch.Tensor] = []
        if self._accumulated is not None and self._accumulated[0] == passes:
            accumulated = self._accumulated[1]
        window = Window(self._deltas, accumulated, passes)
        if passes:
            self._expected = passes
        self.clear()
        return window

    @property
    def installed(self) -> bool:
        """Whether the parameter hooks are in place (backward passes are recorded)."""
        return bool(self._handles)

    def install(self) -> None:
        """Put the parameter hooks in place (again, after :meth:`remove`); nothing happens if they are.

        Between windows only: the window starts empty. What was learned (the passes per window) is kept."""
        if not self._handles:
            self.clear()
            # torch's private hook dict (Tensor.register_hook's): read with getattr, so a torch without it
            # only keeps the leftover dispatch (a speed cost), never breaks a measurement
            self._unhooked = [p for p in self.params if getattr(p, "_backward_hooks", None) is None]
            self._handles = [p.register_hook(partial(self._hook, i)) for i, p in enumerate(self.params)]

    def remove(self) -> None:
        """Remove the parameter hooks (safe to call twice), each parameter left as :meth:`install` found it,
        so backward passes then cost nothing here.

        A removed handle leaves an empty hook dict on its tensor, and autograd still calls into Python for it
        on every backward: +1.0% [+0.5, +1.7] on mlp-digits' 4-micro-batch CPU step, for good after a
        measurement, and most of what ``every=64`` cost there (benchmarks/removed_hooks.py; RESULTS.md, "The
        hook a removed handle leaves behind"). So a parameter that had no hooks before gets
        ``_backward_hooks = None`` back, which drops autograd's dispatch to it; one the user had hooked keeps
        its own hooks untouched."""
        for h in self._handles:
            h.remove()
        for p in self._unhooked:
            if getattr(p, "_backward_hooks", None) == {}:  # ours only, all gone
                p._backward_hooks = None
        self._handles, self._unhooked = [], []
        self.clear()
