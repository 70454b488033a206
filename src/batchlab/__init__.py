"""batchlab: make the training batch size a measured decision.

The one-line call is :func:`find_batch_size`; under it sit :class:`Workload` (one training step),
the devices (:mod:`batchlab.devices`) and the pure search logic (:mod:`batchlab.search`), each usable alone.
"""

from batchlab.devices import CPUDevice, CUDADevice, Device, Measurement, SimulatedDevice
from batchlab.errors import BatchlabError, DoesNotFitError, WorkloadError
from batchlab.oom import is_out_of_memory
from batchlab.search import FitResult, Probe, find_batch_size
from batchlab.spec import DEFAULT_FRACTION, BatchSpec, parse_batch
from batchlab.state import StateSnapshot
from batchlab.units import format_bytes, parse_bytes
from batchlab.workload import StepFunction, Workload

__version__ = "0.1.0"

__all__ = [
    "BatchSpec",
    "BatchlabError",
    "CPUDevice",
    "CUDADevice",
    "DEFAULT_FRACTION",
    "Device",
    "DoesNotFitError",
    "FitResult",
    "Measurement",
    "Probe",
    "SimulatedDevice",
    "StateSnapshot",
    "StepFunction",
    "Workload",
    "WorkloadError",
    "find_batch_size",
    "format_bytes",
    "is_out_of_memory",
    "parse_batch",
    "parse_bytes",
]
