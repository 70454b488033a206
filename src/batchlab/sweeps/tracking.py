"""MLflow tracking for sweeps: one experiment per sweep, one run per (batch size, LR multiplier, seed).

The default store is embedded: a SQLite database ``batchlab-runs/mlflow.db`` under the working directory,
artifacts beside it in ``batchlab-runs/artifacts/``. Any tracking URI works instead (``http://host:5000``,
``sqlite:///path.db``, ``databricks``...). Browse the default store with::

    mlflow ui --backend-store-uri sqlite:///batchlab-runs/mlflow.db

(``mlflow ui`` serves on http://127.0.0.1:5000.) MLflow is an optional extra (``pip install
'batchlab[track]'``) and is imported only here (through :func:`batchlab.optional.require`), only when a
sweep is tracked.

Layout of an experiment (named after the sweep):

- a parent run (tag ``batchlab.kind=sweep``) holding the sweep's configuration, the fitted critical batch and
  noise scale as metrics, and the report (HTML, PNGs) and ``sweep.json`` as artifacts;
- one child run per run of the sweep (tag ``batchlab.kind=run``, ``batchlab.run_key``, nested under the parent
  through ``mlflow.parentRunId``): parameters (batch size, lr, base lr/batch, rule, multiplier, accumulation,
  precision, workload, seed, budget, target, device), step metrics (``train_loss``; ``val_loss`` and the other
  validation metrics, ``samples``, ``train_seconds``, ``noise_scale`` at each evaluation; a batch ramp's
  ``batch_size`` and ``lr`` at every step where they change, and the last), summary metrics
  (throughput, peak memory, steps/samples/seconds to target...) and the whole record as
  ``batchlab/run.json``. Metric timestamps are the run's start plus its training seconds, so MLflow's
  "relative time" axis is training time.

A child run is created only when its run has finished, all at once, and its id is then written into the
sweep directory; :meth:`SweepTracker.reconcile` makes a restarted sweep consistent whatever moment a kill hit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batchlab import optional
from batchlab.sweeps.records import SweepConfig, SweepRun
from batchlab.sweeps.result import SweepResult

log = logging.getLogger("batchlab")

__all__ = ["SweepTracker", "default_tracking_uri", "mlflow_available", "read_experiment"]

DB_NAME = "mlflow.db"
RUN_ARTIFACT = "batchlab/run.json"
CONFIG_ARTIFACT = "batchlab/sweep.json"
MAX_POINTS = 1000  # training-loss points per run sent to MLflow (every k-th step); the JSON keeps them all
BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call
KIND, KEY, SWEEP, FINGERPRINT = "batchlab.kind", "batchlab.run_key", "batchlab.sweep", "batchlab.fingerprint"


def _client(tracking_uri: str) -> Any:
    """An ``mlflow.MlflowClient`` for ``tracking_uri``, or ImportError naming the ``track`` extra."""
    mlflow = optional.require("mlflow", extra="track", purpose="sweeps tracked in MLflow")
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def mlflow_available() -> bool:
    """Can MLflow be imported? (A sweep with the default ``tracking_uri`` skips tracking when it cannot.)"""
    try:
        optional.require("mlflow", extra="track", purpose="sweeps tracked in MLflow")
    except ImportError:
        return False
    return True


def _target_text(config: SweepConfig, none: str = "none") -> str:
    return config.target.describe() if config.target else none


def default_tracking_uri(root: str | Path) -> str:
    """``sqlite:///<root>/mlflow.db`` with an absolute path (MLflow's SQLite URIs take four slashes for one)."""
    return f"sqlite:///{(Path(root).resolve() / DB_NAME).as_posix()}"


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store (``<dir of mlflow.db>/artifacts/<experiment>``); others decide (None)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "artifacts" / experiment).resolve().as_uri()
    return None


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No tqdm bar per downloaded record (MLflow draws one for each small JSON); restored afterwards."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text[:6000]  # MLflow limits a parameter value to 6000 characters


class SweepTracker:
    """An MLflow experiment for one sweep; see the module docstring for what is logged where."""

    def __init__(self, client: Any, experiment_id: str, parent_run_id: str, config: SweepConfig):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.config = config

    @classmethod
    def open(
        cls, tracking_uri: str, config: SweepConfig, *, parent_run_id: str | None = None
    ) -> SweepTracker:
        """Open (or create) the sweep's experiment and its parent run.

        An experiment of the same name made by a *different* sweep configuration is refused with
        ``ValueError``; a deleted one is restored.
        """
        client = _client(tracking_uri)
        experiment = client.get_experiment_by_name(config.name)
        if experiment is None:
            experiment_id = client.create_experiment(
                config.name,
                artifact_location=_artifact_location(tracking_uri, config.name),
                tags={FINGERPRINT: config.fingerprint, "batchlab.workload.workload": config.workload},
            )
        else:
            experiment_id = experiment.experiment_id
            theirs = experiment.tags.get(FINGERPRINT)
            if theirs not in (None, config.fingerprint):
                raise ValueError(
                    f"MLflow experiment {config.name!r} at {tracking_uri} belongs to a different sweep; "
                    "pass another name="
                )
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        parent = cls._find_parent(client, experiment_id, parent_run_id)
        if parent is None:
            run = client.create_run(
                experiment_id,
                run_name=f"sweep {config.name}",
                tags={KIND: "sweep", SWEEP: config.name, "mlflow.note.content": _describe(config)},
            )
            parent = run.info.run_id
            params = {
                "workload": config.workload,
                "batch_sizes": config.batch_sizes,
                "lr": config.lr,
                "base_batch": config.effective_base_batch,
                "rule": config.rule,
                "lr_multipliers": config.lr_multipliers,
                "seeds": config.seeds,
                "budget": config.budget.describe(),
                "target": _target_text(config),
            }
            from mlflow.entities import Param

            client.log_batch(parent, params=[Param(k, _param(v)) for k, v in params.items()])
            client.log_text(parent, json.dumps({"config": config.to_dict()}, indent=2), CONFIG_ARTIFACT)
        return cls(client, experiment_id, parent, config)

    @staticmethod
    def _find_parent(client: Any, experiment_id: str, hint: str | None) -> str | None:
        if hint:
            try:
                run = client.get_run(hint)
                if run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id:
                    return hint
            except Exception:  # noqa: BLE001 - a missing run raises MlflowException; any failure means "make one"
                pass
        found = client.search_runs([experiment_id], filter_string=f"tags.`{KIND}` = 'sweep'", max_results=1)
        return found[0].info.run_id if found else None

    # ---------------------------------------------------------------------------------------- runs

    def _child_runs(self) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{KIND}` = 'run'",
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def has_run(self, run_id: str | None) -> bool:
        """True when ``run_id`` is an active run of this experiment."""
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException for an unknown id
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    def reconcile(self, finished: Mapping[str, SweepRun]) -> dict[str, SweepRun]:
        """Make MLflow agree with the sweep directory after a restart; return runs to restore to the directory.

        For each child run in MLflow: the one whose id the directory records for its key is kept (and marked
        FINISHED if a kill left it RUNNING); a FINISHED run whose key the directory lacks is recovered from
        its ``run.json`` (the process died after logging it, before writing the JSON); anything else -- a run
        cut off mid-logging, or a second copy of a key -- is deleted, so each key has exactly one run.
        """
        from mlflow.entities import RunStatus

        recovered: dict[str, SweepRun] = {}
        for run in sorted(self._child_runs(), key=lambda r: r.info.start_time or 0):
            run_id, key = run.info.run_id, run.data.tags.get(KEY)
            known = finished.get(key)
            if known is not None and known.mlflow_run_id == run_id:
                if run.info.status != "FINISHED":
                    self.client.set_terminated(run_id, "FINISHED", end_time=int(known.finished_at * 1000))
                continue
            if (
                known is None
                and key not in recovered
                and run.info.status == RunStatus.to_string(RunStatus.FINISHED)
            ):
                record = self._download_record(run_id)
                if record is not None and record.get("key") == key:
                    recovered[key] = SweepRun.from_dict({**record, "mlflow_run_id": run_id})
                    continue
            log.info("deleting MLflow run %s (%s): unfinished or duplicate", run_id, key)
            self.client.delete_run(run_id)
        return recovered

    def _download(self, run_id: str, artifact: str) -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
            try:
                path = self.client.download_artifacts(run_id, artifact, tmp)
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001 - no artifact (cut off before it was logged): not recoverable
                return None

    def _download_record(self, run_id: str) -> dict[str, Any] | None:
        return self._download(run_id, RUN_ARTIFACT)

    def log_run(self, run: SweepRun) -> str:
        """Log one finished run as a child of the sweep's run; return its MLflow run id."""
        from mlflow.entities import Metric, Param

        start_ms = int(run.started_at * 1000)
        created = self.client.create_run(
            self.experiment_id,
            start_time=start_ms,
            run_name=f"b={run.batch_size} lr={run.lr:.3g} seed={run.seed}",
            tags={
                KIND: "run",
                KEY: run.key,
                SWEEP: self.config.name,
                "mlflow.parentRunId": self.parent_run_id,
                "batchlab.status": run.status,
            },
        )
        run_id = created.info.run_id
        params = {
            "batch_size": run.batch_size,
            "lr": run.lr,
            "base_lr": run.base_lr,
            "base_batch": run.base_batch,
            "rule": run.rule,
            "lr_multiplier": run.lr_multiplier,
            "accumulation": run.accumulation,
            "micro_batch": run.batch_size // max(run.accumulation, 1),
            "precision": run.precision,
            "workload": run.workload,
            "seed": run.seed,
            "device": run.device,
            "budget": self.config.budget.describe(),
            "target": _target_text(self.config),
        }
        metrics: list[Metric] = []

        def add(key: str, value: Any, step: int = 0, seconds: float = 0.0) -> None:
            if value is not None and math.isfinite(float(value)):
                metrics.append(Metric(key, float(value), start_ms + int(seconds * 1000), int(step)))

        train = run.train
        stride = max(1, math.ceil(len(train) / MAX_POINTS))
        for i in range(0, len(train), stride):
            add("train_loss", train["loss"][i], train.step[i], train.seconds[i])
        for name in (n for n in train.values if n != "loss"):  # a ramp's batch_size and lr: where they change
            column, last = train[name], None
            for i, value in enumerate(column):
                if value is not None and (value != last or i == len(column) - 1):
                    add(name, value, train.step[i], train.seconds[i])
                    last = value
        val = run.val
        for i in range(len(val)):
            for name, column in val.values.items():
                add(name if name == "noise_scale" else f"val_{name}", column[i], val.step[i], val.seconds[i])
            add("samples", val.samples[i], val.step[i], val.seconds[i])
            add("train_seconds", val.seconds[i], val.step[i], val.seconds[i])
        final_step, final_seconds = run.steps, run.train_seconds
        for name, value in {
            "throughput_samples_per_s": run.throughput,
            "peak_memory_bytes": run.peak_bytes,
            "steps": run.steps,
            "samples_total": run.samples,
            "train_seconds_total": run.train_seconds,
            "wall_seconds": run.wall_seconds,
            "steps_to_target": run.steps_to_target,
            "samples_to_target": run.samples_to_target,
            "seconds_to_target": run.seconds_to_target,
            "noise_scale_final": run.noise_scale,
            "noise_scale_at_target": run.noise_scale_at_target,
            "best_val_loss": run.best_val_loss,
            **{f"final_val_{k}": v for k, v in run.final_val.items()},
        }.items():
            add(name, value, final_step, final_seconds)
        param_list = [Param(k, _param(v)) for k, v in params.items()]
        for i in range(0, max(len(metrics), 1), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH], params=param_list if i == 0 else [])
        self.client.log_text(run_id, json.dumps(run.to_dict()), RUN_ARTIFACT)
        self.client.set_terminated(
            run_id, "FINISHED" if run.status == "finished" else "FAILED", end_time=int(run.finished_at * 1000)
        )
        return run_id

    def finish_sweep(self, result: SweepResult, files: Iterable[Path]) -> None:
        """Log the sweep's summary metrics and the report files to the parent run and mark it FINISHED.

        A parent already FINISHED with as many runs (a re-run of a complete sweep) is left as it is, so its
        metrics are not logged twice.
        """
        from mlflow.entities import Metric

        parent = self.client.get_run(self.parent_run_id)
        logged = parent.data.metrics.get("runs")
        if parent.info.status == "FINISHED" and logged is not None and int(logged) == len(result.runs):
            return
        now = int(time.time() * 1000)
        metrics = []
        fit = result.critical_batch()
        noise = result.noise_scale()
        for key, value in {
            "b_crit": fit.b_crit if fit else None,
            "s_min": fit.s_min if fit else None,
            "noise_scale": noise,
            "runs": len(result.runs),
        }.items():
            if value is not None and math.isfinite(value):
                metrics.append(Metric(key, float(value), now, 0))
        if metrics:
            self.client.log_batch(self.parent_run_id, metrics=metrics)
        for file in files:
            if Path(file).exists():
                self.client.log_artifact(self.parent_run_id, str(file), "report")
        done = len(result.runs) == len(result.config.specs())
        if done:
            self.client.set_terminated(self.parent_run_id, "FINISHED", end_time=now)


def _describe(config: SweepConfig) -> str:
    target = _target_text(config, none="no target")
    return (
        f"batchlab sweep of {config.workload} at batch sizes {config.batch_sizes}; lr {config.lr:g} at batch "
        f"{config.effective_base_batch}, rule {config.rule}; budget {config.budget.describe()}; {target}"
    )


def read_experiment(experiment: str, tracking_uri: str) -> SweepResult:
    """Rebuild a :class:`~batchlab.sweeps.result.SweepResult` from an MLflow experiment (name or id) of a sweep.

    Each child run's ``batchlab/run.json`` artifact holds its whole record; runs without one (not logged by
    batchlab) are skipped. Raises ``ValueError`` when the experiment does not exist or has no batchlab runs.
    """
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - MlflowException for an unknown id
            found = None
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    tracker = SweepTracker(client, found.experiment_id, "", None)  # type: ignore[arg-type]
    records = []
    for run in tracker._child_runs():
        record = tracker._download_record(run.info.run_id)
        if record is not None:
            records.append(SweepRun.from_dict({**record, "mlflow_run_id": run.info.run_id}))
    if not records:
        raise ValueError(f"MLflow experiment {experiment!r} has no batchlab runs with a {RUN_ARTIFACT}")
    parents = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{KIND}` = 'sweep'", max_results=1
    )
    data = tracker._download(parents[0].info.run_id, CONFIG_ARTIFACT) if parents else None
    if data is None:
        raise ValueError(f"MLflow experiment {experiment!r} has no batchlab sweep run with {CONFIG_ARTIFACT}")
    config = SweepConfig.from_dict(data["config"])
    order = {spec.key: i for i, spec in enumerate(config.specs())}
    records.sort(key=lambda r: (order.get(r.key, len(order)), r.batch_size, r.lr_multiplier, r.seed))
    return SweepResult(
        config,
        records,
        None,
        tracking_uri,
        found.experiment_id,
        parents[0].info.run_id if parents else None,
    )
