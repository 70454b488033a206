"""The peak of a training step over batch size *and* sample length: ``peak(b, L) = fixed(L) + b * (alpha*L + beta*L^2)``.

Pure math over numbers (no torch): what the shape search (:mod:`batchlab.fit.shapes`) predicts each next shape's
answer with. Why this form:

- ``fixed`` is what does not grow with the batch: parameters, gradients, optimizer state (Adam's two moments),
  the runtime. Mostly it does not depend on the length either (a learned position table is a parameter) -- but
  a step may hold one ``L x L`` tensor shared by the whole batch: ``nn.MultiheadAttention`` turns a boolean
  causal mask into a float one per block, 4 bytes x ``L^2`` each (32 MiB at L = 2048 in two blocks, measured on
  benchmarks/shapes.py's byte LM: its line's intercept at L = 2048 sat 32 MiB above the one at L = 128). So
  ``fixed(L) = fixed + fixed_per_length2 * L^2``, the growth fitted only where the shapes' own intercepts
  differ by more than their readings' noise allows (:func:`fit_fixed_part`), else 0.
- Per sample, a layer's activations grow with the tokens it holds: ``alpha * L`` -- embeddings, the MLP, the
  logits (``L x vocab``), a convolution's feature maps (``L`` = pixels ``h * w`` for images). Attention adds a
  score matrix per head of ``L x L`` that eager attention keeps for backward: ``beta * L^2`` (Vaswani et al.
  2017; FlashAttention, Dao et al. 2022, removes it from memory, and the fit then finds ``beta ~ 0``). Within one
  length this is the search's own line ``fixed + b * per_sample`` (:class:`~batchlab.fit.records.MemoryLine`).
- Two coefficients, no constant per sample: a sample of length 0 holds nothing. That keeps the model
  identifiable from two lengths, so every shape after the second is predicted.

How it is fitted: each searched shape gives its own memory line (the search's, through its larger probes,
where memory is affine); the per-sample slopes ``s(L)`` are fitted by least squares in *relative* error --
a byte off at a short length counts as much as a thousand at a long one -- with ``alpha, beta >= 0`` (a memory
that shrinks as samples grow is noise); ``fixed`` is the mean of the shapes' fixed parts. From one length alone
``beta`` cannot be told from ``alpha``: the model is then linear (``beta = 0``), which, read at a *shorter*
length, can only over-state the slope when the truth has an ``L^2`` term -- a prediction on the safe side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchlab.fit.records import MemoryLine


@dataclass(frozen=True)
class PeakModel:
    """``peak(b, L) = fixed_bytes + fixed_per_length2 * L^2 + b * (alpha * L + beta * L^2)``, fitted over
    ``lengths`` (see the module)."""

    fixed_bytes: float
    alpha: float  # bytes per sample per unit of length (a token, a pixel)
    beta: float  # bytes per sample per unit of length squared (attention's score matrices)
    lengths: tuple[int, ...] = ()  # the lengths it was fitted on
    # bytes per step per unit of length squared (an L x L mask the batch shares)
    fixed_per_length2: float = 0.0

    def fixed_at(self, length: float) -> float:
        """The part of the peak that does not grow with the batch, at one length."""
        return fixed_at((self.fixed_bytes, self.fixed_per_length2), length)

    def per_sample(self, length: float) -> float:
        return self.alpha * length + self.beta * length**2

    def line(self, length: float) -> MemoryLine:
        """The memory line at one length: what the search predicts with inside that shape."""
        return MemoryLine(self.fixed_at(length), self.per_sample(length))

    def peak(self, batch_size: float, length: float) -> float:
        return self.line(length).peak(batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_peak_model(
    lines: Sequence[tuple[int, MemoryLine]], fixed: tuple[float, float] | None = None
) -> PeakModel | None:
    """Fit :class:`PeakModel` to ``(length, memory line)`` pairs, one per shape (None without a usable one).

    Lines whose slope is not positive (memory per sample below the readings' noise) are left out. ``fixed``:
    the fixed part as ``(fixed_bytes, fixed_per_length2)`` (:func:`fit_fixed_part`); by default the mean of the
    lines' fixed parts, not growing with the length.
    """
    points = [(float(length), line) for length, line in lines if length > 0 and line.bytes_per_sample > 0]
    if not points:
        return None
    if fixed is None:
        fixed = (sum(line.fixed_bytes for _, line in points) / len(points), 0.0)
    lengths = tuple(sorted({int(length) for length, _ in points}))
    alpha, beta = _fit_slopes([(length, line.bytes_per_sample) for length, line in points])
    return PeakModel(fixed[0], alpha, beta, lengths, fixed[1])


def fixed_at(fixed: tuple[float, float], length: float) -> float:
    """``fixed + g L^2`` at ``length``, ``fixed`` as ``(fixed_bytes, fixed_per_length2)`` (:func:`fit_fixed_part`)."""
    return fixed[0] + fixed[1] * length**2


def fit_fixed_part(intercepts: Sequence[tuple[int, float, float]]) -> tuple[float, float] | None:
    """``(fixed_bytes, fixed_per_length2)`` of ``fixed(L) = fixed + g L^2`` from ``(length, intercept,
    uncertainty)`` per shape (each shape's own line's fixed part, and how far the readings' noise can move it),
    or None where the intercepts do not show a growth beyond their uncertainty.

    Weighted least squares in ``L^2``, each intercept by ``1 / uncertainty^2``; the growth is kept only when it is
    positive and more than twice its own standard error (a shrinking fixed part is noise, and one inside the
    noise would move every later shape's slope for nothing). An uncertainty of 0 (readings on a line to the
    byte) counts as one byte.
    """
    points = [(float(length) ** 2, value, max(uncertainty, 1.0)) for length, value, uncertainty in intercepts]
    if len({x for x, _, _ in points}) < 2:
        return None
    weights = [1 / u**2 for _, _, u in points]
    total = sum(weights)
    mean_x = sum(w * x for w, (x, _, _) in zip(weights, points)) / total
    mean_y = sum(w * y for w, (_, y, _) in zip(weights, points)) / total
    sxx = sum(w * (x - mean_x) ** 2 for w, (x, _, _) in zip(weights, points))
    growth = sum(w * (x - mean_x) * (y - mean_y) for w, (x, y, _) in zip(weights, points)) / sxx
    if growth <= 2 / math.sqrt(sxx):  # the slope's standard error with known uncertainties: 1 / sqrt(sxx)
        return None
    return mean_y - growth * mean_x, growth


def _fit_slopes(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``s(L) = alpha*L + beta*L^2`` by least squares in relative error, ``alpha, beta >= 0``.

    Minimises ``sum(((alpha*L + beta*L^2) - s) / s)^2``: the 2x2 normal equations in ``u = L/s``, ``v = L^2/s``
    (each row divided by its own ``s``); when the unconstrained optimum has a negative coefficient, the best
    fit with it at zero is the other one alone. One distinct length: ``beta = 0`` (see the module).
    """
    if len({length for length, _ in points}) < 2:
        return sum(s / length for length, s in points) / len(points), 0.0
    uu = sum((length / s) ** 2 for length, s in points)
    vv = sum((length**2 / s) ** 2 for length, s in points)
    uv = sum((length / s) * (length**2 / s) for length, s in points)
    u1 = sum(length / s for length, s in points)  # the targets are all 1 after dividing by s
    v1 = sum(length**2 / s for length, s in points)
    det = uu * vv - uv * uv
    if det > 0:
        alpha, beta = (u1 * vv - v1 * uv) / det, (v1 * uu - u1 * uv) / det
        if alpha >= 0 and beta >= 0:
            return alpha, beta
    linear = (u1 / uu, 0.0)  # beta = 0
    quadratic = (0.0, v1 / vv)  # alpha = 0

    def error(coefficients: tuple[float, float]) -> float:
        a, b = coefficients
        return sum(((a * length + b * length**2) - s) ** 2 / s**2 for length, s in points)

    return min((linear, quadratic), key=error)
