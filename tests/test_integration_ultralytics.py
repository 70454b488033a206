"""Ultralytics: YOLO("yolo26n.yaml") trains 1 epoch offline on synthetic data with batch=-1 on the CPU, at the
batch batchlab chose -- not AutoBatch's CPU fallback of 16 -- and a fixed batch=16 is checked against memory.

The run is examples/ultralytics_demo.py in a fresh process: Ultralytics reads its offline settings
(YOLO_OFFLINE, YOLO_CONFIG_DIR) once, at import, so they must be set before anything imports it. The
training set has 83 images and the budget 450 MiB of headroom: at the largest size the answer is limited by
memory (about 25 on this machine; batch 2 needs about 300 MiB of the headroom, so it is memory-limited with room to
spare whatever the memory noise), and at the smallest by the dataset. 83 images: 82 = 2 x 41, so no batch from 3
to 40 leaves a last batch of one image, which BatchNorm cannot train on. Training runs with ``multi_scale=0.5``
and ``shape_table=True``: the batch is searched at the largest size first, then per size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import batchlab
from batchlab.integrations.ultralytics import ULTRALYTICS_CPU_DEFAULT, trainer_class

DEMO = Path(__file__).resolve().parents[1] / "examples" / "ultralytics_demo.py"
N_TRAIN = 83


def test_batch_minus_one_on_cpu_trains_at_batchlabs_answer_and_a_fixed_batch_is_checked(tmp_path):
    out = tmp_path / "result.json"
    src = str(Path(batchlab.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "2",
    }
    command = [
        sys.executable,
        str(DEMO),
        "--workdir",
        str(tmp_path / "work"),
        "--n-train",
        str(N_TRAIN),
        "--headroom-mib",
        "450",
        "--check-fixed",
        "16",
        "--multi-scale",
        "0.5",
        "--shape-table",
        "--json",
        str(out),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["ultralytics_batch"] == ULTRALYTICS_CPU_DEFAULT  # AutoBatch alone, asked in the same run
    trained = result["batchlab_batch"]
    assert result["trained_batch"] == trained and 2 <= trained < N_TRAIN
    assert result["fits"] and result["limited_by"] == "memory"
    probes = result["probes"]
    answer = [p for p in probes if p["batch_size"] == trained][
        -1
    ]  # the last probe may be the next size's failure
    assert answer["outcome"] == "fits" and answer["state_step"] is None
    assert all(p["peak_bytes"] <= result["budget_bytes"] for p in probes if p["outcome"] == "fits")
    assert result["epochs_done"] == 1 and result["results_csv"]  # the epoch ran and Ultralytics logged it
    assert "batch=16 does not fit" in result["fixed_check"]
    # multi_scale 0.5 at imgsz 64 trains on 32..96 (stride 32): the search ran at 96 first -- the worst case, whose
    # batch trained -- then at 32 and 64, each size's answer verified there: 96 (and 64) limited by memory, 32
    # by the dataset
    table = result["shape_table"]
    assert [e["shape"] for e in table["entries"]] == [[32, 32], [64, 64], [96, 96]]
    assert table["order"][0] == [96, 96] and table["entries"][-1]["result"]["probes"] == probes
    sizes = [entry["batch_size"] for entry in table["entries"]]
    assert sizes[0] >= sizes[1] >= sizes[2] == trained
    limits = [entry["result"]["limited_by"] for entry in table["entries"]]
    assert limits[2] == "memory" and set(limits) <= {"memory", "dataset size"}
    for entry in table["entries"]:
        assert entry["fits"] and entry["result"]["peak_bytes"] <= table["budget_bytes"]
        last = [p for p in entry["result"]["probes"] if p["batch_size"] == entry["batch_size"]][-1]
        assert last["state_step"] is None and last["outcome"] == "fits"  # verified in full at its size
        if entry["result"]["limited_by"] == "dataset size":
            assert entry["batch_size"] == N_TRAIN
    assert (
        f"batchlab chose batch {trained}" in run.stdout
        and "Ultralytics AutoBatch alone would use: 16" in run.stdout
    )


def test_options_are_validated_before_training():
    class FakeTrainer:  # any class: trainer_class only subclasses it
        pass

    with pytest.raises(ValueError, match="on_misfit"):
        trainer_class(FakeTrainer, on_misfit="ignore")
    with pytest.raises(ValueError, match="potatoes"):
        trainer_class(FakeTrainer, memory_budget="4 potatoes")
    with pytest.raises(TypeError, match="YOLO model or trainer class"):
        trainer_class(object())
    cls = trainer_class(FakeTrainer, memory_budget="1GiB")
    assert issubclass(cls, FakeTrainer) and cls.__name__ == "BatchlabFakeTrainer"


def test_multi_scale_sizes_span_what_training_draws_stride_aligned():
    from batchlab.integrations.ultralytics import multi_scale_sizes

    assert multi_scale_sizes(640, 0.5, 32) == [320, 480, 640, 800, 960]
    assert multi_scale_sizes(64, 0.5, 32) == [32, 64, 96]  # fewer stride multiples than 5: each once
    assert multi_scale_sizes(640, 0.0, 32) == [640]
