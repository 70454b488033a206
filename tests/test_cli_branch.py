"""``batchlab noise --branch``: the critical batch measured by branching, beside B_simple, from the command line."""

from __future__ import annotations

import json

import pytest

from batchlab.cli import main

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


def test_branch_needs_validation_data_and_says_what_to_add(capsys, workload):
    code, _, err = run_cli(capsys, "noise", "--workload", f"{workload}:no_validation", "--device", "cpu",
                           "--branch", "8,16,32")  # fmt: skip
    assert code == 1 and "without validation data" in err and "workload.validation = " in err
