"""Sweeping your own model: the function returning a Workload that fit/profile/noise/plan take drives a sweep."""

from __future__ import annotations

import json
import math
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import batchlab
from batchlab.cli import main
from batchlab.defaults import MEASURED_MAX_BATCH
from batchlab.errors import WorkloadError
from batchlab.sweeps import Budget, RunSpec, SweepConfig, SweepResult, Target, WorkloadFactory, execute_run
from batchlab.sweeps.auto import auto_batch_sizes
from sweep_helpers import ScriptedRun

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sweep_own_model.py"
SPEC = f"{EXAMPLE}:make_workload"
QUICK = ["--lr", "3e-3", "--budget-steps", "6", "--no-tracking", "--no-report"]

# A user's file with the mistakes a sweep must name: no validation data, a model built once at import.
MISTAKES = textwrap.dedent(
    """
    import torch
    import batchlab

    def _workload(model):
        return batchlab.Workload(model, lambda b: (torch.randn(b, 4), torch.randint(0, 2, (b,))),
                                 torch.nn.functional.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.1))

    def no_validation():
        return _workload(torch.nn.Linear(4, 2))

    MODEL = torch.nn.Linear(4, 2)

    def one_model():
        workload = _workload(MODEL)
        workload.validation = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        return workload
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sweeps write ./batchlab-runs
    return tmp_path


def make_workload():
    """The README's example, imported as a module function (picklable by reference)."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import sweep_own_model
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return sweep_own_model.make_workload()


def only_result() -> SweepResult:
    (directory,) = Path("batchlab-runs/sweeps").iterdir()
    return SweepResult.load(directory)


def test_the_readme_example_serves_fit_and_sweep_through_the_cli(workdir, capsys):
    assert main(["fit", "--workload", SPEC, "--device", "cpu", "--max-batch-size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 64  # one training step: fit's view of it

    assert main(["sweep", "--workload", SPEC, "--batch-sizes", "16,64", *QUICK, "--target-loss", "5"]) == 0
    out = capsys.readouterr().out
    assert "best LR per batch size" in out and "runs of my-mlp" in out
    result = only_result()
    assert [(r.batch_size, r.status, r.steps) for r in result.runs] == [
        (16, "finished", 6),
        (64, "finished", 6),
    ]
    for run in result.runs:
        assert run.workload == "my-mlp" and run.precision == "fp32" and run.accumulation == 1
        assert run.lr == pytest.approx(
            3e-3 * math.sqrt(run.batch_size / 16)
        )  # the sqrt rule from the smallest
        assert run.val.step[0] == 0 and math.isfinite(run.final_val["loss"])  # on workload.validation
        assert run.steps_to_target == 0  # a target of 5 is met before the first step
        assert run.noise_updates.step[0] == 1  # the split-batch noise scale, every 4th step from the first
    assert result.config.dataset_size == 2048  # from the Workload: the report's epoch table


@pytest.mark.parametrize(
    ("flags", "check"),
    [
        (["--amp", "bf16"], lambda run: run.precision == "bf16"),
        (  # the micro-batches measure on the default every-4th step, as the split batch does
            ["--accumulation", "2"],
            lambda run: run.accumulation == 2 and list(run.noise_updates.step) == [1, 5],
        ),
        (["--noise-every", "0"], lambda run: run.noise_scale is None and not run.noise_updates.step),
        (["--device", "cpu"], lambda run: run.device == "cpu"),
    ],
    ids=["amp", "accumulation", "noise-every", "device"],
)
def test_sweep_flags_reach_a_workloads_runs(workdir, capsys, flags, check):
    assert main(["sweep", "--workload", SPEC, "--batch-sizes", "16", *QUICK, *flags]) == 0, (
        capsys.readouterr()
    )
    (run,) = only_result().runs
    assert run.status == "finished" and check(run), run


def test_what_a_sweep_needs_from_the_function_is_said_in_one_line(workdir, capsys):
    (workdir / "mistakes.py").write_text(MISTAKES)
    code = main(["sweep", "--workload", "mistakes.py:no_validation", "--batch-sizes", "16", *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.splitlines() == [err]
    assert err == (
        "batchlab: error: mistakes.py:no_validation returned a Workload without validation data, which a sweep "
        "compares its runs on: set workload.validation = (inputs, targets) of held-out samples (or a function "
        "model -> {'loss': ...}) before returning it"
    )
    code = main(["sweep", "--workload", "mistakes.py:one_model", "--batch-sizes", "16", *QUICK])
    err = capsys.readouterr().err.strip()
    assert (
        code == 1
        and "mistakes.py:one_model returned the same model twice: a sweep trains a fresh model" in err
    )
    assert not (workdir / "batchlab-runs").exists()  # both refused before any sweep was set up


def test_runs_repeat_per_seed_and_leave_the_callers_rng_alone():
    factory = WorkloadFactory(make_workload)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, again, other = factory(16, 1e-3, 0), factory(16, 1e-3, 0), factory(16, 1e-3, 1)
    losses = [[run.train_step() for _ in range(3)] for run in (first, again, other)]
    assert torch.equal(torch.get_rng_state(), before)  # model builds and batches drew from their own streams
    assert losses[0] == losses[1] and losses[0] != losses[2]
    for p, q in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)  # same seed: same initial weights, same batches, same updates
    assert first.model is not again.model


def test_the_run_lr_replaces_the_optimizers_and_keeps_the_ratio_between_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))

    def make():
        workload = batchlab.Workload(
            model,
            lambda b: (torch.randn(b, 4), torch.randint(0, 2, (b,))),
            torch.nn.functional.cross_entropy,
            lambda _: torch.optim.SGD(
                [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 1e-4}], lr=1e-3
            ),
        )
        workload.validation = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        return workload

    run = batchlab.sweeps.WorkloadRun(make(), batch_size=8, lr=1e-2)
    assert [g["lr"] for g in run._workload.optimizer.param_groups] == pytest.approx([1e-2, 1e-3])


def test_a_validation_function_gives_other_metrics_and_a_target_on_them(tmp_path):
    def make():
        workload = make_workload()
        x, y = workload.validation

        def validation(model):
            outputs = model(x)
            return {
                "loss": torch.nn.functional.cross_entropy(outputs, y),
                "accuracy": (outputs.argmax(1) == y).float().mean(),
            }

        workload.validation = validation
        return workload

    result = batchlab.sweep(
        WorkloadFactory(make), [32], lr=3e-3, budget=20, target="accuracy>=0.3", directory=tmp_path,
        tracking_uri=False, report=False,
    )  # fmt: skip
    (run,) = result.runs
    assert set(run.final_val) == {"loss", "accuracy"} and run.steps_to_target is not None


def test_a_target_on_a_metric_the_runs_do_not_return_is_refused():
    config = SweepConfig("t", "scripted", {}, [4], [4], 0.1, 4, "sqrt", [1.0], [0], Budget(steps=3),
                         Target(0.9, "accuracy"), 1, False)  # fmt: skip
    with pytest.raises(ValueError, match="the target's metric 'accuracy' is not among the metrics evaluate"):
        execute_run(lambda b, lr, s: ScriptedRun(4, [1.0], [2.0]), RunSpec("k", 4, 0.1, 1.0, 0), config)


def test_the_factory_pickles_for_ray_workers():
    factory = pickle.loads(pickle.dumps(WorkloadFactory(make_workload)))
    run = factory(16, 1e-3, 0)
    assert math.isfinite(run.train_step()) and set(run.evaluate()) == {"loss"}


def test_a_factory_of_anything_but_a_workload_is_refused():
    with pytest.raises(WorkloadError, match="returned int; expected a batchlab.Workload"):
        WorkloadFactory(lambda: 3, source="f")


def test_the_readme_shows_the_example_that_these_tests_run():
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    section = readme[readme.index("### Sweeping your own model") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```\n")]
    source = EXAMPLE.read_text()
    assert code == source[source.index("import torch\n") :]  # the same file, word for word
    assert "--workload examples/sweep_own_model.py:make_workload" in section


def test_ray_ships_by_value_exactly_the_modules_a_worker_could_not_import():
    from batchlab.sweeps.ray_backend import _unimportable_modules
    from batchlab.workloads.tasks import load_task

    load_task(SPEC)  # imports the example under a private module name, on no sys.path
    names = [module.__name__ for module in _unimportable_modules()]
    assert "batchlab_user_task_sweep_own_model" in names
    assert not {"torch", "batchlab", "sweep_helpers", "__main__"} & set(names)  # importable by name anywhere


def stream_workload():
    """A workload that gives no dataset size (a stream): only memory bounds its batch, near 10^8 here."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return batchlab.Workload(model, lambda b: (torch.randn(b, 8), torch.randint(0, 3, (b,))),
                             torch.nn.functional.cross_entropy, lambda p: torch.optim.Adam(p, lr=1e-3),
                             validation=(torch.randn(64, 8), torch.randint(0, 3, (64,))))  # fmt: skip


def test_auto_batch_sizes_stop_at_the_measured_cap_without_a_dataset_size():
    """Without the cap the fit search ran to ~10^8 and "auto" would have trained at 2^19..2^26."""
    sizes = auto_batch_sizes(WorkloadFactory(stream_workload), 1e-3, device="cpu")
    assert sizes == [2**k for k in range(9, 17)] and sizes[-1] == MEASURED_MAX_BATCH
