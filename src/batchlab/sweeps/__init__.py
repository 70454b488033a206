"""Sweeps: train at several batch sizes, record and track every run, resume, and compare in one report."""

from batchlab.sweeps.records import (
    AUTO_MIN_BATCH,
    DEFAULT_DIRECTORY,
    BatchSummary,
    Budget,
    Curve,
    RunSpec,
    SweepConfig,
    SweepEvent,
    SweepResult,
    SweepRun,
    SweepStore,
    Target,
    auto_batch_sizes,
    execute_run,
    sweep,
)
from batchlab.sweeps.report import ReportFiles, load_sweep, verdict, write_report
from batchlab.sweeps.tracking import SweepTracker, default_tracking_uri, read_experiment
from batchlab.sweeps.trainable import NOISE_EVERY, SupervisedRun, Trainable, TrainableFactory, accuracy

__all__ = [
    "AUTO_MIN_BATCH",
    "BatchSummary",
    "Budget",
    "Curve",
    "DEFAULT_DIRECTORY",
    "NOISE_EVERY",
    "ReportFiles",
    "RunSpec",
    "SupervisedRun",
    "SweepConfig",
    "SweepEvent",
    "SweepResult",
    "SweepRun",
    "SweepStore",
    "SweepTracker",
    "Target",
    "Trainable",
    "TrainableFactory",
    "accuracy",
    "auto_batch_sizes",
    "default_tracking_uri",
    "execute_run",
    "load_sweep",
    "read_experiment",
    "sweep",
    "verdict",
    "write_report",
]
