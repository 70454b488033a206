"""Str-valued enums for outcomes and limits: typed in Python, their plain value in JSON and in print.

``class Outcome(Label): FITS = "fits"`` gives ``Outcome.FITS == "fits"``, ``f"{Outcome.FITS}"`` is ``"fits"``
and ``json.dumps`` writes ``"fits"`` -- so results keep the JSON they had when these were plain strings.
(A bare ``(str, Enum)`` prints as ``Outcome.FITS`` on Python 3.11, which would leak into messages and tags.)
"""

from __future__ import annotations

from enum import Enum


class Label(str, Enum):
    """A str-valued enum that prints and formats as its value."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)
