"""Argument checks, one per kind of value, each raising one line that names the value and what is accepted.

Every public function validates its arguments with these before touching a device (STYLE.md habit 9), so a
bad value fails the same way everywhere: ``ValueError("invalid batch_size 0: expected an int >= 1")``.
Booleans are refused where a number is expected (``True`` is an ``int`` to Python, never a batch size).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def _fail(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"invalid {name} {value!r}: expected {expected}")


def integer(name: str, value: Any, *, minimum: int = 1, none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when ``none``)."""
    if value is None and none:
        return None
    expected = f"an int >= {minimum}" + (" or None" if none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _fail(name, value, expected)
    return int(value)


def number(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    inclusive: bool = False,
    allow_inf: bool = False,
    none: bool = False,
    what: str = "",
) -> float | None:
    """``value`` as a float above ``minimum`` (or equal, when ``inclusive``); NaN always refused, inf only when
    ``allow_inf``. ``what`` names the quantity in the message ("a batch size", "seconds")."""
    if value is None and none:
        return None
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    expected = f"a number {bound}" + (" or inf" if allow_inf else "") + (f" ({what})" if what else "")
    expected += " or None" if none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, value, expected)
    x = float(value)
    if math.isnan(x) or (math.isinf(x) and not allow_inf) or x < minimum or (x == minimum and not inclusive):
        raise _fail(name, value, expected)
    return x


def fraction(name: str, value: Any, *, include_one: bool = False) -> float:
    """``value`` as a float in (0, 1) -- or (0, 1] with ``include_one``."""
    expected = "a number in (0, 1]" if include_one else "a number strictly between 0 and 1"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, value, expected)
    x = float(value)
    if not (0 < x < 1 or (include_one and x == 1)):
        raise _fail(name, value, expected)
    return x


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool; 0/1 and strings are refused (a typo should not read as True)."""
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def choice(name: str, value: Any, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(map(repr, choices)))
    return value


def shape_size(shape: int | tuple[int, ...]) -> int:
    """How much one sample of ``shape`` holds: the length of a sequence, the pixels ``h * w`` of an image."""
    return shape if isinstance(shape, int) else math.prod(shape)


def shape(name: str, value: Any) -> int | tuple[int, ...]:
    """``value`` as a batch shape: an int >= 1 (a sequence length) or a tuple of them (``(h, w)`` of an image);
    a list is taken as a tuple."""
    expected = "an int >= 1 (a length) or a tuple of ints >= 1 such as (640, 480)"
    if isinstance(value, (tuple, list)) and value:
        if all(not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 1 for v in value):
            return tuple(int(v) for v in value)
        raise _fail(name, value, expected)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise _fail(name, value, expected)
    return int(value)


def shapes(name: str, values: Any) -> list[int | tuple[int, ...]]:
    """``values`` as a list of batch shapes (:func:`shape`), one kind, sorted by :func:`shape_size` from the
    smallest up, each once: a table read from the top down is read from the shortest sample to the longest."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Collection) or not values:
        raise _fail(
            name, values, "a non-empty list of shapes such as [128, 256, 512] or [(320, 320), (640, 640)]"
        )
    checked = [shape(f"shape in {name}", value) for value in values]
    kinds = {len(s) if isinstance(s, tuple) else 0 for s in checked}
    if len(kinds) > 1:
        raise _fail(name, values, "shapes of one kind: all ints, or all tuples of the same length")
    for before, after in zip(checked, checked[1:]):
        if after == before or shape_size(after) < shape_size(before):
            raise _fail(
                name, values, f"shapes sorted from the smallest up, each once ({after!r} after {before!r})"
            )
    return checked
