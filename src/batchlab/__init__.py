"""batchlab: make the training batch size a measured decision.

The one-line calls are here -- :func:`find_batch_size`, :func:`profile`, :func:`measure_noise_scale`,
:func:`advise`, :func:`plan`, :func:`sweep`, :func:`write_report` and :func:`branch_critical_batch` -- with the types they take and return.
The building blocks under them live in their subpackages, each usable alone: :mod:`batchlab.workload` (a
training step and its state), :mod:`batchlab.devices`, :mod:`batchlab.fit` (the search), :mod:`batchlab.planning`,
:mod:`batchlab.profiling`, :mod:`batchlab.noise`, :mod:`batchlab.advice`, :mod:`batchlab.training` and
:mod:`batchlab.sweeps` (README, "How it is built").
"""

from batchlab.advice import Advice, advise
from batchlab.errors import BatchlabError, DoesNotFitError, FakeTensorError, NoNoiseScaleError, WorkloadError
from batchlab.fit import FitResult, Probe, find_batch_size
from batchlab.memory import MemoryBreakdown
from batchlab.noise import measure_noise_scale
from batchlab.planning import PlanResult, plan
from batchlab.profiling import Profile, profile
from batchlab.sweeps import (
    BranchedCriticalBatch,
    Budget,
    SweepResult,
    branch_critical_batch,
    sweep,
    write_report,
)
from batchlab.training import OOMGuard
from batchlab.workload import StepFunction, Workload

__version__ = "0.1.0"

__all__ = [
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
