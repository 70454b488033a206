"""``batchlab advise`` and ``batchlab noise``: a recommendation with its reasoning, JSON that parses, clear errors."""

from __future__ import annotations

import json
import re
import sys

import pytest

from batchlab.cli import main
from batchlab.defaults import MEASURED_MAX_BATCH

# Few noise steps keep each run to seconds; the numbers are not asserted, only their presence and shape.
QUICK = ["--workload", "mlp-digits", "--device", "cpu"]
QUICK_ADVISE = [*QUICK, "--noise-steps", "15", "--noise-batch", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_advise_prints_a_recommendation_with_its_reasoning(capsys):
    code, out, err = run_cli(capsys, "advise", *QUICK_ADVISE, "--throughput", "probes", "--epochs", "3")
    assert code == 0, err
    assert "recommended batch" in out and "learning rate" in out
    assert "gradient noise scale B_noise ≈" in out and "critical batch" in out  # the reasoning
    assert "goodput" in out and "peaks at" in out
    assert ("switch from 32 to" in out) or ("keep batch 32" in out)  # the 5% rule, either way
    assert re.search(r"optimizer steps? per epoch x 3 epochs", out)  # the schedule (1438 digits)
    assert "throughput from fit probes" in out  # says which timing was used
    assert "rule sqrt (Adam is adaptive" in out  # mlp-digits trains with Adam


def test_advise_json_parses_and_holds_the_whole_story(capsys):
    code, out, _ = run_cli(
        capsys, "advise", *QUICK_ADVISE, "--throughput", "probes", "--batch", "64", "--lr", "3e-4", "--json"
    )
    assert code == 0
    data = json.loads(out)  # only JSON on stdout
    rec = data["recommendation"]
    assert rec["current_batch"] == 64 and rec["base_batch"] == 64 and rec["lr"]["base_lr"] == 3e-4
    assert isinstance(rec["batch_size"], int) and 2 <= rec["batch_size"] <= 1438
    assert rec["micro_batch"] * rec["accumulation_steps"] == rec["batch_size"]
    assert rec["schedule"]["dataset_size"] == 1438 and rec["explanation"] and rec["candidates"]
    assert data["throughput_source"] == "fit probes" and data["throughput"]
    assert data["fit"]["batch_size"] == 1438 and data["noise"]["collector"] == "split"
    assert data["noise"]["b_simple"] == rec["noise_scale"]


def test_advise_uses_profile_when_available(capsys):
    pytest.importorskip("batchlab.profiling.api")
    code, out, _ = run_cli(
        capsys,
        "advise",
        *QUICK_ADVISE,
        "--max-batch-size",
        "256",
        "--seconds-per-point",
        "0",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["throughput_source"] == "profile"
    assert data["fit"]["batch_size"] == 256
    assert max(int(b) for b in data["throughput"]) == 256


def test_advise_falls_back_to_probes_without_profile(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "batchlab.profiling.api", None)  # importing it -> ImportError
    code, _, err = run_cli(capsys, "advise", *QUICK, "--throughput", "profile")
    assert code == 1 and "batchlab.profile is not available" in err
    code, out, _ = run_cli(capsys, "advise", *QUICK_ADVISE, "--max-batch-size", "128", "--json")
    assert code == 0 and json.loads(out)["throughput_source"] == "fit probes"


def test_noise_reports_b_simple_with_its_uncertainty(capsys):
    code, out, _ = run_cli(capsys, "noise", *QUICK, "--steps", "15", "--batch", "64")
    assert code == 0
    assert "B_simple ≈" in out and "±" in out and "restored" in out
    code, out, _ = run_cli(capsys, "noise", *QUICK, "--steps", "15", "--batch", "64", "--json")
    data = json.loads(out)
    assert code == 0 and data["b_simple"] > 0 and data["b_simple_stderr"] > 0
    assert data["updates"] == 15 and data["collector"] == "split" and data["batch_size"] == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["advise", "--lr", "0"], "invalid --lr 0.0"),
        (["advise", "--batch", "0"], "invalid --batch 0"),
        (["advise", "--world-size", "0"], "invalid --world-size 0"),
        (["advise", "--gain-threshold", "-1"], "invalid --gain-threshold -1.0"),
        (["advise", "--noise-steps", "0"], "invalid steps 0"),
        (["advise", "--memory-budget", "lots"], "invalid byte size 'lots'"),
        (["advise", "--batch", "5000"], "current_batch 5000 is larger than the dataset (1438 samples)"),
        (["advise", "--noise-collector", "accumulation"], "collector 'accumulation' needs a workload"),
        (["advise", "--rounds", "0"], "invalid --rounds 0: expected an int >= 1 or None"),
        (["advise", "--rounds", "31"], "invalid --rounds 31: expected an int from 1 to 30"),
        (
            ["advise", "--rounds", "2", "--throughput", "probes"],
            "--rounds times batch sizes for --throughput profile",
        ),
        (["noise", "--steps", "0"], "invalid steps 0"),
        (["noise", "--batch", "1"], "invalid noise batch 1"),
        (["noise", "--beta", "1.5"], "invalid beta 1.5"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, args, message):
    code, out, err = run_cli(capsys, *args, *QUICK)
    assert code == 1
    assert err.startswith("batchlab: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


def test_a_plain_step_callable_is_refused(capsys, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("def make():\n    return lambda batch_size: None\n")
    for command in ("noise", "advise"):
        code, _, err = run_cli(capsys, command, "--workload", f"{script}:make", "--device", "cpu")
        assert code == 1 and "needs a batchlab.Workload" in err


TINY_WORKLOAD = """
import torch
from torch import nn

import batchlab


def make():
    torch.manual_seed(0)
    data = torch.randn(256, 8), torch.randint(0, 3, (256,))

    def make_batch(b):
        index = torch.randint(0, 256, (b,))
        return data[0][index], data[1][index]

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    adam = lambda params: torch.optim.Adam(params, lr=1e-3)
    return batchlab.Workload(model, make_batch, nn.functional.cross_entropy, adam, dataset_size=256)


def unbounded():
    workload = make()
    workload.dataset_size = None  # a stream: only memory bounds the batch, at ~10^8 samples of 8 floats
    return workload
"""


def test_python_advise_gives_what_the_cli_prints(capsys, tmp_path, monkeypatch):
    """batchlab.advise(workload, ...) and `batchlab advise --json` compute the same numbers and the same JSON.

    Timings come from a fake clock (every perf_counter call advances it by 1 ms), so the throughput curve --
    and everything the recommendation derives from it -- is the same in both runs; only the fit's memory
    readings (the process's resident memory, the free RAM) and the total wall time differ between two runs
    and are left out.
    """
    import time

    import batchlab
    from batchlab.workloads import load_workload

    spec = tmp_path / "tiny.py"
    spec.write_text(TINY_WORKLOAD)
    flags = {"--batch": 16, "--max-batch-size": 64, "--noise-steps": 12, "--seconds-per-point": 0}

    def fake_clock():
        ticks = iter(range(10**9))
        return lambda: next(ticks) * 1e-3

    monkeypatch.setattr(time, "perf_counter", fake_clock())
    code, out, _ = run_cli(
        capsys, "advise", "--workload", f"{spec}:make", "--device", "cpu", "--json",
        *[str(x) for item in flags.items() for x in item],
    )  # fmt: skip
    assert code == 0
    from_cli = json.loads(out)

    monkeypatch.setattr(time, "perf_counter", fake_clock())
    advice = batchlab.advise(
        load_workload(f"{spec}:make", device="cpu"),
        current_batch=16,
        max_batch_size=64,
        noise_steps=12,
        seconds_per_point=0,
        device="cpu",
    )
    from_python = json.loads(json.dumps({"workload": f"{spec}:make", **advice.to_dict()}))

    for data in (from_cli, from_python):
        for memory in ("budget_bytes", "peak_bytes"):
            data["fit"].pop(memory)
        data.pop("seconds")  # the command's wall time: lazy first-time code paths read the clock too
    assert from_python == from_cli
    assert from_cli["throughput_source"] == "profile" and from_cli["recommendation"]["candidates"]
    assert advice.recommendation.batch_size == from_cli["recommendation"]["batch_size"]


@pytest.mark.parametrize(
    ("flags", "fit", "said"),
    [
        (
            [],
            MEASURED_MAX_BATCH,
            "(advise's cap of 65,536: no larger micro-batch can win on goodput; --max-batch-size",
        ),
        (
            ["--max-batch-size", str(2 * MEASURED_MAX_BATCH)],
            2 * MEASURED_MAX_BATCH,
            "(limited by max_batch_size)",
        ),
    ],
)
def test_advise_measures_up_to_its_cap_without_a_dataset_size_unless_told(capsys, tmp_path, flags, fit, said):
    """A small model with no dataset size fits ~10^8 samples in RAM: searching and timing up there took minutes.
    advise stops at MEASURED_MAX_BATCH and says so; --max-batch-size moves the cap either way."""
    path = tmp_path / "tiny_advise.py"
    path.write_text(TINY_WORKLOAD)
    args = ["advise", "--workload", f"{path}:unbounded", "--device", "cpu", "--throughput", "probes",
            "--noise-steps", "10", *flags]  # fmt: skip
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["fit"]["batch_size"] == fit and data["fit"]["limited_by"] == "max_batch_size"
    assert max(int(b) for b in data["throughput"]) == fit
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert said in " ".join(out.split())
