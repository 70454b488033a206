"""Byte sizes: one parser and one formatter, used by the API, the CLI and every report.

Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) powers of 1000, as
the IEC and SI define them and as card vendors print them ("80GB" on an H100 box is 80e9 bytes).
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_ACCEPTED = 'a positive number of bytes: an int, or a string like "4GiB", "512MiB", "2.5GB", "1e9"'


def parse_bytes(value: int | float | str) -> int:
    """Return ``value`` as a positive whole number of bytes.

    Accepts ints (bytes), finite positive floats (rounded down) and strings with an optional unit:
    ``"4GiB"``, ``"512 MiB"``, ``"2.5GB"``, ``"1e9"``. Anything else raises ``ValueError`` naming the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid byte size {value!r}: expected {_ACCEPTED}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"invalid byte size {value!r}: expected {_ACCEPTED} (units: KB MB GB TB KiB MiB GiB TiB)"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"invalid byte size {value!r} of type {type(value).__name__}: expected {_ACCEPTED}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"invalid byte size {value!r}: expected {_ACCEPTED}")
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ValueError(f"invalid byte size {value!r}: less than one byte")
    return size


def format_bytes(size: int | float | None) -> str:
    """Format a byte count for people: ``format_bytes(3 * 2**30) == "3.00 GiB"``; None gives ``"n/a"``."""
    if size is None:
        return "n/a"
    sign = "-" if size < 0 else ""
    size = abs(float(size))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.2f} {unit}"
        size /= 1024
    return f"{sign}{size:.2f} TiB"
