"""The public surface: every name in __all__ resolves, and importing batchlab stays light."""

import subprocess
import sys

import batchlab


def test_every_public_name_resolves_and_is_documented():
    assert len(batchlab.__all__) == len(set(batchlab.__all__))
    for name in batchlab.__all__:
        obj = getattr(batchlab, name)
        if callable(obj):
            assert obj.__doc__, f"batchlab.{name} has no docstring"


def test_import_batchlab_pulls_in_no_optional_framework():
    optional = [
        "matplotlib",
        "mlflow",
        "ray",
        "lightning",
        "transformers",
        "ultralytics",
        "sklearn",
        "accelerate",
    ]
    code = f"import sys, batchlab; print([m for m in {optional!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
