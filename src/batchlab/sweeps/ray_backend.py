"""The Ray Tune backend of :func:`batchlab.sweep`: the same runs as Tune trials, on one machine or a cluster.

Each pending run becomes one trial of a grid search over run keys; the trial calls the very
:func:`~batchlab.sweeps.runner.execute_run` the local backend calls, reports its progress at every evaluation and,
at the end, its whole record (as JSON). A Tune callback in the driver -- this process -- stores and logs
each record the moment it arrives, through the same ``persist`` as the local backend: the records, the
sweep directory and the MLflow runs are identical in form whichever backend ran them, and workers never
need to reach the driver's files or tracking store (on a cluster they cannot).

Ray is an optional extra (``pip install 'batchlab[ray]'``), imported only here, through
:func:`batchlab.optional.require`. Without ``address``, a
small local Ray is started (``num_cpus`` = this machine's cores, no dashboard, a 256 MiB object store) and
shut down at the end; with ``address`` (``"auto"``, ``"ray://host:10001"``) an existing cluster is joined,
and left running. batchlab must be importable on the cluster's workers (the same environment), and so must
the workload factory (Ray pickles it; a built-in :class:`~batchlab.workloads.tasks.Task` pickles by name).
Each trial asks for ``cpus_per_trial`` CPUs; Ray sets each worker's OMP threads to match.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from batchlab import optional
from batchlab.errors import BatchlabError
from batchlab.sweeps.records import EventKind, RunSpec, SweepConfig, SweepEvent, SweepRun
from batchlab.sweeps.runner import execute_run

__all__ = ["run_trials"]

# The records are small; Ray's default object store (30% of RAM) would reserve GiBs of /dev/shm.
OBJECT_STORE_BYTES = 256 * 2**20
PROGRESS_KIND, DONE_KIND = "progress", "done"


def _tune() -> ModuleType:
    """``ray.tune``, or ImportError naming the ``ray`` extra."""
    return optional.require("ray.tune", extra="ray", purpose="sweeps with backend='ray'")


def _trial(
    config: dict[str, Any], factory: Any = None, sweep_config: dict | None = None, specs: dict | None = None
):
    """One Tune trial: run ``specs[config["key"]]`` and report progress, then the record."""
    tune = _tune()
    spec = RunSpec(**specs[config["key"]])
    cfg = SweepConfig.from_dict(sweep_config)
    reported = {"step": -1}

    def on_step(step: int, max_steps: int | None) -> None:
        # at most ~50 progress reports per trial: each one is a round trip to the driver
        stride = max(1, (max_steps or 500) // 50)
        if step - reported["step"] >= stride:
            reported["step"] = step
            tune.report({"kind": PROGRESS_KIND, "step": step, "max_steps": max_steps or 0})

    run = execute_run(factory, spec, cfg, on_step=on_step)
    tune.report(
        {"kind": DONE_KIND, "step": run.steps, "max_steps": run.steps, "record": json.dumps(run.to_dict())}
    )


class _Driver:
    """The driver's side of a Ray sweep: store and log each record as it arrives, report progress.

    Tune pickles its run configuration, callbacks included, into the experiment's ``tuner.pkl`` (for
    ``Tuner.restore``, which batchlab never calls: a sweep resumes from its own store). What this object
    holds belongs to the driver alone -- a live progress display holds thread locks, the MLflow tracker a
    database connection -- so it pickles as an empty one rather than failing the sweep with "cannot pickle
    '_thread.RLock' object", and nothing of it travels anywhere.
    """

    def __init__(
        self,
        persist: Callable[[SweepRun], SweepRun] | None = None,
        emit: Callable[[SweepEvent], None] | None = None,
        index: dict[str, int] | None = None,
        total: int = 0,
    ):
        self.persist, self.emit, self.index, self.total = persist, emit, index or {}, total
        self.done: set[str] = set()

    def __reduce__(self) -> tuple:
        return (_Driver, ())

    def start(self, key: str) -> None:
        self.emit(SweepEvent(EventKind.START, key, self.index[key], self.total))

    def result(self, key: str, result: dict[str, Any]) -> None:
        if result.get("kind") == DONE_KIND and key not in self.done:
            run = self.persist(SweepRun.from_dict(json.loads(result["record"])))
            self.done.add(key)
            self.emit(SweepEvent(EventKind.DONE, key, self.index[key], self.total, run.steps, run.steps, run))
        elif result.get("kind") == PROGRESS_KIND:
            step, most = result["step"], result["max_steps"] or None
            self.emit(SweepEvent(EventKind.STEP, key, self.index[key], self.total, step, most))


def _unimportable_modules() -> list[ModuleType]:
    """The loaded top-level modules that a worker could not import by name: files imported from a path.

    The loader of ``file.py:function`` specs (:func:`batchlab.workloads.load_callable`) imports such a file
    under a private module name that is on no ``sys.path``; Ray pickles functions by reference, so a factory
    defined at the top of that file would fail on a worker with "No module named 'batchlab_user_task_...'".
    A module counts when it came from a ``.py`` file and the path finder cannot find it again under its name.
    """
    found = []
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if "." in name or name == "__main__" or getattr(module, "__name__", None) != name:
            continue  # submodules go with their package; __main__ travels by value already
        if spec is None or not str(spec.origin or "").endswith(".py"):
            continue  # built-in and compiled modules: nothing to ship by value
        if importlib.machinery.PathFinder.find_spec(name) is None:
            found.append(module)
    return found


def run_trials(
    factory: Callable[[int, float, int], Any],
    pending: Sequence[tuple[int, RunSpec]],
    config: SweepConfig,
    *,
    total: int,
    persist: Callable[[SweepRun], SweepRun],
    emit: Callable[[SweepEvent], None],
    storage: Path,
    address: str | None = None,
    cpus_per_trial: float = 1.0,
) -> None:
    """Run ``pending`` as Ray Tune trials; ``persist`` each record in this process as it arrives.

    Raises :class:`~batchlab.errors.BatchlabError` naming the first failed trial's error, and
    ``KeyboardInterrupt`` when Tune stopped early (Ctrl-C) -- finished runs are persisted either way.
    """
    tune = _tune()
    ray = optional.require("ray", extra="ray", purpose="sweeps with backend='ray'")

    driver = _Driver(persist, emit, {spec.key: i for i, spec in pending}, total)

    class _Persist(tune.Callback):
        """Hands Tune's events to ``driver``, in this process (Tune calls its callbacks in the driver)."""

        def __init__(self, driver: _Driver):
            self.driver = driver

        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001 - Tune's signature
            self.driver.start(trial.config["key"])

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            self.driver.result(trial.config["key"], result)

    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves this machine
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs.update(num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES)
        ray.init(address=address, **kwargs)
    for module in _unimportable_modules():  # their functions travel by value
        ray.cloudpickle.register_pickle_by_value(module)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                factory=factory,
                sweep_config=config.to_dict(),
                specs={spec.key: spec.__dict__ for _, spec in pending},
            ),
            {"cpu": cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"key": tune.grid_search([spec.key for _, spec in pending])},
            tune_config=tune.TuneConfig(reuse_actors=False),
            run_config=tune.RunConfig(
                name=f"trials-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(storage).resolve()),
                verbose=0,
                callbacks=[_Persist(driver)],
            ),
        )
        results = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise BatchlabError(f"{len(errors)} Ray trial(s) failed; the first: {errors[0]}")
    missing = [spec.key for _, spec in pending if spec.key not in driver.done]
    if missing:
        raise KeyboardInterrupt(f"the Ray sweep stopped before {len(missing)} run(s) finished: {missing}")
