"""What produced a benchmark's numbers: the packages, the pins they should match, the source and the machine.

One record for every benchmark's result JSON, so that a number that moves between two runs can be traced to a
changed venv or a changed file. It was written after digits' B_noise moved by up to 0.7% with the code unchanged:
the venv had been rebuilt from unpinned requirements (RESULTS.md, 2026-12-05), and nothing recorded what changed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"  # written by `make lock`, read by `make install`
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)$")


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Python's version, torch's with its build (``2.14.1+cu130``: the wheel's metadata drops the build tag),
    and the installed version of each of ``names`` (None: not installed)."""
    import torch  # here, not at the top: the module stays importable for a look at the pins without torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    out.update({name: _installed(name) for name in names if name != "torch"})
    return out


def pin_drift(constraints: Path = CONSTRAINTS) -> list[str]:
    """Each pin of ``constraints`` the running venv does not match, as ``"numpy 2.4.7 (pinned 2.4.6)"`` or
    ``"mlflow absent (pinned 3.17.2)"``: empty when the venv is the locked one."""
    drift = []
    for line in constraints.read_text().splitlines():
        match = PIN.match(line.strip())
        if match is None:
            continue
        name, pinned = match.groups()
        installed = _installed(name)
        if installed != pinned:
            drift.append(f"{name} {installed or 'absent'} (pinned {pinned})")
    return drift


def source_state(*files: str) -> dict[str, Any]:
    """The commit, whether src/ differs from it, and the sha1 of each of ``files`` (paths from the repository
    root, a missing one named as such rather than skipped): exactly what was measured."""
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 10}
        state["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        state["src_changed"] = bool(
            subprocess.run(["git", "status", "--porcelain", "src"], **run).stdout.strip()
        )
    for name in files:
        path = REPO / name
        state[f"{name} sha1"] = (
            hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"
        )
    return state


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess (often just the architecture)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Date, host, CPU model and count, the command line and the load average as the run starts."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "command": " ".join(sys.argv),
        "load_average_at_start": os.getloadavg(),
    }


def load_average() -> str:
    """The machine's 1-, 5- and 15-minute load averages now, as "1.6, 1.1, 0.8": read as a run starts, it says how
    shared the machine was while the numbers were taken."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_line(device: str = "cpu") -> str:
    """The machine in one line, for a RESULTS.md section's "Machine:": the CPU and its count, the card where
    ``device`` is CUDA ("no GPU used" on the CPU), torch without its build tag, Python and torch's thread count now.
    Read, not typed: the benchmarks' hand-written "2-core shared CPU, no GPU" would be wrong on a lent card."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA card on this machine")
        card = torch.cuda.get_device_name(torch.device(device))
    else:
        card = "no GPU used" if device == "cpu" else f"device {device}"
    threads = torch.get_num_threads()
    return (
        f"{cpu_model()}, {os.cpu_count()} CPUs, {card}, torch {torch.__version__.split('+')[0]}, "
        f"Python {platform.python_version()}, {threads} torch thread{'' if threads == 1 else 's'}"
    )


def provenance(packages: tuple[str, ...], files: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole record: :func:`machine`, ``versions`` (:func:`package_versions`), ``pin_drift`` and
    ``source`` (:func:`source_state`)."""
    return machine() | {
        "versions": package_versions(packages),
        "pin_drift": pin_drift(),
        "source": source_state(*files),
    }
