"""Built-in example workloads for the CLI, demos and benchmarks, and the loader for ``--workload`` specs.

A spec is one of:

- a built-in name: ``mlp-digits``, ``cnn``, ``resnet``, ``gpt``, ``text-lm`` (see :data:`BUILTIN`);
- ``path/to/file.py:function`` or ``package.module:function``: a function called with no arguments that
  returns a :class:`~batchlab.Workload` or a plain ``step(batch_size)`` callable.

Built-ins take ``device=`` so the CLI can place them; a user's function places its own model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchlab.errors import WorkloadError
from batchlab.workloads.examples import gpt, mlp_digits, resnet, small_cnn
from batchlab.workloads.text import text_lm

FILE_MODULE_PREFIX = "batchlab_user_"  # a spec's file is imported as batchlab_user_<kind>_<stem>: only here
BUILTIN: dict[str, Callable[..., Any]] = {
    "mlp-digits": mlp_digits,
    "cnn": small_cnn,
    "resnet": resnet,
    "gpt": gpt,
    "text-lm": text_lm,
}


def load_workload(spec: str, *, device: str = "cpu") -> Any:
    """Build the workload a ``--workload`` spec names (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise WorkloadError(
            f"invalid workload {spec!r}: expected one of {', '.join(BUILTIN)}, path.py:function or module:function"
        )
    spec = spec.strip()
    if spec in BUILTIN:
        return BUILTIN[spec](device=device)
    if ":" not in spec:
        raise WorkloadError(
            f"unknown workload {spec!r}: expected one of {', '.join(BUILTIN)}, path.py:function or module:function"
        )
    return load_callable(spec, kind="workload")()


def load_callable(spec: str, *, kind: str) -> Callable[..., Any]:
    """Import the callable a ``path/to/file.py:function`` or ``package.module:function`` spec names.

    ``kind`` ("workload", "task") only words the errors, which name the spec and say what is missing.
    """
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise WorkloadError(f"{kind} file {target!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"{FILE_MODULE_PREFIX}{kind}_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise WorkloadError(f"cannot import {kind} module {target!r}: {exc}") from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        raise WorkloadError(f"{target!r} has no callable {attribute!r}")
    return function
