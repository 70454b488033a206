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


def test_the_top_level_is_the_one_line_calls_and_the_types_they_take_and_return():
    assert sorted(batchlab.__all__) == [
        "Advice",
        "BatchlabError",
        "BranchedCriticalBatch",
        "Budget",
        "DoesNotFitError",
        "FakeTensorError",
        "FitResult",
        "MemoryBreakdown",
        "NoNoiseScaleError",
        "OOMGuard",
        "PlanResult",
        "Probe",
        "Profile",
        "StepFunction",
        "SweepResult",
        "Workload",
        "WorkloadError",
        "advise",
        "branch_critical_batch",
        "find_batch_size",
        "measure_noise_scale",
        "plan",
        "profile",
        "sweep",
        "write_report",
    ]


def test_no_top_level_function_shadows_a_subpackage():
    import importlib
    import pkgutil

    packages = {
        info.name for info in pkgutil.iter_modules(batchlab.__path__) if not info.name.startswith("_")
    }
    assert not packages & set(batchlab.__all__)
    for name in packages:
        module = importlib.import_module(f"batchlab.{name}")
        assert module.__doc__, f"batchlab.{name} has no docstring"
    assert importlib.import_module("batchlab.sweeps").DEFAULT_DIRECTORY == "batchlab-runs"


def test_every_subpackage_declares_what_it_exports_and_each_name_resolves():
    import importlib

    for name in (
        "advice",
        "devices",
        "fit",
        "noise",
        "planning",
        "profiling",
        "sweeps",
        "training",
        "workload",
    ):
        module = importlib.import_module(f"batchlab.{name}")
        for exported in module.__all__:
            assert getattr(module, exported) is not None, f"batchlab.{name}.{exported}"
