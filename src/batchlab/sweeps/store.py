"""A sweep directory on disk: its configuration and one JSON file per finished run, each written atomically.

``<directory>/sweeps/<name>/`` holds ``sweep.json`` (the configuration and the MLflow ids) and
``runs/<key>.json`` for every run that has *finished*. Each file is written to a temporary file, fsynced and
renamed over the old one, so a reader -- a resumed sweep after a Ctrl-C or a SIGKILL -- sees the old file or
the whole new one, never a part: a killed sweep loses only the run that was in progress.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchlab.sweeps.records import SweepConfig, SweepRun

__all__ = ["DEFAULT_DIRECTORY", "SweepStore", "atomic_write"]

DEFAULT_DIRECTORY = "batchlab-runs"  # under the working directory: mlflow.db, artifacts/, sweeps/<name>/


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SweepStore:
    """A sweep directory: ``sweep.json`` and one ``runs/<key>.json`` per finished run (atomic writes)."""

    CONFIG = "sweep.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read_config(self) -> tuple[SweepConfig | None, dict[str, Any]]:
        """(config, tracking metadata), or (None, {}) for a new directory."""
        file = self.path / self.CONFIG
        if not file.exists():
            return None, {}
        data = json.loads(file.read_text(encoding="utf-8"))
        return SweepConfig.from_dict(data["config"]), data.get("tracking", {})

    def write_config(self, config: SweepConfig, tracking: Mapping[str, Any] | None = None) -> None:
        """Write ``sweep.json``: the configuration and the MLflow ids (experiment, parent run)."""
        payload = {"config": config.to_dict(), "tracking": dict(tracking or {})}
        atomic_write(self.path / self.CONFIG, json.dumps(payload, indent=2, sort_keys=True))

    def finished(self) -> dict[str, SweepRun]:
        """key -> run for every run whose JSON is complete."""
        runs = {}
        for file in sorted((self.path / "runs").glob("*.json")):
            run = SweepRun.from_dict(json.loads(file.read_text(encoding="utf-8")))
            runs[run.key] = run
        return runs

    def save(self, run: SweepRun) -> Path:
        """Write one finished run's record; return its path."""
        path = self.path / "runs" / f"{run.key}.json"
        atomic_write(path, json.dumps(run.to_dict()))
        return path
