"""``batchlab noise --branch``: the critical batch measured by branching, beside B_simple, from the command line."""

from __future__ import annotations

import json

import pytest

from batchlab.cli import main
from conftest import undefined_noise_scale

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

WORKLOAD = """
import torch
from torch import nn
from torch.nn import functional as F
from batchlab import Workload

def make():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def batch(b):
        index = torch.randint(0, 500, (b,))
        return x[index], y[index]

    return Workload(model, batch, F.cross_entropy, lambda p: torch.optim.Adam(p, lr=1e-2),
                    validation=(x[500:], y[500:]))

def no_validation():
    workload = make()
    workload.validation = None
    return workload
"""


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "tiny_branch.py"
    path.write_text(WORKLOAD)
    return str(path)


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


QUICK = ["--device", "cpu", "--steps", "10", "--batch", "16", "--reference-steps", "10"]


def test_branch_reports_the_fitted_b_crit_beside_b_simple_and_the_json_carries_both(capsys, workload):
    code, out, err = run_cli(capsys, "noise", "--workload", f"{workload}:make", *QUICK, "--branch", "8,16,32")
    assert code == 0, err
    assert (
        "B_simple ≈" in out and "critical batch (branched): B_crit ≈" in out and "B_simple / B_crit = " in out
    )
    assert "batch 8, lr 0.00707: " in err  # each LR tried is shown as it finishes (the sqrt rule from 16)
    code, out, _ = run_cli(capsys, "noise", "--workload", f"{workload}:make", *QUICK, "--branch", "8,16,32",
                           "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["branched"]["base_batch"] == 16 and len(data["branched"]["rows"]) == 3
    assert data["b_simple_over_b_crit"] == pytest.approx(data["b_simple"] / data["branched"]["b_crit"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--branch", "8,x,32"], "--branch '8,x,32': expected comma-separated batch sizes"),
        (["--branch", "8,16"], "fitting B_crit needs at least 3 distinct batch sizes"),
        (["--base-batch", "8"], "--base-batch only apply with --branch SIZES"),
        (["--target-loss", "0.5", "--rule", "none"], "--target-loss, --rule only apply with --branch"),
        (
            ["--branch", "8,16,32", "--reference-steps", "0"],
            "invalid reference_steps 0: expected an int >= 1",
        ),
        (["--branch", "8,16,32", "--base-batch", "0"], "invalid base_batch 0: expected an int >= 1"),
        (["--branch", "8,16,32", "--target-loss", "-1"], "invalid target_loss -1.0: expected a number > 0"),
    ],
)
def test_bad_branch_input_is_one_line_and_nonzero(capsys, workload, extra, message):
    code, out, err = run_cli(capsys, "noise", "--workload", f"{workload}:make", "--device", "cpu", "--steps", "5",
                             *extra)  # fmt: skip
    assert code == 1 and err.startswith("batchlab: error: ") and message in err
    assert "Traceback" not in err + out


def test_a_target_above_the_start_ends_in_one_error_line_after_the_progress(capsys, workload):
    code, out, err = run_cli(capsys, "noise", "--workload", f"{workload}:make", "--device", "cpu", "--steps", "5",
                             "--branch", "8,16,32", "--target-loss", "50")  # fmt: skip
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("batchlab: error: target loss 50 is not below the validation loss")
    assert "Traceback" not in err + out


def test_branch_runs_on_the_built_in_mlp_digits_which_holds_out_its_validation_split(capsys):
    code, out, err = run_cli(
        capsys, "noise", "--workload", "mlp-digits", *QUICK, "--branch", "16,32,64", "--json"
    )
    assert code == 0, err
    branched = json.loads(out)["branched"]
    assert branched["b_crit"] > 0 and [row["batch_size"] for row in branched["rows"]] == [16, 32, 64]


def test_branch_needs_validation_data_and_says_what_to_add(capsys, workload):
    code, _, err = run_cli(capsys, "noise", "--workload", f"{workload}:no_validation", "--device", "cpu",
                           "--branch", "8,16,32")  # fmt: skip
    assert code == 1 and "without validation data" in err and "workload.validation = " in err


# ------------------------------------------------------------------ advise --branch / --critical-batch

# --max-batch-size: the tiny workload has no dataset_size, so the fit search would climb to what the RAM holds
ADVISE = ["advise", "--device", "cpu", "--throughput", "probes", "--noise-steps", "10", "--noise-batch", "16",
          "--batch", "16", "--max-batch-size", "64", "--branch-reference-steps", "10"]  # fmt: skip


def test_advise_branch_recommends_with_the_branched_b_crit_and_keeps_b_simple_s_answer_beside_it(
    capsys, workload
):
    code, out, err = run_cli(
        capsys,
        *ADVISE,
        "--workload",
        f"{workload}:make",
        "--max-batch-size",
        "16",
        "--branch",
        "8,16,32",
        "--json",
    )  # fmt: skip (the last --max-batch-size holds)
    assert code == 0, err
    data = json.loads(out)
    branched, rec = data["branched"], data["recommendation"]
    assert rec["noise_scale"] == branched["b_crit"] and "branched from the current state" in rec["noise_from"]
    assert rec["explanation"][0].startswith(
        f"B_noise ≈ {branched['b_crit']:,.0f}, the critical batch measured"
    )
    assert data["b_simple_recommendation"]["noise_scale"] == data["noise"]["b_simple"]
    assert data["b_simple_recommendation"]["noise_from"] is None
    assert branched["seconds"] > 0 and data["seconds"] > 0  # the branches' own wall time, and advise's
    # the branches run at advise's own LR, base batch and rule, each micro-batch within what fits (16 here)
    assert branched["base_batch"] == 16 and branched["base_lr"] == 1e-2 and branched["rule"] == "sqrt"
    assert [(r["micro_batch"], r["accumulation"]) for r in branched["rows"]] == [(8, 1), (16, 1), (16, 2)]
    code, out, _ = run_cli(capsys, *ADVISE, "--workload", f"{workload}:make", "--lr", "3e-3", "--rule", "linear",
                           "--branch", "8,16,32", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["branched"]["base_lr"] == 3e-3 and data["branched"]["rule"] == "linear"
    assert data["branched"]["rows"][0]["trials"][0]["lr"] == pytest.approx(3e-3 * 8 / 16)  # linear from 16


def test_advise_branch_prints_the_branches_the_source_of_b_noise_and_what_b_simple_would_advise(
    capsys, workload
):
    code, out, err = run_cli(capsys, *ADVISE, "--workload", f"{workload}:make", "--branch", "8,16,32")
    out = " ".join(out.split())  # rich wraps long lines at the terminal's width
    assert code == 0, err
    assert "critical batch (branched): B_crit ≈" in out and "B_simple / B_crit = " in out
    assert "efficiency from B_noise " in out and "not from B_simple" in out
    assert "with the measured B_simple (" in out and "advise would recommend batch" in out
    assert "batch 8, lr 0.00707: " in err  # each LR tried is shown as it finishes


def test_advise_branch_without_a_fit_keeps_b_simple_s_advice_says_so_and_fails(capsys, workload):
    code, out, _ = run_cli(capsys, *ADVISE, "--workload", f"{workload}:make", "--branch", "8,16,32",
                           "--branch-target-loss", "0.001")  # fmt: skip
    text = " ".join(out.split())  # rich wraps long lines at the terminal's width
    assert code == 1
    assert "only 0 of 3 batch sizes reached the target: no fit" in text
    assert "the branches gave no critical batch (above): the advice above uses the measured B_simple" in text
    assert "gradient noise scale B_noise ≈" in text  # the advice printed is B_simple's, and says so


def test_advise_branch_stands_alone_when_b_simple_is_undefined(capsys, workload, monkeypatch):
    undefined_noise_scale(monkeypatch)  # conftest.py: the real estimate, B_simple made undefined
    tiny = [*ADVISE, "--workload", f"{workload}:make", "--branch", "8,16,32"]
    code, out, err = run_cli(capsys, *tiny, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["noise"]["b_simple"] is None and data["b_simple_recommendation"] is None
    assert data["recommendation"]["noise_scale"] == data["branched"]["b_crit"] > 0
    code, out, err = run_cli(capsys, *tiny)
    assert code == 0, err
    assert (
        "no B_simple (|G|² EMA is -0.0123 <= 0" in err and "the branched critical batch stands alone" in err
    )
    assert "the advice above uses the branched B_crit alone" in " ".join(out.split())


def test_advise_without_b_simple_or_a_branched_fit_fails_in_one_line_after_the_branches(
    capsys, workload, monkeypatch
):
    undefined_noise_scale(monkeypatch)
    tiny = [*ADVISE, "--workload", f"{workload}:make"]
    code, out, err = run_cli(capsys, *tiny, "--branch", "8,16,32", "--branch-target-loss", "0.001")
    last = err.strip().splitlines()[-1]
    assert code == 1 and "only 0 of 3 batch sizes reached the target: no fit" in " ".join(out.split())
    assert last.startswith("batchlab: error: no noise scale to advise with (|G|² EMA is -0.0123")
    assert "and the branches gave no critical batch either" in last and "Traceback" not in err
    at = tiny.index("--branch-reference-steps")
    without_branch = tiny[:at] + tiny[at + 2 :]
    code, _, err = run_cli(capsys, *without_branch)  # the error says what would do
    assert code == 1 and "or give a critical batch measured apart (critical_batch=, --critical-batch N" in err


def test_advise_critical_batch_uses_the_number_given(capsys):
    code, out, err = run_cli(capsys, "advise", "--workload", "mlp-digits", "--device", "cpu", "--throughput",
                             "probes", "--noise-steps", "10", "--critical-batch", "500", "--json")  # fmt: skip
    assert code == 0, err
    rec = json.loads(out)["recommendation"]
    assert rec["noise_scale"] == 500.0 and rec["noise_from"].startswith("the critical batch given")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--critical-batch", "100", "--branch", "8,16,32"],
            "--critical-batch gives the critical batch and --branch",
        ),
        (["--critical-batch", "0"], "invalid critical_batch 0.0: expected a number > 0"),
        (["--branch-target-loss", "0.5"], "--branch-target-loss only apply with --branch SIZES"),
        (["--branch", "8,16"], "fitting B_crit needs at least 3 distinct batch sizes"),
        (["--branch", "8,16,32", "--branch-reference-steps", "0"], "invalid reference_steps 0"),
        (["--branch", "8,16,32", "--branch-target-loss", "-1"], "invalid target_loss -1.0"),
        (
            ["--branch", "8,16,32", "--rule", "adascale"],
            "--branch moves each branch's LR by the sqrt, linear, none",
        ),
    ],
)
def test_bad_advise_branch_input_is_one_line_before_anything_runs(capsys, workload, extra, message):
    code, out, err = run_cli(capsys, "advise", "--workload", f"{workload}:make", "--device", "cpu", *extra)
    assert code == 1 and err.startswith("batchlab: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out  # no phase shown: nothing ran


def test_advise_branch_needs_validation_data_before_anything_runs(capsys, workload):
    code, _, err = run_cli(capsys, "advise", "--workload", f"{workload}:no_validation", "--device", "cpu",
                           "--branch", "8,16,32")  # fmt: skip
    assert code == 1 and "without validation data" in err and len(err.strip().splitlines()) == 1
