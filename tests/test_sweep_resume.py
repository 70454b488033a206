"""A sweep killed mid-run (SIGKILL, no chance to clean up) resumes: finished runs are neither redone nor doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from batchlab.sweeps import sweep
from batchlab.workloads.tasks import load_task
from sweep_helpers import OFFLINE_ENV, fresh_store

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from batchlab.sweeps import sweep
    from batchlab.workloads.tasks import load_task

    torch.set_num_threads(1)
    root, uri = sys.argv[1], sys.argv[2]

    def show(event):
        if event.kind != "step" or event.step == 5:  # one line mid-run: the test kills the process there
            print(event.kind, event.key, flush=True)

    sweep(load_task("teacher-student"), [16, 64, 256], lr=1e-3, budget=120, name="killed", directory=root,
          tracking_uri=uri, report=False, on_event=show)
    """
)


def _start(script: Path, root: Path, uri: str) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(root), uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    root = tmp_path / "runs"
    uri = fresh_store(root)
    from mlflow import MlflowClient

    script = tmp_path / "run_sweep.py"
    script.write_text(SCRIPT)

    first = _start(script, root, uri)
    seen = []
    for line in first.stdout:  # wait until the first run is stored and the second is 5 steps in
        seen.append(line.split())
        if seen[-1][:2] == ["step", "b64-lr1x-s0"]:
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert ["done", "b16-lr1x-s0"] in seen
    runs_dir = root / "sweeps" / "killed" / "runs"
    assert sorted(p.name for p in runs_dir.glob("*.json")) == ["b16-lr1x-s0.json"]
    assert not list(runs_dir.glob(".*.tmp"))  # atomic writes leave no partial file behind
    finished_bytes = (runs_dir / "b16-lr1x-s0.json").read_bytes()
    torch.set_num_threads(1)

    events = []  # the restart runs in this process (one interpreter start less)
    sweep(
        load_task("teacher-student"),
        [16, 64, 256],
        lr=1e-3,
        budget=120,
        name="killed",
        directory=root,
        tracking_uri=uri,
        report=False,
        on_event=lambda e: e.kind != "step" and events.append((e.kind, e.key)),
    )
    assert events == [
        ("skip", "b16-lr1x-s0"),
        ("start", "b64-lr1x-s0"),
        ("done", "b64-lr1x-s0"),
        ("start", "b256-lr1x-s0"),
        ("done", "b256-lr1x-s0"),
    ]
    assert (runs_dir / "b16-lr1x-s0.json").read_bytes() == finished_bytes  # untouched
    assert sorted(p.name for p in runs_dir.glob("*.json")) == [
        "b16-lr1x-s0.json",
        "b256-lr1x-s0.json",
        "b64-lr1x-s0.json",
    ]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("killed")
    active = client.search_runs([experiment.experiment_id], filter_string="tags.`batchlab.kind` = 'run'")
    keys = sorted(r.data.tags["batchlab.run_key"] for r in active)
    assert keys == ["b16-lr1x-s0", "b256-lr1x-s0", "b64-lr1x-s0"]  # one MLflow run per key, no duplicate
    assert all(r.info.status == "FINISHED" for r in active)
