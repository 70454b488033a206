"""The CPU search never gets its own process killed (issue 10 item 2): container limits read as the kernel
applies them, and the hard limit compared with what a probe really occupies -- batchlab's state copy included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

import batchlab
from batchlab.devices import CPUDevice
from batchlab.devices.cpu import CgroupLevel, cgroup_levels

MiB = 2**20


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_v1_nested_limits_the_smallest_room_wins_and_others_usage_counts(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu:/\n4:memory:/outer/inner\n0::/\n")
    root = tmp_path / "sys"
    _write(
        root / "memory", {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "1\n"}
    )
    _write(root / "memory/outer", {"memory.limit_in_bytes": f"{3000 * MiB}\n", "memory.usage_in_bytes": f"{2000 * MiB}\n",
                                   "memory.stat": f"cache 1\ntotal_inactive_file {300 * MiB}\n"})  # fmt: skip
    _write(root / "memory/outer/inner", {"memory.limit_in_bytes": f"{2300 * MiB}\n", "memory.usage_in_bytes": f"{600 * MiB}\n",
                                         "memory.stat": "total_inactive_file 0\n"})  # fmt: skip
    levels = cgroup_levels(proc, root)
    assert [(level.path.name, level.limit // MiB) for level in levels] == [("inner", 2300), ("outer", 3000)]
    rss = 500 * MiB
    # inner: 2300 - (600 - 0 - 500) = 2200; outer: 3000 - (2000 - 300 - 500) = 1800 -> the outer one binds.
    assert [level.room_for(rss) // MiB for level in levels] == [2200, 1800]


def test_cgroup_v2_reads_memory_max_current_and_inactive_file_and_skips_unlimited_levels(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    root = tmp_path / "sys"
    _write(root, {"memory.stat": "inactive_file 0\n"})  # the root has no memory.max
    _write(root / "job", {"memory.max": "max\n", "memory.current": f"{900 * MiB}\n"})
    _write(root / "job/step", {"memory.max": f"{1024 * MiB}\n", "memory.current": f"{800 * MiB}\n",
                               "memory.stat": f"anon 1\ninactive_file {100 * MiB}\n"})  # fmt: skip
    (level,) = cgroup_levels(proc, root)
    assert level == CgroupLevel(root / "job/step", 1024 * MiB, 800 * MiB, 100 * MiB)
    assert level.room_for(rss=600 * MiB) == 1024 * MiB - 100 * MiB  # others hold 800 - 100 - 600


def test_a_namespaced_container_sees_its_limit_at_the_mount_root(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/abc\n")  # a path from the host's view, absent inside the container
    root = tmp_path / "sys"
    _write(root, {"memory.max": f"{2048 * MiB}\n", "memory.current": f"{100 * MiB}\n"})
    assert [level.limit for level in cgroup_levels(proc, root)] == [2048 * MiB]


class _ScriptedLimit(CPUDevice):
    """A real CPU device whose hard limit (RAM or container) is a given total; records every raw reading."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.raw = limit, []

    def capacity_bytes(self) -> int:
        return self.limit

    def hard_limit_bytes(self) -> int:
        return self.limit

    def run(self, step, batch_size, steps=2):
        measurement = super().run(step, batch_size, steps)
        self.raw.append(measurement)
        return measurement


def test_no_probe_occupies_more_than_the_hard_limit_once_the_state_copy_is_counted():
    # A budget above the real room (as a user may pass for a container) leaves the hard limit to stop the
    # search. Readings are net of the 64 MiB state copy, the limit is not: before the fix a probe ran 65 MiB
    # over it -- on a real container limit, the kernel's kill.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(65536, 256), nn.Linear(256, 256))
    workload = batchlab.Workload(model, lambda b: (torch.randint(0, 65536, (b, 256)), torch.zeros(b, 256, 256)),
                                 nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1))  # fmt: skip
    device = _ScriptedLimit(psutil.Process().memory_info().rss + 700 * MiB)
    result = batchlab.find_batch_size(
        workload, device=device, memory_budget=2 * device.limit, state_copy="memory"
    )
    assert result.limited_by == "hard limit" and result.state_copy_bytes >= 64 * MiB
    assert max(m.peak_bytes for m in device.raw) <= device.limit
    assert any("state_copy='disk' frees that room" in note for note in result.notes)


_BIG_STATE = textwrap.dedent(
    """
    import torch
    from torch import nn

    import batchlab


    class EmbeddingMixer(nn.Module):
        # 96 MiB of parameters, cheap compute: state (parameters, gradients, Adam's moments) dominates.
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(98304, 256)
            self.mix = nn.Linear(256, 256)

        def forward(self, tokens):
            return torch.tanh(self.mix(self.embedding(tokens))).mean(dim=(1, 2))


    def make_workload():
        torch.manual_seed(0)
        model = EmbeddingMixer()
        return batchlab.Workload(model, lambda b: (torch.randint(0, 98304, (b, 256)), torch.zeros(b)),
                                 torch.nn.functional.mse_loss, torch.optim.Adam(model.parameters()))
    """
)
LIMIT = 1536 * MiB


def _child_cgroup(tmp_name: str) -> tuple[Path, str]:
    """A new memory cgroup under this process's own, limited to LIMIT; skips where the machine forbids it."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder, limit_file, version = (
                Path("/sys/fs/cgroup/memory") / path.lstrip("/"),
                "memory.limit_in_bytes",
                "v1",
            )
            break
    else:
        folder, limit_file, version = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "v2"
    child = folder / tmp_name
    try:
        child.mkdir()
        (child / limit_file).write_text(str(LIMIT))
    except OSError as exc:
        if child.exists():
            child.rmdir()
        pytest.skip(f"cannot create a memory cgroup with a limit here ({version}, {folder}): {exc}")
    return child, version


def _oom_kills(child: Path, version: str) -> int:
    text = (child / ("memory.oom_control" if version == "v1" else "memory.events")).read_text()
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux")
def test_fit_without_a_budget_inside_a_real_container_limit_is_never_killed(tmp_path):
    spec = tmp_path / "big_state.py"
    spec.write_text(_BIG_STATE)
    child, version = _child_cgroup(f"batchlab-test-{os.getpid()}")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "batchlab", "fit", "--workload", f"{spec}:make_workload", "--device", "cpu", "--json"],
            capture_output=True, text=True, timeout=600,
            preexec_fn=lambda: (child / "cgroup.procs").write_text(str(os.getpid())),
        )  # fmt: skip
        kills = _oom_kills(child, version)
    finally:
        child.rmdir()
    assert run.returncode == 0 and kills == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    state = 96 * MiB + 2 * 96 * MiB  # parameters + Adam's moments: >= 20% of the budget, as the issue asks
    assert result["capacity_bytes"] <= LIMIT and state >= 0.2 * result["budget_bytes"]
    assert result["fits"] and result["peak_bytes"] <= result["budget_bytes"]
    # The guard leaves the state created once out of its per-sample bound: it climbs to the budget instead of
    # stopping at batch 2 (where the step's 290 MiB of new state would count as 145 MiB per sample).
    assert result["batch_size"] >= 100 and result["limited_by"] == "memory"
    assert result["state_copy_storage"] == "disk"  # in RAM it would take room the probes need
