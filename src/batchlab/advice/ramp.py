"""When a batch ramp grows the batch: the sizes it may take and the hysteresis that decides, over plain numbers.

The critical batch starts near zero and grows as training goes on (McCandlish et al. 2018; Merrill et al. 2025,
"Critical batch size revisited": a ramp reached OLMo-1B's loss in 43% fewer steps). A ramp follows the
measured noise scale B_simple up, and :class:`RampRule` decides when, from the running estimate and its
standard error (:class:`batchlab.noise.GradientNoiseScale`). :class:`batchlab.training.BatchRamp` drives it
from a training loop.

**The sizes** (:func:`ramp_sizes`): the start batch times ``growth``\\ :sup:`j` (2: doubling, as Merrill et al.'s
schedule does), each rounded down to whole micro-batches of at most the fitted maximum (:func:`round_batch`),
up to the user's maximum (rounded the same way, and always the last size).

**The hysteresis** (what :class:`RampRule` chose, and why):

- A reading is the estimate after an optimizer step, once it has ``min_updates`` updates (its standard error
  is meaningless before) and a defined B_simple; anything else breaks a streak.
- Its lower bound is ``target x (B_simple - z x stderr)`` with z = 1: one standard error below the mean, so a
  noisy estimate whose mean merely touches the next size does not move the batch.
- The batch grows only after ``patience`` consecutive readings (3) whose lower bound reaches the next size:
  one lucky reading (a batch of easy samples) is not enough, yet a real rise acts within a few steps. The
  readings are of an EMA, so consecutive ones are correlated: the streak guards against a transient, and
  the standard error against a noisy level.
- It then goes to the largest size at or below the *smallest* lower bound of the streak (the conservative
  end), possibly several sizes at once.
- It never shrinks: a falling estimate only stops it growing. Shrinking on noise alone would undo an LR and
  accumulation change for a reading that the next ones may contradict, and the critical batch does not fall
  as training goes on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from batchlab import checks

__all__ = ["round_batch", "ramp_sizes", "RampReading", "RampRule"]

DEFAULT_GROWTH = 2.0  # doubling, as Merrill et al. 2025's batch-size warm-up
DEFAULT_PATIENCE = 3  # consecutive readings above the next size (see the module docstring)
DEFAULT_Z = 1.0  # the lower bound is one standard error below the mean
DEFAULT_MIN_UPDATES = 10  # the EMA's standard error needs a few updates to mean anything
MIN_ACCUMULATION = 2  # two micro-batches per step: the accumulation collector measures every step


def round_batch(size: int, max_micro_batch: int, min_accumulation: int = MIN_ACCUMULATION) -> int:
    """``size`` rounded down to whole micro-batches: a multiple of ``max_micro_batch`` once it holds at least
    ``min_accumulation`` of them, else a multiple of ``min_accumulation`` (that many equal micro-batches);
    never below ``min_accumulation``."""
    b = checks.integer("size", size)
    m = checks.integer("max_micro_batch", max_micro_batch)
    a = checks.integer("min_accumulation", min_accumulation)
    if b >= m * a:
        return b // m * m
    return max(a, b // a * a)


def ramp_sizes(
    start: int, max_batch: int, max_micro_batch: int, *, growth: float = DEFAULT_GROWTH,
    min_accumulation: int = MIN_ACCUMULATION,
) -> tuple[int, ...]:  # fmt: skip
    """The global batches a ramp from ``start`` may take: ``start x growth**j`` rounded by :func:`round_batch`,
    strictly increasing, ending at ``max_batch`` rounded the same way. ``start`` is kept as it is."""
    b0 = checks.integer("start", start)
    top = checks.integer("max_batch", max_batch)
    g = checks.number("growth", growth, minimum=1.0)
    if top < b0:
        raise ValueError(f"invalid max_batch {top}: below the current batch {b0} (a ramp only grows)")
    last = max(b0, round_batch(top, max_micro_batch, min_accumulation))
    sizes = [b0]
    j = 1
    while True:
        size = round_batch(math.ceil(b0 * g**j), max_micro_batch, min_accumulation)
        if size >= last:
            break
        if size > sizes[-1]:
            sizes.append(size)
        j += 1
    if last > sizes[-1]:
        sizes.append(last)
    return tuple(sizes)


@dataclass(frozen=True)
class RampReading:
    """One reading of :meth:`RampRule.observe`: the estimate, its lower bound, the next size, the streak,
    and ``grow_to`` (the size to move to now, or None)."""

    b_simple: float | None
    stderr: float | None
    lower: float | None
    current: int
    next_size: int | None
    streak: int
    grow_to: int | None
    why: str

    def to_dict(self) -> dict:
        """Plain dict of every field."""
        return asdict(self)


class RampRule:
    """The ramp's decision (module docstring): feed it each step's estimate, it says when and where to grow.

    ``target`` scales the estimate: the batch grows toward ``target x B_simple`` (1.0: B_simple itself; the
    value that paid off differed tenfold between data sets, benchmarks/RESULTS.md). Plain numbers; no torch.
    """

    def __init__(
        self,
        sizes: tuple[int, ...],
        *,
        target: float = 1.0,
        patience: int = DEFAULT_PATIENCE,
        z: float = DEFAULT_Z,
        min_updates: int = DEFAULT_MIN_UPDATES,
    ) -> None:
        if not sizes or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(
                f"sizes must be a non-empty, strictly increasing tuple of batches, got {sizes!r}"
            )
        self.sizes = tuple(checks.integer("size", s) for s in sizes)
        self.target, self.patience, self.z, self.min_updates = self.check_settings(
            target=target, patience=patience, z=z, min_updates=min_updates
        )
        self.current = self.sizes[0]
        self._lows: list[float] = []

    @staticmethod
    def check_settings(
        *, target: float, patience: int, z: float, min_updates: int
    ) -> tuple[float, int, float, int]:
        """``(target, patience, z, min_updates)`` checked, each with a one-line error naming the value."""
        return (
            checks.number("target", target, what="the multiple of B_simple the batch grows toward"),
            checks.integer("patience", patience),
            checks.number("z", z, inclusive=True),
            checks.integer("min_updates", min_updates),
        )

    @property
    def next_size(self) -> int | None:
        """The size above the current one (None at the top)."""
        above = [s for s in self.sizes if s > self.current]
        return above[0] if above else None

    def observe(self, b_simple: float | None, stderr: float | None, updates: int) -> RampReading:
        """Fold one reading in; ``grow_to`` is set when the batch should grow now (then call :meth:`moved`)."""
        nxt = self.next_size
        lower = None
        if nxt is None:
            why = "at the maximum"
        elif updates < self.min_updates:
            why = f"{updates} of {self.min_updates} updates"
        elif b_simple is None or stderr is None or not math.isfinite(b_simple) or not math.isfinite(stderr):
            why = "no defined estimate and standard error"
        else:
            lower = self.target * (b_simple - self.z * stderr)
            why = f"lower bound {lower:.4g} {'>=' if lower >= nxt else '<'} next size {nxt}"
        if lower is None or nxt is None or lower < nxt:
            self._lows = []
            return RampReading(b_simple, stderr, lower, self.current, nxt, 0, None, why)
        self._lows.append(lower)
        streak = len(self._lows)
        if streak < self.patience:
            return RampReading(b_simple, stderr, lower, self.current, nxt, streak, None, why)
        grow_to = max(s for s in self.sizes if s <= min(self._lows))  # every low reached nxt
        return RampReading(b_simple, stderr, lower, self.current, nxt, streak, grow_to,
                           f"{why} for {streak} readings: grow to {grow_to}")  # fmt: skip

    def moved(self, size: int) -> None:
        """The batch is now ``size`` (one of :attr:`sizes`, larger than the current one); the streak restarts."""
        if size not in self.sizes or size <= self.current:
            raise ValueError(f"invalid size {size!r}: expected one of {self.sizes} above {self.current}")
        self.current = size
        self._lows = []
