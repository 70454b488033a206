"""benchmarks/provenance.py: what a benchmark records of the packages, the pins and the source behind its numbers,
and constraints.txt (the lock `make install` reads) against the venv the tests run in."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import provenance  # noqa: E402


def test_pin_drift_names_each_pin_the_venv_does_not_match(tmp_path):
    numpy = importlib.metadata.version("numpy")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        f"# a comment\nnumpy=={numpy}\nscipy==0.0.1\nno-such-package-batchlab==1.0\n\nrich>=13\n"
    )
    scipy = importlib.metadata.version("scipy")
    assert provenance.pin_drift(constraints) == [
        f"scipy {scipy} (pinned 0.0.1)",
        "no-such-package-batchlab absent (pinned 1.0)",
    ]  # the matching pin, the comment, the blank line and the range are not drift


def test_the_venv_is_the_locked_one():
    """make install passes constraints.txt to pip: every pin holds, and torch's own packages are left to
    TORCH_SPEC (a GPU user's CUDA torch must not be replaced by the lock)."""
    assert provenance.pin_drift() == []
    pins = [line.split("==")[0].lower() for line in provenance.CONSTRAINTS.read_text().splitlines()[1:]]
    assert len(pins) > 50 and "numpy" in pins and "scikit-learn" in pins
    assert not [
        p for p in pins if p in ("torch", "torchvision", "triton") or p.startswith(("nvidia-", "cuda-"))
    ]


def test_package_versions_keeps_the_torch_build_and_marks_an_absent_package():
    import torch

    versions = provenance.package_versions(("numpy", "no-such-package-batchlab"))
    assert versions["torch"] == torch.__version__ and versions["python"].count(".") == 2
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert versions["no-such-package-batchlab"] is None


def test_source_state_hashes_the_named_files_and_names_a_missing_one():
    state = provenance.source_state("pyproject.toml", "src/batchlab/no_such_module.py")
    assert len(state["commit"]) == 40 and isinstance(state["src_changed"], bool)
    assert len(state["pyproject.toml sha1"]) == 12
    assert state["src/batchlab/no_such_module.py sha1"] == "missing"


def test_machine_line_reads_the_machine_and_names_the_card_only_for_cuda(monkeypatch):
    import os
    import platform

    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    line = provenance.machine_line()
    assert line == (
        f"{provenance.cpu_model()}, {os.cpu_count()} CPUs, no GPU used, torch {torch.__version__.split('+')[0]}, "
        f"Python {platform.python_version()}, 1 torch thread"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:0': torch sees no CUDA card on this machine"):
        provenance.machine_line("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: asked.append(device) or "NVIDIA H200")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert ", NVIDIA H200, " in provenance.machine_line("cuda:0") and asked == [torch.device("cuda:0")]
    assert provenance.machine_line("cuda:0").endswith(", 4 torch threads")
    assert ", device mps, " in provenance.machine_line("mps")


def test_load_average_gives_the_three_averages_to_one_decimal(monkeypatch):
    monkeypatch.setattr(provenance.os, "getloadavg", lambda: (1.64, 1.05, 0.849))
    assert provenance.load_average() == "1.6, 1.1, 0.8"
