"""What of the GPU check runs without a GPU: the script parses, the models are the published sizes, and the
profile table script runs the same models at a tiny scale. The whole script's CPU dry run
(``bash benchmarks/gpu_check.sh --dry-run``, ~40 s: four interpreter starts) is left to be run by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchlab.workload.checkpointing import plan_checkpointing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import gpu_models  # noqa: E402
import profile_builtin  # noqa: E402


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.parametrize(
    ("build", "millions", "blocks"),
    [
        (lambda: gpu_models.ResNet(), 25.56, "repeated blocks: 16 x Bottleneck"),
        (lambda: gpu_models.ViT(), 86.57, "repeated blocks: 12 x Block"),
        (lambda: gpu_models.GPT(), 124.44, "repeated blocks: 12 x Block"),
    ],
)
def test_gpu_models_have_the_published_sizes(build, millions, blocks):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    assert plan_checkpointing(model).describe() == blocks


def test_profile_table_script_on_tiny_models(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = profile_builtin.main(
            ["--gpu-models", "resnet50,vit-b,gpt2-small", "--scale", "tiny", "--device", "cpu",
             "--precision", "fp32,bf16", "--memory-budget", "4GiB", "--max-batch-size", "4",
             "--seconds-per-point", "0", "--out", str(tmp_path)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = (tmp_path / "profile.md").read_text()
    for name in ("resnet50-tiny", "vit-b-tiny", "gpt2-small-tiny"):
        assert f"| {name} | fp32 |" in report and f"| {name} | bf16 |" in report
        assert (tmp_path / f"{name}.json").is_file()
        assert (tmp_path / "plots" / f"{name}-throughput.png").is_file()
    assert "Command: `python benchmarks/profile_builtin.py --gpu-models" in report


def test_cuda_checks_dry_run_on_the_cpu_passes_and_writes_its_tables(tmp_path):
    # In its own process, as gpu_check.sh runs it: on the CPU check 2 reads the process's resident memory,
    # which depends on what the process ran before. Late in CI's suite it read 508 KiB once (2026-12-07); in a
    # fresh process it reads 0 B, also after a profile in that process (tried).
    script = ROOT / "benchmarks" / "cuda_checks.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "cuda_checks.md").read_text()
    assert (
        text.count("**pass**") == 4
        and "| fused | 1.000000 |" in text
        and "fp16 | " in text
        and "release_after_oom | 0 B" in text
    )
