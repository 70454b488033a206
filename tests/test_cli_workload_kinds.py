"""Every command as users run it -- display on -- for every workload kind: a built-in name,
``path/to/file.py:function`` and ``module:function``. A flag is applied or refused in one line, never dropped."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from batchlab.cli import main
from batchlab.sweeps import SupervisedRun, SweepResult, SweepRun
from batchlab.workloads.tasks import load_task

# A user's file: a run factory on batchlab's SupervisedRun (tiny: 64 training samples of 8 features), a
# trainable batchlab cannot rebuild, and a Workload -- each behind a function called with no arguments.
USER_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    import batchlab
    from batchlab.sweeps import SupervisedRun


    def _data():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(96, 8, generator=generator)
        y = (x.sum(1) > 0).long()
        return (x[:64], y[:64]), (x[64:], y[64:])


    def factory(batch_size, lr, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        train, val = _data()
        return SupervisedRun(model, torch.optim.Adam(model.parameters(), lr=lr), nn.functional.cross_entropy,
                             train, val, batch_size=batch_size, seed=seed, noise_every=2, name="tiny")


    class Custom:
        def __init__(self, batch_size):
            self.batch_size = batch_size

        def train_step(self):
            return 1.0

        def evaluate(self):
            return {"loss": 1.0}


    def make():
        return factory


    def make_custom():
        return lambda batch_size, lr, seed: Custom(batch_size)


    def make_workload():
        model = nn.Linear(16, 4)
        return batchlab.Workload(model, lambda b: (torch.randn(b, 16), torch.randint(0, 4, (b,))),
                                 nn.functional.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.1),
                                 dataset_size=64, name="user-linear")
    """
)
KINDS = ("file", "module")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory: sweeps write ./batchlab-runs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def user(workdir, monkeypatch):
    """``user(kind, function)`` -> the --workload spec of ``function`` in the user's file, as that kind."""
    tmp_path = workdir
    (tmp_path / "kinds_user_code.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kinds_user_code", raising=False)

    def spec(kind: str, function: str) -> str:
        return (
            f"{tmp_path / 'kinds_user_code.py'}:{function}"
            if kind == "file"
            else f"kinds_user_code:{function}"
        )

    return spec


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


SWEEP = ["--batch-sizes", "16", "--lr", "1e-3", "--budget-steps", "4", "--no-tracking", "--no-report"]


def only_run() -> SweepRun:
    """The one run of the one sweep under ./batchlab-runs, read back from its directory."""
    (directory,) = Path("batchlab-runs/sweeps").iterdir()
    (run,) = SweepResult.load(directory).runs
    return run


# ------------------------------------------------------------------------------- sweep flags, every kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("flag", "check"),
    [
        (["--amp", "bf16"], lambda run: run.precision == "bf16"),
        (["--accumulation", "2"], lambda run: run.accumulation == 2),
        (["--noise-every", "0"], lambda run: run.noise_scale is None and not run.noise_updates.step),
        (["--device", "cpu"], lambda run: run.device == "cpu"),
    ],
    ids=["amp", "accumulation", "noise-every", "device"],
)
def test_sweep_applies_each_flag_to_a_users_supervised_run(capsys, user, kind, flag, check):
    code, out, err = run_cli(capsys, "sweep", "--workload", user(kind, "make"), *SWEEP, *flag)
    assert code == 0, err
    assert "best LR per batch size" in out  # the display was on
    run = only_run()
    assert check(run), run
    assert run.steps == 4 and run.status == "finished"


def test_sweep_without_flags_keeps_the_users_own_settings(capsys, user):
    code, _, err = run_cli(capsys, "sweep", "--workload", user("file", "make"), *SWEEP)
    assert code == 0, err
    run = only_run()
    assert run.precision == "fp32" and run.accumulation == 1
    assert len(run.noise_updates.step) == 2  # the factory's own noise_every=2 over 4 steps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            ["--amp", "bf16"],
            "--amp bf16 cannot be applied to the Custom the factory built (its precision is 'fp32')",
        ),
        (["--accumulation", "2"], "--accumulation 2 cannot be applied to the Custom the factory built"),
        (["--noise-every", "0"], "--noise-every 0 cannot be applied to the Custom the factory built"),
    ],
    ids=["amp", "accumulation", "noise-every"],
)
def test_sweep_refuses_a_flag_a_custom_trainable_cannot_take(capsys, user, workdir, kind, flag, message):
    code, out, err = run_cli(capsys, "sweep", "--workload", user(kind, "make_custom"), *SWEEP, *flag)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and message in err
    assert not (workdir / "batchlab-runs").exists()  # refused before any sweep was set up


def test_sweep_takes_a_flag_a_custom_trainable_already_follows(capsys, user):
    code, _, err = run_cli(
        capsys, "sweep", "--workload", user("file", "make_custom"), *SWEEP, "--device", "cpu"
    )
    assert code == 0, err
    assert only_run().device == "cpu"


def test_sweep_rejects_a_ray_address_without_ray(capsys, workdir):
    code, _, err = run_cli(capsys, "sweep", "--workload", "teacher-student", *SWEEP, "--ray-address", "auto")
    assert code == 1 and "--ray-address auto needs --backend ray" in err


def test_sweep_rejects_more_threads_per_ray_trial_than_cpus(capsys, workdir):
    threads = str((os.cpu_count() or 1) + 1)
    code, _, err = run_cli(
        capsys, "sweep", "--workload", "teacher-student", *SWEEP, "--backend", "ray", "--threads", threads
    )
    assert code == 1 and f"ray_cpus_per_trial={threads} is more than this machine's" in err


def test_built_in_task_flags_keep_their_fingerprint():
    """`--amp fp32` and no flag are the same sweep (resume); a built-in task takes every flag itself."""
    assert load_task("teacher-student", amp="fp32") == load_task("teacher-student")
    task = load_task("teacher-student", accumulation=2, amp="bf16", noise_every=0)
    assert (task.accumulation, task.amp, task.noise_every) == (2, "bf16", 0)


def test_with_options_moves_the_model_and_data_and_keeps_the_optimizer_on_them():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    data = (torch.randn(32, 4), torch.randint(0, 2, (32,)))
    run = SupervisedRun(model, optimizer, torch.nn.functional.cross_entropy, data, data, batch_size=8, seed=3)
    moved = run.with_options(device="meta", accumulation=2, amp="bf16", noise_every=0)
    assert moved.device == torch.device("meta") and moved.train_x.device.type == "meta"
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # Module.to keeps the Parameters
    assert optimizer.param_groups[0]["params"][0] is params[0]
    assert (moved.accumulation, moved.precision, moved.noise_every, moved.seed) == (2, "bf16", 0, 3)
    with pytest.raises(TypeError, match="with_options\\(\\) takes device, accumulation, amp, noise_every"):
        moved.with_options(lr=1.0)


# ------------------------------------------------------------ --device on a user's Workload, every command


@pytest.fixture
def cuda_claimed(monkeypatch):
    """A machine that says it has CUDA (as every GPU machine does) while the user's model is on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["fit", "profile", "noise", "advise"])
def test_device_auto_follows_a_users_model(capsys, user, cuda_claimed, kind, command):
    extra = {"profile": ["--seconds-per-point", "0"], "noise": ["--steps", "4"]}.get(command, [])
    if command == "advise":
        extra = ["--noise-steps", "4", "--throughput", "probes"]
    code, out, err = run_cli(capsys, command, "--workload", user(kind, "make_workload"), *extra)
    assert code == 0, err  # auto is where the model is (the CPU), not the CUDA the machine has


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["fit", "profile", "noise", "advise"])
def test_a_device_the_users_model_is_not_on_is_refused(capsys, user, cuda_claimed, kind, command):
    code, _, err = run_cli(capsys, command, "--workload", user(kind, "make_workload"), "--device", "cuda")
    assert code == 1 and "Traceback" not in err
    assert "device 'cuda' does not match the workload's model, which is on cpu" in err


# --------------------------------------------------------------------------- the other dropped flags


def test_advise_refuses_seconds_per_point_with_probe_throughput(capsys):
    code, _, err = run_cli(
        capsys, "advise", "--workload", "mlp-digits", "--throughput", "probes", "--seconds-per-point", "0.5"
    )
    assert code == 1 and "seconds_per_point 0.5 times batch sizes for throughput 'profile'" in err


def test_report_refuses_a_tracking_uri_for_a_sweep_directory(capsys, workdir):
    assert run_cli(capsys, "sweep", "--workload", "teacher-student", *SWEEP)[0] == 0
    (directory,) = Path("batchlab-runs/sweeps").iterdir()
    code, _, err = run_cli(capsys, "report", str(directory), "--tracking-uri", "sqlite:///elsewhere.db")
    assert code == 1 and "--tracking-uri reads an MLflow experiment" in err


# ------------------------------------------------------------------- progress: phase and how far, display on


@pytest.mark.parametrize("kind", ["builtin", *KINDS])
def test_long_commands_show_their_phase_and_progress_on_stderr(capsys, user, kind):
    workload = "mlp-digits" if kind == "builtin" else user(kind, "make_workload")
    quick = ["--device", "cpu", "--max-batch-size", "32"]
    code, out, err = run_cli(
        capsys, "advise", "--workload", workload, *quick, "--noise-steps", "8", "--seconds-per-point", "0"
    )
    assert code == 0, err
    lines = err.splitlines()
    assert f"advise {workload}: what fits (fit search) ..." in lines
    assert f"advise {workload}: fit search (fp32) ..." in lines  # the profile's search, probe by probe
    assert any(line.strip().startswith("probe b=") for line in lines)
    assert f"advise {workload}: timing batch sizes (fp32) ..." in lines
    assert any(line.strip().startswith("fp32") and "samples/s" in line for line in lines)
    assert any(line.startswith(f"advise {workload}: noise scale, 8 steps") for line in lines)
    assert "  step 8/8" in lines  # how far, also off a terminal
    assert "recommended batch" in out and "recommended batch" not in err  # results on stdout

    code, out, err = run_cli(capsys, "profile", "--workload", workload, *quick, "--seconds-per-point", "0")
    assert code == 0 and f"profile {workload}: fit search (fp32) ..." in err.splitlines()
    assert f"profile {workload}: timing batch sizes (fp32) ..." in err.splitlines()

    code, out, err = run_cli(capsys, "noise", "--workload", workload, "--device", "cpu", "--steps", "4")
    assert code == 0 and "  step 4/4" in err.splitlines() and "B_simple" in out

    code, out, err = run_cli(capsys, "fit", "--workload", workload, *quick)
    assert code == 0 and f"fit {workload}: probing batch sizes ..." in err.splitlines()
    assert "probe b=" in err and "largest batch that fits" in out

    code, out, err = run_cli(
        capsys, "plan", "--workload", workload, "--target", "1GiB", "--max-batch-size", "32"
    )
    assert code == 0 and f"plan {workload}: training steps on fake tensors for 1GiB ..." in err.splitlines()


@pytest.mark.parametrize("command", ["fit", "profile", "noise", "advise", "plan"])
def test_json_keeps_stderr_silent(capsys, command):
    extra = {
        "profile": ["--seconds-per-point", "0", "--max-batch-size", "16"],
        "noise": ["--steps", "4"],
        "advise": ["--noise-steps", "16", "--throughput", "probes", "--max-batch-size", "16"],
        "plan": ["--target", "1GiB", "--max-batch-size", "16"],
        "fit": ["--max-batch-size", "16"],
    }[command]
    device = [] if command == "plan" else ["--device", "cpu"]
    torch.manual_seed(0)  # few noise steps: whether |G|² comes out positive depends on the draws, so fix them
    code, out, err = run_cli(capsys, command, "--workload", "mlp-digits", *device, *extra, "--json")
    assert code == 0 and err == ""
    json.loads(out)
