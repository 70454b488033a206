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
