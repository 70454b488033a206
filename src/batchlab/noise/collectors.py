"""Torch collectors of the gradient noise scale: the two squared gradient norms a training loop gives for free.

Each collector obtains |G_small|² and |G_big|² at two batch sizes from a real training loop and feeds them to
a :class:`~batchlab.noise.estimator.GradientNoiseScale` (the math, McCandlish et al. 2018, App. A):

- :class:`AccumulationCollector` (a): gradient-accumulation micro-batches vs their sum, free;
- :class:`DDPCollector` (b): the local vs the all-reduced gradient, from a DDP comm hook, free;
- :class:`SplitBatchCollector` (c): one batch run as two halves, a second, smaller forward/backward.

Each accepts an optional ``torch.amp.GradScaler`` and divides its scale out before the norms reach the
tracker; steps whose norms are not finite (AMP overflow) are skipped and counted. (a) and (c) read the norms
with :class:`~batchlab.noise.backward_norms.BackwardNorms`: one fused norm per backward pass, at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchlab import checks
from batchlab.noise.backward_norms import BackwardNorms, squared_sums
from batchlab.noise.estimator import GradientNoiseScale, NoiseScaleEstimate

__all__ = ["NormPair", "AccumulationCollector", "DDPCollector", "SplitBatchCollector"]


@dataclass(frozen=True)
class NormPair:
    """One optimizer step's squared norms as passed to the tracker (unscaled), and whether it accepted them."""

    sq_norm_small: float
    sq_norm_big: float
    b_small: float
    b_big: float
    accepted: bool

    def to_dict(self) -> dict:
        """Plain dict of every field."""
        return asdict(self)


def _grad_scale(scaler: Any) -> float:
    """The factor gradients carry from ``scaler.scale(loss)``; 1.0 without a scaler or when it is disabled."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())  # a device sync, once per optimizer step


class _Collector:
    """Shared plumbing: the tracker, the scaler, ``result()`` and hook removal as a context manager."""

    tracker: GradientNoiseScale

    def __init__(self, tracker: GradientNoiseScale | None, scaler: Any) -> None:
        if tracker is not None and not isinstance(tracker, GradientNoiseScale):
            raise ValueError(f"tracker must be a GradientNoiseScale or None, got {tracker!r}")
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "is_enabled")):
            raise ValueError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
        self.tracker = tracker if tracker is not None else GradientNoiseScale()
        self.scaler = scaler
        self.last: NormPair | None = None

    def _record(self, sq_small: float, sq_big: float, b_small: float, b_big: float) -> NormPair:
        accepted = self.tracker.update(sq_small, sq_big, b_small, b_big)
        self.last = NormPair(sq_small, sq_big, b_small, b_big, accepted)
        return self.last

    def result(self) -> NoiseScaleEstimate:
        """The tracker's current estimate (see :meth:`GradientNoiseScale.result`)."""
        return self.tracker.result()

    def close(self) -> None:
        """Remove every hook this collector installed (safe to call twice); the tracker keeps its estimate."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AccumulationCollector(_Collector):
    """Collector (a): gradient-accumulation micro-batches vs their sum — free when you accumulate anyway.

    Two lines in a plain loop (hooks record each micro-batch's backward by themselves)::

        gns = AccumulationCollector(model.parameters(), micro_batch_size=32)  # before the loop
        for i, (x, y) in enumerate(loader):
            (loss_fn(model(x), y) / accum).backward()
            if (i + 1) % accum == 0:
                gns.step()                                                    # before optimizer.step()
                optimizer.step(); optimizer.zero_grad()
        print(gns.result().b_simple)

    With n micro-batches of size b per step: B_small = b with |G_small|² the mean of the n micro-batch
    gradients' squared norms, B_big = n·b with |G_big|² the squared norm of their mean.

    ``loss_divided_by_steps``: True (default) when the loop backpropagates ``loss / accumulation_steps``, so
    ``.grad`` ends as the mean gradient; False when it backpropagates the plain per-micro-batch mean loss, so
    ``.grad`` is the sum of the micro-batch gradients. Either way the norms are converted to mean gradients;
    the wrong setting scales |G|² and tr(Σ) by n² (B_simple, their ratio, is unaffected).
    The loss itself must be a mean over the micro-batch (``reduction="mean"``), as usual.

    Call :meth:`step` once per optimizer step: after its last backward, before the next step's first
    backward and (with a ``scaler``) before ``scaler.update()``, which may change the scale. ``.grad`` is
    read only at the end of each backward (never at :meth:`step`, never written), so it may go before or after
    ``optimizer.step()``/``zero_grad()``, and ``scaler.unscale_`` or gradient clipping in between does not
    matter. Cost: one fused norm over the gradients per micro-batch and one device sync per step
    (:mod:`~batchlab.noise.backward_norms`). Measured on the CPU built-ins (benchmarks/RESULTS.md): from about
    +2% (cnn, resnet) to +13-15% (mlp-digits, a 3-6 ms step) measuring every step; with ``every=8`` a median
    of 0-2.7% on all four on two machines (mlp-digits' quartiles reach +3.8-4.7%: one measured step in eight
    is a noisy mean), since the hooks leave no Python dispatch behind when they come out.
    Micro-batches are counted from the hooks; a step with a single micro-batch (e.g. the
    last, partial group of an epoch) has no pair of sizes and is counted in ``single_micro_batch_steps``.
    A step with fewer micro-batches than the step before returns None and is counted in ``unmeasured_steps``
    (the accumulated norm is read after the micro-batch count learned from the previous step).
    Gradients must be zeroed between steps. Any other backward (or ``torch.autograd.grad`` on the parameters)
    inside a window would be counted too. Not for DDP models: use :class:`DDPCollector`.

    ``every``: measure one optimizer step in ``every`` (the first, then every ``every``-th), with the hooks
    removed in between, so the steps in between cost nothing. Why: on a tiny step the exact per-micro-batch
    measurement has a floor of one Python hook call per tensor per micro-batch plus a few dispatches (about
    +13% of mlp-digits' 6 ms CPU step, benchmarks/RESULTS.md); measured one step in k it costs 1/k of that.
    The estimate is an average over steps either way (an EMA), so it stays unbiased; its standard error after
    a given number of *optimizer steps* grows by about sqrt(k). Steps left out return None and are counted in
    ``skipped_steps``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        micro_batch_size: int,
        tracker: GradientNoiseScale | None = None,
        *,
        loss_divided_by_steps: bool = True,
        scaler: Any = None,
        every: int = 1,
    ) -> None:
        micro = checks.integer("micro_batch_size", micro_batch_size)
        self.loss_divided_by_steps = checks.flag("loss_divided_by_steps", loss_divided_by_steps)
        self.every = checks.integer("every", every)
        super().__init__(tracker, scaler)
        self.micro_batch_size = micro
        self.single_micro_batch_steps = 0
        self.unmeasured_steps = 0
        self.skipped_steps = 0
        self._steps = 0  # optimizer steps seen (step() calls)
        self._closed = False
        self._norms = BackwardNorms(params)

    def step(self, micro_batch_size: int | None = None) -> NormPair | None:
        """Turn the micro-batches since the last call into one tracker update; return the pair (or None).

        ``micro_batch_size`` overrides the constructor's for this step (all micro-batches of a step are taken
        to have this size). Returns None, and counts it, when fewer than two micro-batches were seen.
        """
        b = (
            self.micro_batch_size
            if micro_batch_size is None
            else checks.integer("micro_batch_size", micro_batch_size)
        )
        measured = self._norms.installed
        window = self._norms.take()
        self._steps += 1
        # the next step is measured only if it is the every-th: the hooks go in or out for it
        if self.every > 1 and not self._closed:
            (self._norms.install if self._steps % self.every == 0 else self._norms.remove)()
        if not measured:
            self.skipped_steps += 1
            return None
        n = window.passes
        if n < 2:
            if n == 1:
                self.single_micro_batch_steps += 1
            return None
        if not window.accumulated:  # fewer micro-batches than the step before: |.grad|² was not read
            self.unmeasured_steps += 1
            return None
        s2 = _grad_scale(self.scaler) ** 2
        sum_sq, acc_sq = squared_sums(window.deltas, window.accumulated)  # the one device sync of a step
        sum_sq, acc_sq = sum_sq / s2, acc_sq / s2  # Σ_i |Δ_i|² (Δ_i: micro-batch i's part of .grad), |.grad|²
        if self.loss_divided_by_steps:  # Δ_i = g_i / n, .grad = mean g
            small, big = n * sum_sq, acc_sq
        else:  # Δ_i = g_i, .grad = Σ g
            small, big = sum_sq / n, acc_sq / (n * n)
        return self._record(small, big, b, n * b)

    def close(self) -> None:
        """Remove the parameter hooks (for good: later steps measure nothing)."""
        self._closed = True
        self._norms.remove()


class SplitBatchCollector(_Collector):
    """Collector (c): one device, no accumulation — run each batch's backward as two halves.

    The batch of b samples is split along dim 0 into halves of ceil(b/2) and floor(b/2); each half's mean
    loss is weighted by its share (b_i/b) and backpropagated, so the gradients add up to exactly the
    full-batch mean gradient (for a mean-reduced loss), at the cost of a second, smaller forward/backward.
    B_big = b; B_small = the harmonic mean of the halves (b/2 when b is even), which keeps eq. A.2 unbiased.
    Batch-coupled layers (BatchNorm) see half batches, as with any accumulation::

        gns = SplitBatchCollector(model.parameters())                  # before the loop
        for x, y in loader:
            optimizer.zero_grad()
            loss = gns.backward(lambda xb, yb: loss_fn(model(xb), yb), x, y)   # instead of loss.backward()
            optimizer.step()

    ``batch`` may hold tensors, and lists/tuples/dicts of them; tensors are split, anything else is passed
    to both halves unchanged. With a ``scaler`` the halves are backpropagated through ``scaler.scale``.
    Gradients must be zero (or None) when :meth:`backward` starts.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        tracker: GradientNoiseScale | None = None,
        *,
        scaler: Any = None,
    ) -> None:
        super().__init__(tracker, scaler)
        self._norms = BackwardNorms(params)
        self._norms.active = False

    def backward(self, loss_fn: Callable[..., torch.Tensor], *batch: Any) -> torch.Tensor:
        """Backpropagate ``loss_fn(*batch)`` as two halves, update the tracker, return the detached full loss."""
        if not callable(loss_fn):
            raise ValueError(
                f"loss_fn must be callable as loss_fn(*half_batch) -> scalar loss, got {loss_fn!r}"
            )
        size = _leading_size(batch)
        if size is None:
            raise ValueError("batch holds no tensor to split; pass the batch tensors after loss_fn")
        if size < 2:
            raise ValueError(f"the batch must hold at least 2 samples to split in two, got batch size {size}")
        b1 = (size + 1) // 2
        halves = ((0, b1), (b1, size))
        windows = []
        total = None
        norms = self._norms
        norms.clear()
        norms.active = True
        try:
            for lo, hi in halves:
                w = (hi - lo) / size
                loss = loss_fn(*_slice(batch, lo, hi)) * w
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                windows.append((norms.take(), w))
                total = loss.detach() if total is None else total + loss.detach()
        finally:
            norms.active = False
            norms.clear()
        s2 = _grad_scale(self.scaler) ** 2
        (first, w1), (second, w2) = windows
        # |Δ_1|², |Δ_2|² (each half's weighted part of .grad) and |.grad|² after both: the one device sync
        sq1, sq2, big = squared_sums(first.deltas, second.deltas, second.accumulated)
        g1, g2 = sq1 / s2 / (w1 * w1), sq2 / s2 / (w2 * w2)  # |g_i|² of each half's mean gradient
        n1, n2 = b1, size - b1
        b_small = 2.0 * n1 * n2 / (n1 + n2)  # E mean|g_i|² = |G|² + tr(Σ)·(1/n1 + 1/n2)/2
        big /= s2
        self._record(0.5 * (g1 + g2), big, b_small, float(size))
        return total

    def close(self) -> None:
        """Remove the parameter hooks."""
        self._norms.remove()


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    sizes = {s for s in (_leading_size(x) for x in items) if s is not None}
    if len(sizes) > 1:
        raise ValueError(f"batch tensors disagree on the batch size (dim 0): {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _slice(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, lo, hi) for v in batch)
    return batch


class DDPCollector(_Collector):
    """Collector (b): DDP local vs all-reduced gradients, from a comm hook — no extra backward.

    The hook (``register_comm_hook``, as k-diffusion's ``DDPGradientStatsHook`` does) sums each bucket's
    squared norm before the all-reduce (this rank's gradient, batch ``local_batch_size``) and after it (the
    mean over ranks, batch ``local_batch_size × world_size``), then does DDP's usual averaging all-reduce
    (divide by world size, sum: gloo has no AVG). :meth:`step` averages the local norms over ranks with one
    2-element all-reduce, so it is a collective: call it on every rank, once per optimizer step, after the
    backward that synchronised gradients and (with a ``scaler``) before ``scaler.update()``::

        model = DDP(model)
        gns = DDPCollector(model, local_batch_size=32)   # before the first backward
        ...
        loss.backward(); gns.step(); optimizer.step()

    With accumulation under ``no_sync()``, the bucket holds each rank's accumulated gradient: pass
    ``local_batch_size`` = micro batch × accumulation steps and divide the loss by the steps (mean gradients).
    Replaces DDP's default communication; only one comm hook can be registered per model.
    """

    def __init__(
        self,
        ddp_model: torch.nn.Module,
        local_batch_size: int,
        tracker: GradientNoiseScale | None = None,
        *,
        scaler: Any = None,
    ) -> None:
        import torch.distributed as dist

        if not hasattr(ddp_model, "register_comm_hook"):
            raise ValueError(
                f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}"
            )
        local = checks.integer("local_batch_size", local_batch_size)
        super().__init__(tracker, scaler)
        self._dist = dist
        self._group = getattr(ddp_model, "process_group", None)
        self.world_size = dist.get_world_size(self._group)
        if self.world_size < 2:
            raise ValueError(
                f"DDPCollector needs world size >= 2 to have two batch sizes, got {self.world_size}"
            )
        self.local_batch_size = local
        self._small: list[torch.Tensor] = []
        self._big: list[torch.Tensor] = []
        ddp_model.register_comm_hook(state=None, hook=self._hook)

    def _hook(self, state, bucket):  # no annotations: DDP compares them to dist.GradBucket / Future[Tensor]
        buf = bucket.buffer()
        self._small.append(torch.linalg.vector_norm(buf, dtype=torch.float32).square())  # local, pre-reduce
        buf.div_(self.world_size)
        fut = self._dist.all_reduce(buf, group=self._group, async_op=True).get_future()

        def averaged(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            self._big.append(torch.linalg.vector_norm(out, dtype=torch.float32).square())
            return out

        return fut.then(averaged)

    def step(self) -> NormPair | None:
        """Collective: average the step's local norms over ranks and update the tracker (same on every rank).

        Returns None when no gradient synchronisation happened since the last call (e.g. under ``no_sync``).
        """
        if not self._small:
            return None
        small, big = torch.stack(self._small).sum(), torch.stack(self._big).sum()
        self._small, self._big = [], []
        stats = torch.stack([small, big]).to(torch.float64)
        self._dist.all_reduce(stats, group=self._group)  # SUM; big is identical on every rank
        s2 = _grad_scale(self.scaler) ** 2
        small_mean, big_mean = (stats / self.world_size).tolist()
        b = self.local_batch_size
        return self._record(small_mean / s2, big_mean / s2, b, b * self.world_size)
