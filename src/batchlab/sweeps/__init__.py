"""Sweeps: train at several batch sizes, record and track every run, resume, and compare them in one report.

The modules, each with one job (lower ones never import higher ones):

- :mod:`~batchlab.sweeps.records`: the records every other module passes around (budget, target, curves,
  one run's results, the configuration, progress events);
- :mod:`~batchlab.sweeps.trainable`: what a sweep trains (the ``Trainable`` protocol, :class:`SupervisedRun`);
  :mod:`~batchlab.sweeps.workload_run`: a run from a :class:`~batchlab.Workload`-returning function;
- :mod:`~batchlab.sweeps.store`: the sweep directory (atomic JSON files, resume);
- :mod:`~batchlab.sweeps.result`: the comparison across runs (per batch size, critical batch, noise scale);
- :mod:`~batchlab.sweeps.runner`: one run's training loop; :mod:`~batchlab.sweeps.auto`: ``"auto"`` sizes;
  :mod:`~batchlab.sweeps.ramped_run`: a run whose batch ramps with the noise scale (:class:`RampFactory`);
- :mod:`~batchlab.sweeps.branched`: the critical batch measured directly, by short runs at several batch sizes
  branched from a Workload's state (:func:`branch_critical_batch`), and advice made with it (:func:`branch_advice`);
- :mod:`~batchlab.sweeps.tracking` (MLflow), :mod:`~batchlab.sweeps.ray_backend` (Ray Tune),
  :mod:`~batchlab.sweeps.plots` and :mod:`~batchlab.sweeps.report` (PNGs, one HTML page);
- :mod:`~batchlab.sweeps.api`: :func:`sweep`, which ties them together (``batchlab.sweep`` at the top level).
"""

from batchlab.sweeps.api import sweep
from batchlab.sweeps.auto import AUTO_MIN_BATCH, auto_batch_sizes
from batchlab.sweeps.branched import BranchedCriticalBatch, branch_advice, branch_critical_batch
from batchlab.sweeps.ramped_run import RampedRun, RampFactory
from batchlab.sweeps.records import (
    Budget,
    Curve,
    EventKind,
    RunSpec,
    RunStatus,
    StopReason,
    SweepConfig,
    SweepEvent,
    SweepRun,
    Target,
    TargetMode,
)
from batchlab.sweeps.report import ReportFiles, load_sweep, verdict, write_report
from batchlab.sweeps.result import BatchSummary, SweepResult
from batchlab.sweeps.runner import execute_run
from batchlab.sweeps.store import DEFAULT_DIRECTORY, SweepStore
from batchlab.sweeps.tracking import SweepTracker, default_tracking_uri, read_experiment
from batchlab.sweeps.trainable import NOISE_EVERY, SupervisedRun, Trainable, TrainableFactory, accuracy
from batchlab.sweeps.workload_run import WorkloadFactory, WorkloadRun

__all__ = [
    "AUTO_MIN_BATCH",
    "BatchSummary",
    "BranchedCriticalBatch",
    "Budget",
    "Curve",
    "DEFAULT_DIRECTORY",
    "EventKind",
    "NOISE_EVERY",
    "RampFactory",
    "RampedRun",
    "ReportFiles",
    "RunSpec",
    "RunStatus",
    "StopReason",
    "SupervisedRun",
    "SweepConfig",
    "SweepEvent",
    "SweepResult",
    "SweepRun",
    "SweepStore",
    "SweepTracker",
    "Target",
    "TargetMode",
    "Trainable",
    "TrainableFactory",
    "WorkloadFactory",
    "WorkloadRun",
    "accuracy",
    "auto_batch_sizes",
    "branch_advice",
    "branch_critical_batch",
    "default_tracking_uri",
    "execute_run",
    "load_sweep",
    "read_experiment",
    "sweep",
    "verdict",
    "write_report",
]
