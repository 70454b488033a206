"""Shared test helpers: tiny real workloads that run in milliseconds on the CPU."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from batchlab import Workload
from batchlab.advice import pipeline


def tiny_bn_workload(seed: int = 0) -> Workload:
    """A BatchNorm + Adam model: buffers, optimizer state and RNG all change in a step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    return Workload(
        model,
        lambda b: (torch.randn(b, 8), torch.randint(0, 3, (b,))),
        nn.functional.cross_entropy,
        lambda params: torch.optim.Adam(params, lr=1e-2),
        name="tiny-bn",
    )


def workload_state(workload: Workload) -> dict:
    """Everything a training step can change, copied: parameters, buffers, grads, optimizer, RNGs, modes (for a
    bitwise comparison with :func:`assert_same_state`: probing must leave the user's state as it was)."""
    return {
        "model": {k: v.clone() for k, v in workload.model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in workload.model.parameters()],
        "opt": {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in workload.optimizer.state_dict()["state"].items()
        },
        "groups": [
            {k: v for k, v in g.items() if k != "params"}
            for g in workload.optimizer.state_dict()["param_groups"]
        ],
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
        "training": [m.training for m in workload.model.modules()],
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # bitwise, BatchNorm buffers included
    for ga, gb in zip(a["grads"], b["grads"]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a["opt"].keys() == b["opt"].keys()
    for i in a["opt"]:
        for k, v in a["opt"][i].items():
            assert torch.equal(v, b["opt"][i][k]) if torch.is_tensor(v) else v == b["opt"][i][k]
    assert a["groups"] == b["groups"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["py_rng"] == b["py_rng"] and np.array_equal(a["np_rng"], b["np_rng"])
    assert a["training"] == b["training"]


@pytest.fixture
def bn_workload() -> Workload:
    return tiny_bn_workload()


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny models: on a shared 2-core machine more threads only oversubscribe
    it (a tiny step is ~20x faster on one). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_a_fresh_process(code: str, timeout: float = 300) -> object:
    """Run ``code`` (Python source; ``sys.argv[1]`` is this folder, for importing test helpers) in a fresh
    interpreter and return the JSON of its last line of output.

    For checks of real CPU memory: a process that has run other tests holds a heap and oneDNN caches that
    creep up per probe, so a shape searched late gets less room than one searched early (27 against 30 for
    a smaller image, in one order of the tests), and one epoch's batches filled 84% of the token budget after
    tests/test_shapes.py and tests/test_search.py (97% in a fresh process). The fresh process is what these checks are about: a user's run.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], check=True,
                         capture_output=True, text=True, timeout=timeout).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


UNDEFINED = "|G|² EMA is -0.0123 <= 0: gradient noise dominates the signal at these batch sizes"


def undefined_noise_scale(monkeypatch) -> None:
    """The real measurement, its B_simple then made undefined as late in training (|G|² estimated <= 0): the
    one scripted input; fit, timing and noise steps all run."""
    real = pipeline.measure_noise_scale

    def measured(*args, **kwargs):
        return replace(real(*args, **kwargs), b_simple=None, b_simple_stderr=None, note=UNDEFINED)

    monkeypatch.setattr(pipeline, "measure_noise_scale", measured)
