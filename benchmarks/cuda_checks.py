"""Correctness on a real card (issue 10 item 10, issue 13 item 1): the CUDA paths the CPU tests can only script.

Usage (phase 2 of benchmarks/gpu_check.sh; ``--device cpu`` is its dry run, to check the script here):

    python benchmarks/cuda_checks.py --device cuda --out $OUT        # ~1 minute on an H200
    python benchmarks/cuda_checks.py --device cpu --out /tmp/checks  # the same code on the CPU, small sizes

1. **fp16 counts the optimizer state whatever the GradScaler decides**: the issue's MLP (512-4096-4096-512,
   targets x1000 so the scaled fp16 gradients overflow at the starting scale) checked at batch 64 in fp32 and
   in fp16; ``memory_breakdown.optimizer_state`` must match and the fp16 run must report the
   GradScaler's skips. On a card the first fp16 steps commonly skip this way.
2. **A failed backward's graph is released**: a model whose second branch raises an out-of-memory error in
   backward, after the first branch's backward has started; the bytes still allocated after
   ``gc.collect()`` alone are compared with those after batchlab's release path
   (``batchlab.devices.release.release_after_oom``; pytorch/pytorch#82218).
3. **The fake device against the allocator**: ``FakeDevice(...).estimate(b).allocated_bytes`` -- tensors in
   512-byte blocks plus torch's cuBLAS workspace -- against ``torch.cuda.max_memory_allocated`` over the
   same two steps, for the built-in cnn and gpt workloads at three batch sizes each.
4. **A batch change keeps Adam's bias-corrected moments** in the foreach, fused and capturable kernels
   (``carry_over``; the CPU dry run has no capturable kernel).

Writes ``cuda_checks.md`` (a table per check) and ``cuda_checks.json`` under ``--out``; exits 1 when a
check fails, so the calling script logs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import batchlab
from batchlab.devices import CPUDevice, CUDADevice
from batchlab.devices.release import release_after_oom
from batchlab.planning import FakeDevice
from batchlab.units import format_bytes
from batchlab.workloads import load_workload

FAKE_TOLERANCE = 0.10  # the plan's stated accuracy on allocated bytes (README, benchmarks/RESULTS.md)


def _mlp_workload(device: torch.device, amp: str | None, width: int) -> batchlab.Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 512)
    ).to(device)
    return batchlab.Workload(
        model,
        lambda b: (torch.randn(b, 512) * 10, torch.randn(b, 512) * 1000),
        nn.functional.mse_loss,
        torch.optim.Adam(model.parameters()),
        amp=amp,
    )


def check_fp16_state(device: torch.device, width: int) -> dict:
    """Check 1: the same optimizer state counted in fp32 and fp16."""
    rows = {}
    for amp in (None, "fp16"):
        result = batchlab.find_batch_size(_mlp_workload(device, amp, width), device=str(device), batch=64)
        rows[amp or "fp32"] = {
            "optimizer_state_created": result.memory_breakdown.optimizer_state,
            "skipped_optimizer_steps": result.skipped_optimizer_steps,
            "peak_bytes": result.peak_bytes,
        }
    same = rows["fp16"]["optimizer_state_created"] == rows["fp32"]["optimizer_state_created"] > 0
    return {"rows": rows, "ok": same}


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. (injected in backward by benchmarks/cuda_checks.py)"
        )


def _allocated(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return CPUDevice().in_use_bytes()


def check_failed_backward(device: torch.device, batch: int) -> dict:
    """Check 2: what a failed backward leaves allocated, with gc alone and with batchlab's release path."""
    torch.manual_seed(0)
    weight = torch.randn(1024, 1024, device=device, requires_grad=True)

    def failing_step() -> None:
        h = torch.randn(batch, 1024, device=device) @ weight
        for _ in range(8):
            h = torch.tanh(h @ weight)  # saved activations: what the failed graph keeps
        (torch.tanh(h @ weight) + _FailInBackward.apply(h)).sum().backward()

    held = {}
    for how in ("gc only", "release_after_oom"):
        release_after_oom(device)  # start clean
        start = _allocated(device)
        try:
            failing_step()
        except torch.OutOfMemoryError:
            pass
        # outside the except block, as the release path's contract says
        weight.grad = None
        if how == "gc only":
            gc.collect()
        else:
            release_after_oom(device)
        held[how] = _allocated(device) - start
        release_after_oom(device)  # the next try starts clean either way
    return {"held_bytes": held, "ok": held["release_after_oom"] < max(held["gc only"] // 4, 1 << 20)}


def check_fake_estimate(device: torch.device, sizes: dict[str, list[int]]) -> dict:
    """Check 3: the fake device's allocated bytes against max_memory_allocated (CUDA) over two steps."""
    rows = []
    for name, batches in sizes.items():
        workload = load_workload(name, device=str(device))
        fake = FakeDevice(workload, device_type=device.type)
        snapshot = workload.snapshot()
        for batch in batches:
            estimate = fake.estimate(batch)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(2):
                    workload.step(batch)
                torch.cuda.synchronize(device)
                measured = torch.cuda.max_memory_allocated(device)
            else:  # the dry run: the CPU device's whole-process peak is not comparable; run the step only
                measured = None
                for _ in range(2):
                    workload.step(batch)
            snapshot.restore()
            ratio = estimate.allocated_bytes / measured if measured else None
            rows.append({"workload": name, "batch": batch, "fake_allocated": estimate.allocated_bytes,
                         "measured_allocated": measured, "ratio": ratio})  # fmt: skip
        snapshot.close()
    ok = all(row["ratio"] is None or abs(row["ratio"] - 1) <= FAKE_TOLERANCE for row in rows)
    return {"rows": rows, "ok": ok}


def check_carry_moments(device: torch.device) -> dict:
    """Check 4: a batch change on a live Adam keeps its bias-corrected moments in torch's device implementations.

    Under a constant gradient every Adam update is exactly lr; after ``carry_over`` 16 -> 128 at step 34 (beta2
    0.999 -> 0.992) the next one must still be (it was 2.44x lr before the moments were rescaled). On a card:
    the capturable (step counts on the device, a tensor LR) and fused kernels besides foreach."""
    from batchlab.training import carry_over

    variants = {"foreach": {"foreach": True}, "fused": {"fused": True}}
    if device.type == "cuda":
        variants["capturable, tensor lr"] = {"capturable": True, "lr": torch.tensor(1e-3, device=device)}
    rows = {}
    for name, options in variants.items():
        param = nn.Parameter(torch.zeros(4, device=device))
        opt = torch.optim.Adam([param], **{"lr": 1e-3, **options})
        grad = torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)
        for _ in range(34):
            param.grad = grad.clone()
            opt.step()
        carry_over(opt, 16, 128)
        before = param.detach().clone()
        param.grad = grad.clone()
        opt.step()
        rows[name] = float(((param.detach() - before).abs() / float(opt.param_groups[0]["lr"])).max())
    return {"rows": rows, "ok": all(abs(r - 1.0) < 1e-4 for r in rows.values())}


def _markdown(results: dict, device: torch.device) -> str:
    lines = [f"# CUDA correctness checks ({device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]  # fmt: skip
    fp16 = results["fp16_state"]
    lines += ["## 1. fp16 counts the optimizer state", "", "| precision | optimizer state created | skipped steps | peak |", "|---|---:|---:|---:|"]  # fmt: skip
    for precision, row in fp16["rows"].items():
        lines.append(f"| {precision} | {format_bytes(row['optimizer_state_created'])} | {row['skipped_optimizer_steps']} | {format_bytes(row['peak_bytes'])} |")  # fmt: skip
    lines += ["", f"**{'pass' if fp16['ok'] else 'FAIL'}**", ""]
    backward = results["failed_backward"]
    lines += ["## 2. A failed backward's graph", "", "| after the error | still allocated |", "|---|---:|"]
    for how, held in backward["held_bytes"].items():
        lines.append(f"| {how} | {format_bytes(held)} |")
    lines += ["", f"**{'pass' if backward['ok'] else 'FAIL'}**", ""]
    fake = results["fake_estimate"]
    lines += ["## 3. Fake estimate vs max_memory_allocated", "", "| workload | batch | fake | measured | fake / measured |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in fake["rows"]:
        measured = format_bytes(row["measured_allocated"]) if row["measured_allocated"] else "n/a (CPU)"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "n/a"
        lines.append(f"| {row['workload']} | {row['batch']} | {format_bytes(row['fake_allocated'])} | {measured} | {ratio} |")  # fmt: skip
    lines += ["", f"**{'pass' if fake['ok'] else 'FAIL'}** (tolerance ±{FAKE_TOLERANCE:.0%})", ""]
    carry = results["carry_moments"]
    lines += ["## 4. Adam's update after carry_over 16 -> 128 at step 34 (constant gradient)", "", "| implementation | update / lr |", "|---|---:|"]  # fmt: skip
    lines += [f"| {name} | {ratio:.6f} |" for name, ratio in carry["rows"].items()]
    lines += ["", f"**{'pass' if carry['ok'] else 'FAIL'}** (1 within 1e-4)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        CUDADevice(device)  # fails clearly without a card
    small = device.type == "cpu"  # the dry run checks the code, not the numbers
    results = {
        "fp16_state": check_fp16_state(device, width=512 if small else 4096),
        "failed_backward": check_failed_backward(device, batch=256 if small else 8192),
        "fake_estimate": check_fake_estimate(
            device, {"cnn": [2, 4], "gpt": [2]} if small else {"cnn": [32, 128, 512], "gpt": [8, 32, 64]}
        ),
        "carry_moments": check_carry_moments(device),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_checks.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "cuda_checks.md").write_text(_markdown(results, device))
    print(_markdown(results, device))
    return 0 if all(check["ok"] for check in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
