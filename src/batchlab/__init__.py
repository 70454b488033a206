"""batchlab: make the training batch size a measured decision.

The one-line call is :func:`find_batch_size`; under it sit :class:`Workload` (one training step),
the devices (:mod:`batchlab.devices`) and the pure search logic (:mod:`batchlab.fit.search`), each usable alone.
"""

from batchlab.advice import Candidate, Recommendation, advise
from batchlab.devices import CPUDevice, CUDADevice, Device, Measurement, SimulatedDevice
from batchlab.devices.oom import is_out_of_memory
from batchlab.errors import BatchlabError, DoesNotFitError, FakeTensorError, WorkloadError
from batchlab.fit.search import FitResult, Probe, find_batch_size
from batchlab.noise import measure_noise_scale
from batchlab.planning import FakeDevice, PlanResult, estimate_memory_line, plan
from batchlab.profiling import Profile, ProfilePoint, VariantSummary, profile
from batchlab.spec import DEFAULT_FRACTION, BatchSpec, parse_batch
from batchlab.sweeps import Budget, SweepResult, SweepRun, sweep, write_report
from batchlab.training.guard import GuardEvent, OOMGuard
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload.checkpointing import activation_checkpointing
from batchlab.workload.state import StateSnapshot
from batchlab.workload.workload import StepFunction, Workload

__version__ = "0.1.0"

__all__ = [
    "BatchSpec",
    "BatchlabError",
    "Budget",
    "CPUDevice",
    "CUDADevice",
    "Candidate",
    "DEFAULT_FRACTION",
    "Device",
    "DoesNotFitError",
    "FakeDevice",
    "FakeTensorError",
    "FitResult",
    "GuardEvent",
    "Measurement",
    "OOMGuard",
    "PlanResult",
    "Probe",
    "Profile",
    "ProfilePoint",
    "Recommendation",
    "SimulatedDevice",
    "StateSnapshot",
    "StepFunction",
    "SweepResult",
    "SweepRun",
    "VariantSummary",
    "Workload",
    "WorkloadError",
    "activation_checkpointing",
    "advise",
    "estimate_memory_line",
    "find_batch_size",
    "format_bytes",
    "is_out_of_memory",
    "measure_noise_scale",
    "parse_batch",
    "parse_bytes",
    "plan",
    "profile",
    "sweep",
    "write_report",
]
