"""The CLI: readable output, JSON on request, one clear line and a non-zero exit for every bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchlab.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_json_prints_only_json(capsys):
    code, out, _ = run_cli(capsys, "fit", "--workload", "mlp-digits", "--device", "cpu", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["batch_size"] == 1438 and data["limited_by"] == "dataset size"  # the training split
    assert data["probes"] and all(
        p["outcome"] in {"fits", "over budget", "oom", "skipped"} for p in data["probes"]
    )


def test_fit_prints_a_readable_summary(capsys):
    code, out, _ = run_cli(
        capsys,
        "fit",
        "--workload",
        "mlp-digits",
        "--device",
        "cpu",
        "--batch",
        "0.5",
        "--max-batch-size",
        "100",
    )
    assert code == 0
    assert "largest batch that fits: 100 (limited by max_batch_size)" in out
    assert "probes" in out and "optimizer state" in out


def test_fixed_batch_that_does_not_fit_exits_one(capsys):
    code, out, _ = run_cli(
        capsys,
        "fit",
        "--workload",
        "mlp-digits",
        "--device",
        "cpu",
        "--batch",
        "64",
        "--memory-budget",
        "64MiB",
    )
    assert code == 1 and "does NOT fit" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "invalid batch '0'"),
        (["--batch", "1.5"], "invalid batch '1.5'"),
        (["--batch", "abc"], "invalid batch 'abc'"),
        (["--memory-budget", "lots"], "invalid byte size 'lots'"),
        (["--amp", "int4"], "invalid amp 'int4'"),
        (["--device", "tpu"], "invalid device 'tpu'"),
        (["--device", "mps"], "unsupported device 'mps'"),
        (["--memory-budget", "1MiB"], "batch 1 does not fit"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, args, message):
    code, out, err = run_cli(capsys, "fit", "--workload", "mlp-digits", *args)
    assert code == 1
    *progress, last = err.strip().splitlines()  # probes shown before "does not fit" was known
    assert last.startswith("batchlab: error: ") and message in last
    assert all("probe" in line or line.startswith("fit mlp-digits") for line in progress)
    assert "Traceback" not in err + out


def test_unknown_workload_and_bad_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fit", "--workload", "vgg")
    assert code == 1 and "unknown workload 'vgg'" in err and "mlp-digits" in err
    code, _, err = run_cli(capsys, "fit", "--workload", f"{tmp_path}/missing.py:make")
    assert code == 1 and "does not exist" in err


def test_user_workload_from_a_file(capsys, tmp_path):
    script = tmp_path / "my_workload.py"
    script.write_text(textwrap.dedent(
        """
        import torch
        import batchlab

        def make():
            model = torch.nn.Linear(16, 4)
            return batchlab.Workload(model, lambda b: (torch.randn(b, 16), torch.randint(0, 4, (b,))),
                                     torch.nn.functional.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.1),
                                     dataset_size=500)
        """
    ))  # fmt: skip
    code, out, _ = run_cli(capsys, "fit", "--workload", f"{script}:make", "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["batch_size"] == 500


def test_console_script_and_module_entry_points():
    console_script = str(Path(sys.executable).parent / "batchlab")
    for command in ([console_script], [sys.executable, "-m", "batchlab"]):
        done = subprocess.run(
            [*command, "fit", "--workload", "mlp-digits", "--batch", "-2"], capture_output=True, text=True
        )
        assert done.returncode == 1, done
        assert (
            done.stderr.startswith("batchlab: error: invalid batch '-2'") and "Traceback" not in done.stderr
        )


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message on machines without CUDA"
)
def test_cuda_requested_without_cuda_is_one_line(capsys):
    code, _, err = run_cli(capsys, "fit", "--workload", "mlp-digits", "--device", "cuda")
    assert code == 1 and "CUDA is not available" in err


def test_fit_eval_searches_the_evaluation_step(capsys):
    code, out, _ = run_cli(
        capsys, "fit", "--workload", "cnn", "--device", "cpu", "--batch", "8", "--eval", "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["step_mode"] == "eval"
    assert {p["optimizer_steps"] for p in data["probes"]} == {None}  # no probe ran an optimizer step
    code, out, _ = run_cli(capsys, "fit", "--workload", "cnn", "--device", "cpu", "--batch", "8", "--eval")
    assert code == 0 and "evaluation batch 8 fits" in out


SHAPED = f"{Path(__file__).resolve().parent / 'test_shapes.py'}:tiny_attention_workload"


def shaped_fit_args(room_mib: int = 30) -> list[str]:
    """``batchlab fit`` of the shaped workload on the CPU at 32,64,128 with ``room_mib`` over the process."""
    from batchlab.devices import CPUDevice
    from batchlab.workloads import load_workload

    load_workload(SHAPED)  # loading the file once pages in what it imports (~150 MiB), before the reading
    budget = str(int((CPUDevice().in_use_bytes() + room_mib * 2**20) / 0.9))
    return [
        "fit",
        "--workload",
        SHAPED,
        "--device",
        "cpu",
        "--memory-budget",
        budget,
        "--shapes",
        "32,64,128",
    ]


def test_fit_shapes_prints_the_table_and_its_plot(capsys, tmp_path):
    import matplotlib.figure  # noqa: F401 -- in the process before its memory is read, as the plot will be
    from matplotlib.backends import backend_agg  # noqa: F401

    png = tmp_path / "shapes.png"
    args = shaped_fit_args()
    assert main([*args, "--json", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["shape"] for e in data["entries"]] == [32, 64, 128]
    sizes = [e["batch_size"] for e in data["entries"]]
    assert sizes[0] > sizes[1] > sizes[2] >= 2 and all(e["fits"] for e in data["entries"])
    assert [e["tokens_per_batch"] for e in data["entries"]] == [b * n for b, n in zip(sizes, (32, 64, 128))]
    assert data["probes"] == sum(e["probes"] for e in data["entries"]) and data["model"]["lengths"]
    assert data["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the readable form: one row per shape, the model
    assert main(args[:-1] + ["32,64"]) == 0
    out = capsys.readouterr().out
    assert "largest batch per shape" in out and "peak(b, L)" in out
    assert "tokens/batch" in out and "\n│ 32 " in out.replace("┃", "│")


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ("256,128", r"invalid --shapes \[256, 128\]: expected shapes sorted from the smallest up, each once"),
        ("0,128", "invalid shape in --shapes 0"),
        ("128,abc", "invalid --shapes '128,abc': expected lengths like 128,256,512"),
        (",", r"invalid --shapes \[\]: expected a non-empty list"),
    ],
)
def test_fit_shapes_bad_input_is_one_line(capsys, shapes, message):
    assert main(["fit", "--workload", SHAPED, "--shapes", shapes]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)


def test_fit_shapes_from_plan_seeds_the_table_from_fake_tensors(capsys):
    """``--from-plan``: each shape estimated from fake tensors first (a phase of its own), then the measured
    table, whose first shape anchors at batch 2 and aims by the planned slope."""
    args = shaped_fit_args()
    assert main([*args, "--from-plan"]) == 0
    captured = capsys.readouterr()
    assert "estimating 3 shapes from fake tensors" in captured.err
    assert "largest batch per shape" in captured.out and "\n│ 128 " in captured.out.replace("┃", "│")
    assert main([*args, "--from-plan", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["entries"][-1]["result"]["probes"]  # 128, searched first
    sizes = [p["batch_size"] for p in first]
    assert sizes[0] == 2 and sizes[1] > 16  # the planned slope's aim (~120 here), not the plain table's 2 x 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--from-plan seeds the shape table: give --shapes too"),
        (
            ["--shapes", "32,64", "--eval"],
            "--from-plan plans the training step; the evaluation step (--eval) has no",
        ),
    ],
)
def test_fit_from_plan_without_a_table_to_seed_is_one_line(capsys, extra, message):
    assert main(["fit", "--workload", "cnn", "--from-plan", *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_fit_plot_needs_shapes(capsys):
    assert main(["fit", "--workload", "cnn", "--plot", "x.png"]) == 1
    assert "--plot draws the shape table: give --shapes too" in capsys.readouterr().err
