"""The one guard for optional dependencies: import a module of an extra, or say which extra installs it.

The core needs torch, numpy, psutil and rich; plots, tracking, Ray and the framework integrations are extras
(pyproject.toml). Code that needs one imports it through :func:`require` when it is used, never at module
import, so ``import batchlab`` works without any of them (tests/test_public_api.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) or raise ImportError naming the extra to install.

    ``purpose`` is what needs it, worded to start the message: "plots need matplotlib: pip install ...".
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(f"{purpose} need {package}: pip install 'batchlab[{extra}]'") from None
