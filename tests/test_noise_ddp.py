"""DDPCollector: a real 2-process gloo run agrees with the single-process AccumulationCollector."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import batchlab.noise
from batchlab.noise import AccumulationCollector, GradientNoiseScale

WORKER_PATH = Path(__file__).with_name("noise_ddp_worker.py")
spec = importlib.util.spec_from_file_location("noise_ddp_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path) -> list[dict]:
    src = str(Path(batchlab.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",  # two processes on a small machine
    }
    procs, logs = [], []
    for rank in range(worker.WORLD):
        log = open(out / f"rank{rank}.log", "w")  # closed in the finally below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER_PATH), str(rank), str(out)], env=env, stdout=log, stderr=log
            )
        )
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    results = []
    for rank in range(worker.WORLD):
        path = out / f"rank{rank}.json"
        if not path.exists():  # a crash before the results were written is a failure; a teardown abort is not
            pytest.fail(
                f"rank {rank} wrote no results (exit codes {codes}):\n{(out / f'rank{rank}.log').read_text()}"
            )
        results.append(json.loads(path.read_text()))
    return results


def _reference() -> tuple[list, dict]:
    """Single process: each step's global batch as WORLD micro-batches, loss divided by WORLD, same SGD."""
    model, x, y = worker.make_problem()
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    gns = AccumulationCollector(model.parameters(), worker.LOCAL_BATCH, GradientNoiseScale(beta=worker.BETA))
    pairs = []
    for step in range(worker.STEPS):
        for rank in range(worker.WORLD):
            loss = F.mse_loss(model(worker.shard(x, step, rank)), worker.shard(y, step, rank))
            (loss / worker.WORLD).backward()
        pairs.append(gns.step().to_dict())
        opt.step()
        opt.zero_grad()
    return pairs, gns.result().to_dict()


def test_ddp_collector_agrees_with_accumulation_collector(tmp_path):
    """Tolerance: relative 1e-4 per step and on the estimate. Both sides compute the same sums in float32 in
    different orders (bucketed all-reduce vs accumulated .grad), which differ at ~1e-7 relative; the
    GradScaler on the DDP side divides out exactly (power-of-two scale)."""
    ranks = _run_ranks(tmp_path)
    ref_pairs, ref_estimate = _reference()
    assert max(ranks[0]["buckets"]) > 1  # the per-step sum over buckets is exercised
    for result in ranks:  # both ranks report the same numbers: the local norms are averaged over ranks
        for got, want in zip(result["pairs"], ref_pairs, strict=True):
            assert (got["b_small"], got["b_big"]) == (want["b_small"], want["b_big"]) == (8, 16)
            assert got["accepted"]
            assert got["sq_norm_small"] == pytest.approx(want["sq_norm_small"], rel=1e-4)
            assert got["sq_norm_big"] == pytest.approx(want["sq_norm_big"], rel=1e-4)
        est = result["estimate"]
        for key in ("b_simple", "g2", "trace_sigma", "b_simple_stderr"):
            assert est[key] == pytest.approx(ref_estimate[key], rel=1e-4), key
        assert (est["updates"], est["samples"]) == (worker.STEPS, worker.STEPS * 16)
