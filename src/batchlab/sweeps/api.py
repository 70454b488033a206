"""sweep(): train at several batch sizes (LR scaled by rule), track every run, resume, and compare.

One call::

    from batchlab.workloads.tasks import load_task
    result = batchlab.sweep(load_task("mlp-digits"), [16, 64, 256], lr=1e-3, base_batch=16, budget=400,
                            target=0.2)
    print(result.summary())

What a sweep does, in order:

1. **Runs.** One run per (batch size, LR multiplier, seed): ``factory(batch_size, lr, seed)`` builds a fresh
   :class:`~batchlab.sweeps.trainable.Trainable`; ``lr`` is ``scale_lr(lr, base_batch, batch_size, rule).lr`` times
   the multiplier (a small LR grid per batch size, since the Tuning Playbook warns that the LR must be
   re-tuned when the batch changes). Each run trains until its budget (optimizer steps, samples or seconds
   of training) is spent, the target is reached (with ``stop_at_target``), or the loss stops being finite.
2. **Records.** Each run keeps its training loss at every step and its validation metrics at a schedule of
   evaluations (dense early, then every ``eval_every`` steps), each point with its step, samples and training
   seconds (evaluation excluded); the throughput; the peak memory of the run; the gradient noise scale
   measured along the way; and the steps, samples and seconds to the target, interpolated between the two
   evaluations that bracket the crossing (:func:`batchlab.noise.critical.crossing`).
3. **Store and resume.** A sweep directory ``<directory>/sweeps/<name>/`` holds ``sweep.json`` (the
   configuration) and one ``runs/<key>.json`` per *finished* run, each written atomically (temp file,
   fsync, rename). Running the same sweep again skips every finished run: a Ctrl-C or a killed process
   loses only the run that was in progress. The default ``name`` is the workload's name plus a hash of the
   configuration, so re-running the same command resumes it.
4. **Tracking.** MLflow (:mod:`batchlab.sweeps.tracking`): one experiment per sweep, one child run per (batch size,
   LR multiplier, seed) under a parent run that carries the report; a run is logged when it finishes, before
   its JSON is written, and a restart reconciles the store with MLflow (no run is logged twice; a run
   finished in MLflow but not in the directory is recovered from its artifact, not redone).
5. **Backends.** ``"local"`` runs one after another in this process; ``"ray"`` runs the same
   :func:`~batchlab.sweeps.runner.execute_run` as Ray Tune trials (:mod:`batchlab.sweeps.ray_backend`); the driver stores and logs each
   result as it arrives, so both backends produce identical records in the same places.
6. **Report.** :func:`batchlab.sweeps.report.write_report` draws the comparison (PNGs and one HTML page), logged as
   artifacts of the parent run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from batchlab import checks
from batchlab.advice.scaling import RULES
from batchlab.sweeps.auto import auto_batch_sizes
from batchlab.sweeps.ray_backend import run_trials
from batchlab.sweeps.records import Budget, EventKind, SweepConfig, SweepEvent, SweepRun, Target, fingerprint
from batchlab.sweeps.report import write_report
from batchlab.sweeps.result import SweepResult
from batchlab.sweeps.runner import execute_run
from batchlab.sweeps.store import DEFAULT_DIRECTORY, SweepStore
from batchlab.sweeps.tracking import SweepTracker, default_tracking_uri, mlflow_available
from batchlab.sweeps.trainable import close_run

log = logging.getLogger("batchlab")

__all__ = ["sweep"]


def _workload_identity(factory: Any) -> tuple[str, dict[str, Any]]:
    """(name, options) of a factory for the sweep's fingerprint: its ``sweep_options`` (a user's factory with
    the CLI's flags, :class:`~batchlab.workloads.tasks.ConfiguredFactory`), or a dataclass's fields."""
    name = getattr(factory, "name", None) or getattr(factory, "__name__", None) or type(factory).__name__
    if isinstance(getattr(factory, "sweep_options", None), Mapping):
        options = dict(factory.sweep_options)
    elif is_dataclass(factory):
        options = {k: v for k, v in asdict(factory).items() if k != "name"}
    else:
        options = {}
    return str(name), options


def _distinct(name: str, values: Any, each: Callable[[str, Any], Any], expected: str) -> list:
    """``values`` as a non-empty list of distinct items, each one checked by ``each`` (a batchlab.checks check)."""
    given = list(values) if isinstance(values, Iterable) and not isinstance(values, (str, bytes)) else []
    if not given:
        raise ValueError(f"invalid {name} {values!r}: expected {expected}")
    items = [each(f"{name} entry", v) for v in given]
    if len(set(items)) != len(items):
        raise ValueError(f"invalid {name} {values!r}: expected {expected} (it has duplicates)")
    return items


def _check_batch_sizes(batch_sizes: Any) -> list[int] | str:
    if isinstance(batch_sizes, str) and batch_sizes.strip().lower() == "auto":
        return "auto"
    expected = 'a non-empty list of distinct ints >= 1 or "auto"'
    return sorted(_distinct("batch_sizes", batch_sizes, checks.integer, expected))


def _check_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return list(range(checks.integer("seeds", seeds)))
    return _distinct(
        "seeds", seeds, partial(checks.integer, minimum=0), "a count >= 1 or a list of distinct ints >= 0"
    )


def _check_host_room(factory: Callable[[int, float, int], Any], batch_size: int, lr: float) -> None:
    """Build the largest batch's run once and let it refuse a micro-batch the host cannot hold (a Workload's
    run: :meth:`~batchlab.sweeps.WorkloadRun.check_host_room`), before the sweep directory is written: on
    the CPU a step past the RAM kills the process. Other trainables have no such check."""
    run = factory(batch_size, lr, 0)
    try:
        check = getattr(run, "check_host_room", None)
        if callable(check):
            check()
    finally:
        close_run(run)


def sweep(
    workload_factory: Callable[[int, float, int], Any],
    batch_sizes: Sequence[int] | str,
    *,
    lr: float,
    base_batch: int | None = None,
    rule: str = "sqrt",
    budget: Budget | int | str | Mapping[str, Any],
    target: Target | float | str | Mapping[str, Any] | None = None,
    seeds: int | Sequence[int] = 1,
    lr_multipliers: Sequence[float] = (1.0,),
    eval_every: int | None = None,
    stop_at_target: bool = False,
    name: str | None = None,
    directory: str | Path = DEFAULT_DIRECTORY,
    tracking_uri: str | None | bool = None,
    backend: str = "local",
    ray_address: str | None = None,
    ray_cpus_per_trial: float = 1.0,
    report: bool = True,
    on_event: Callable[[SweepEvent], None] | None = None,
) -> SweepResult:
    """Train ``workload_factory`` at each batch size and compare; see the module docstring for the steps.

    Args:
        workload_factory: ``factory(batch_size, lr, seed)`` -> a trainable (``train_step()``,
            ``evaluate()``), e.g. ``batchlab.workloads.tasks.load_task("mlp-digits")``, or
            ``batchlab.sweeps.WorkloadFactory(make_workload)`` for a function that returns a Workload. A
            factory with ``check_batch_sizes(sizes)`` (:class:`~batchlab.sweeps.RampFactory`) is asked to refuse
            the batch sizes it cannot start from, before the sweep directory is written.
        batch_sizes: samples per optimizer step, e.g. ``[16, 64, 256]``, or ``"auto"``: powers of two from 8
            up to the largest batch that fits (:func:`auto_batch_sizes`).
        lr: the learning rate tuned at ``base_batch`` (default: the smallest batch size).
        rule: how the LR follows the batch (:func:`batchlab.advice.scaling.scale_lr`): "sqrt" (Adam-type), "linear"
            (SGD) or "none". ("adascale" needs a noise scale before the sweep has one and is refused.)
        budget: per run -- an int (optimizer steps), "500 steps", "20000 samples", "90s", or a :class:`Budget`.
        target: validation loss to reach (``0.3``), or "accuracy>=0.95"; records steps/samples/seconds to it.
        seeds: how many seeds (0..n-1) or a list; lr_multipliers: an LR grid per batch size, e.g. (0.5, 1, 2).
        eval_every: evaluate every n steps (default: budget/50, plus dense early evaluations).
        stop_at_target: end each run when it reaches the target (saves time in steps-to-target sweeps).
        name, directory: the sweep lives in ``directory/sweeps/name``; the default name resumes the same sweep.
        tracking_uri: None -- MLflow in ``directory/mlflow.db`` (skipped with one log line if MLflow is not
            installed); a URI -- that tracking server or store; False -- no tracking.
        backend: "local" or "ray" (Ray Tune trials; ``ray_address`` for an existing cluster).
        report: write the HTML/PNG report into the sweep directory (needs matplotlib) and log it to MLflow.
        on_event: called with a :class:`SweepEvent` for progress displays.

    Raises ``ValueError`` for bad arguments (before any training) or for a sweep directory that holds a
    different sweep under the same name; errors from the user's model propagate unchanged.
    """
    lr = checks.number("lr", lr)
    checks.choice("rule", rule, [r for r in RULES if r != "adascale"])
    checks.integer("base_batch", base_batch, none=True)
    checks.choice("backend", backend, ("local", "ray"))
    checks.number("ray_cpus_per_trial", ray_cpus_per_trial)
    if backend == "ray" and ray_address is None and ray_cpus_per_trial > (os.cpu_count() or 1):
        raise ValueError(
            f"ray_cpus_per_trial={ray_cpus_per_trial:g} is more than this machine's {os.cpu_count()} CPUs, "
            "all that a local Ray has: no trial could ever start"
        )
    multipliers = _distinct("lr_multipliers", lr_multipliers, checks.number, "distinct numbers > 0")
    checks.integer("eval_every", eval_every, none=True)
    checks.flag("stop_at_target", stop_at_target)
    checks.flag("report", report)
    if not callable(workload_factory):
        raise TypeError(
            f"workload_factory must be callable as factory(batch_size, lr, seed), got {workload_factory!r}"
        )
    spec = _check_batch_sizes(batch_sizes)
    budget_ = Budget.parse(budget)
    target_ = Target.parse(target)
    seed_list = _check_seeds(seeds)
    workload, options = _workload_identity(workload_factory)

    config = SweepConfig(
        name="",
        workload=workload,
        workload_options=options,
        batch_sizes_spec=spec,
        batch_sizes=[] if spec == "auto" else list(spec),
        lr=float(lr),
        base_batch=base_batch,
        rule=rule,
        lr_multipliers=multipliers,
        seeds=seed_list,
        budget=budget_,
        target=target_,
        eval_every=eval_every,
        stop_at_target=stop_at_target,
        dataset_size=getattr(workload_factory, "dataset_size", None),
    )
    digest = fingerprint(config)
    name = name or f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', workload)}-{digest[:8]}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"sweep name {name!r} may hold only letters, digits, '.', '_' and '-'")
    root = Path(directory).resolve()
    store = SweepStore(root / "sweeps" / name)
    stored, meta = store.read_config()
    if stored is not None:
        if stored.fingerprint != digest:
            raise ValueError(
                f"{store.path} holds a different sweep named {name!r} (its configuration differs); "
                "pass another name=, or delete that directory to start over"
            )
        config = stored
        log.info("resuming sweep %s from %s", name, store.path)
    else:
        sizes = auto_batch_sizes(workload_factory, lr) if spec == "auto" else list(spec)
        check_starts = getattr(workload_factory, "check_batch_sizes", None)
        if callable(check_starts):  # a RampFactory refuses a start above its maximum before any run trains
            check_starts(sizes)
        _check_host_room(workload_factory, max(sizes), config.lr_for(max(sizes)))
        config = replace(config, name=name, batch_sizes=sizes, fingerprint=digest)
        store.write_config(config)

    tracker = None
    if tracking_uri is not False:
        if tracking_uri is None and not mlflow_available():
            log.warning("MLflow is not installed: this sweep is not tracked (pip install 'batchlab[track]')")
        else:
            uri = tracking_uri or default_tracking_uri(root)
            tracker = SweepTracker.open(uri, config, parent_run_id=meta.get("parent_run_id"))
            meta = {
                "tracking_uri": uri,
                "experiment_id": tracker.experiment_id,
                "parent_run_id": tracker.parent_run_id,
            }
            store.write_config(config, meta)

    specs = config.specs()
    finished = store.finished()
    if tracker is not None:
        for run in tracker.reconcile(finished).values():  # finished in MLflow, lost from the directory
            store.save(run)
            finished[run.key] = run
        for key, run in list(finished.items()):
            if not tracker.has_run(run.mlflow_run_id):  # finished while tracking was off, or elsewhere
                finished[key] = replace(run, mlflow_run_id=tracker.log_run(run))
                store.save(finished[key])

    total = len(specs)
    emit = on_event or (lambda event: None)
    pending = []
    for index, s in enumerate(specs):
        if s.key in finished:
            emit(SweepEvent(EventKind.SKIP, s.key, index, total, run=finished[s.key]))
        else:
            pending.append((index, s))

    def persist(run: SweepRun) -> SweepRun:
        if tracker is not None:
            run = replace(run, mlflow_run_id=tracker.log_run(run))
        store.save(run)
        finished[run.key] = run
        return run

    if backend == "local":
        for index, s in pending:
            emit(SweepEvent(EventKind.START, s.key, index, total))
            run = execute_run(
                workload_factory,
                s,
                config,
                on_step=lambda step, most, key=s.key, i=index: emit(
                    SweepEvent(EventKind.STEP, key, i, total, step, most)
                ),
            )
            emit(SweepEvent(EventKind.DONE, s.key, index, total, run.steps, run.steps, persist(run)))
    elif pending:
        run_trials(
            workload_factory,
            pending,
            config,
            total=total,
            persist=persist,
            emit=emit,
            storage=store.path / "ray",
            address=ray_address,
            cpus_per_trial=ray_cpus_per_trial,
        )

    result = SweepResult(
        config,
        [finished[s.key] for s in specs if s.key in finished],
        store.path,
        meta.get("tracking_uri"),
        meta.get("experiment_id"),
        meta.get("parent_run_id"),
    )
    files: list[Path] = []
    if report:
        try:
            written = write_report(result, store.path / "report")
            result.report = written.html
            files = [written.html, *written.images]
        except ImportError as exc:
            log.warning("no report: %s", exc)
    if tracker is not None:
        tracker.finish_sweep(result, files + [store.path / SweepStore.CONFIG])
    return result
