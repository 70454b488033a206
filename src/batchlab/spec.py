"""The batch argument, parsed in one place for the API, the CLI and the integrations.

Accepted forms, as in Ultralytics' ``batch=`` (``-1`` for AutoBatch, ``0.7`` for a fraction of memory):

- a positive int ``n``: a fixed batch size; batchlab checks that it fits and says how much memory it needs;
- ``-1`` or ``"auto"``: the largest batch that fits at ``DEFAULT_FRACTION`` of the memory capacity;
- a float ``0 < f < 1``: the largest batch that fits at fraction ``f`` of the capacity.

Strings of those forms ("64", "-1", "0.7", "auto") are accepted too, so a CLI passes its text straight in.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

# Why 0.90 and not Ultralytics' 0.60: batchlab *verifies* its answer with real steps of the whole training step
# (optimizer state and all), so the margin no longer has to absorb extrapolation error -- only allocator
# fragmentation over a long run and variation in input size (padding, augmentation). Ultralytics extrapolates
# from forward+backward probes and needs the slack; its users call 0.60 too conservative (ultralytics#1659).
DEFAULT_FRACTION = 0.90

_ACCEPTED = (
    'a positive int (fixed batch size), -1 or "auto" (largest that fits at '
    f"{DEFAULT_FRACTION:.2f} of memory), or a float strictly between 0 and 1 (largest that fits at that fraction)"
)


@dataclass(frozen=True)
class BatchSpec:
    """A parsed batch argument: ``mode`` is ``"fixed"`` (``size`` set) or ``"fit"`` (``fraction`` set)."""

    mode: Literal["fixed", "fit"]
    size: int | None = None
    fraction: float | None = None

    @property
    def is_fixed(self) -> bool:
        return self.mode == "fixed"


def parse_batch(value: int | float | str) -> BatchSpec:
    """Parse a batch argument into a :class:`BatchSpec`; anything not accepted raises ``ValueError``.

    >>> parse_batch(-1)
    BatchSpec(mode='fit', size=None, fraction=0.9)
    >>> parse_batch("0.7").fraction
    0.7
    """
    original = value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"invalid batch {original!r}: expected {_ACCEPTED}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return BatchSpec("fit", fraction=DEFAULT_FRACTION)
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"invalid batch {original!r}: expected {_ACCEPTED}") from None
    if isinstance(value, numbers.Integral):  # int, numpy integers
        value = int(value)
        if value == -1:
            return BatchSpec("fit", fraction=DEFAULT_FRACTION)
        if value >= 1:
            return BatchSpec("fixed", size=value)
        raise ValueError(f"invalid batch {original!r}: expected {_ACCEPTED}")
    if isinstance(
        value, numbers.Real
    ):  # a float is always a fraction: 1.0 and 64.0 are rejected, not guessed
        value = float(value)
        if math.isfinite(value) and 0.0 < value < 1.0:
            return BatchSpec("fit", fraction=value)
        raise ValueError(f"invalid batch {original!r}: expected {_ACCEPTED}")
    raise ValueError(f"invalid batch {original!r} of type {type(original).__name__}: expected {_ACCEPTED}")


def parse_fraction(value: float | str) -> float:
    """Parse a memory fraction: a float strictly between 0 and 1."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and 0.0 < number < 1.0):
        raise ValueError(f"invalid memory fraction {value!r}: expected a float strictly between 0 and 1")
    return number


AMP_CHOICES = ("bf16", "fp16")


def parse_amp(value: str | None) -> str | None:
    """Parse a mixed-precision choice: None/"fp32"/"off" (no autocast), "bf16" or "fp16"."""
    if value is None:
        return None
    text = str(value).strip().lower()
    aliases = {"fp32": None, "off": None, "none": None, "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    if text in AMP_CHOICES:
        return text
    if text in aliases:
        return aliases[text]
    raise ValueError(f"invalid amp {value!r}: expected one of None, 'fp32', 'bf16', 'fp16'")
