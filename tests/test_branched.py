"""branch_critical_batch: B_crit from short runs branched from the workload's state (issue 13 item 4).

Each branch must start from the same state, train as a plain loop would at its batch and LR, and leave the
user's model, optimizer and RNGs bitwise as they were -- also when it fails. benchmarks/critical_branch.py runs
the same call on digits, MNIST-1D and a char-LM (benchmarks/RESULTS.md)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchlab import StepFunction, Workload, WorkloadError
from batchlab.noise.critical import crossing
from batchlab.sweeps.branched import branch_critical_batch, branch_seed, next_multiplier, step_cap
from conftest import assert_same_state, workload_state

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

gen = torch.Generator().manual_seed(0)
X = torch.randn(600, 8, generator=gen)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
VALIDATION = (X[500:], Y[500:])


def _workload(make_batch=None, lr: float = 1e-2) -> Workload:
    """A small classifier on 500 training rows, drawn from torch's global RNG; Adam with a moved state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def draw(b):
        index = torch.randint(0, 500, (b,))
        return X[index], Y[index]

    work = Workload(model, make_batch or draw, F.cross_entropy, lambda p: torch.optim.Adam(p, lr=lr),
                    validation=VALIDATION)  # fmt: skip
    for _ in range(3):  # a checkpoint with Adam moments and gradients in place
        work.step(32)
    return work


def _by_hand(work: Workload, batch: int, lr: float, seed: int, steps: int, target=None, every: int = 1):
    """What one branch must be: a plain loop from a copy of the state at ``lr``, data seeded by ``seed``; the
    steps to ``target`` (None if not reached), or without one the validation loss after ``steps`` steps."""
    model = _workload().model
    model.load_state_dict(work.model.state_dict())
    opt = torch.optim.Adam(model.parameters())
    # A deep copy: load_state_dict keeps tensors it is given, so this loop's Adam would move the workload's own.
    opt.load_state_dict(copy.deepcopy(work.optimizer.state_dict()))
    opt.param_groups[0]["lr"] = lr

    def validation_loss():
        with torch.no_grad():
            return float(F.cross_entropy(model(VALIDATION[0]), VALIDATION[1]))

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        xs, losses = [0], [validation_loss()]
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            x, y = work.make_batch(batch)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if target is not None and step % every == 0:
                xs.append(step)
                losses.append(validation_loss())
                if losses[-1] <= target:
                    return crossing(xs, losses, target)[0]
    return None if target is not None else validation_loss()


def test_each_branch_is_the_plain_loop_from_the_same_state_and_the_state_is_left_bitwise():
    work = _workload()
    before = workload_state(work)
    found = branch_critical_batch(work, [8, 16, 64], base_batch=16, target_loss=0.45, lr_grid=[1.0, 2.0],
                                  evaluate_every=2, max_steps=60)  # fmt: skip
    assert_same_state(before, workload_state(work))
    for row in found.rows:
        for trial in row.trials:
            expected = _by_hand(work, row.batch_size, trial.lr, branch_seed(row.batch_size, 0), 60, 0.45, 2)
            assert expected is not None and trial.steps == expected  # bitwise: the very same loop
        assert row.trials[0].lr == pytest.approx(1e-2 * math.sqrt(row.batch_size / 16))  # the sqrt rule
    assert [t.lr_multiplier for t in found.rows[0].trials] == [1.0, 2.0]


def test_a_given_lr_is_the_base_batch_s_lr_every_branch_moves_from_and_the_optimizer_keeps_its_own():
    """``lr=`` (advise --branch passes its --lr): the branches move it, not the optimizer's 1e-2, by the rule;
    the optimizer's own lr is back afterwards, with the rest of the state, bitwise."""
    work = _workload()
    before = workload_state(work)
    found = branch_critical_batch(work, [8, 16, 64], base_batch=16, lr=3e-3, target_loss=0.6, lr_grid=[1.0],
                                  evaluate_every=2, max_steps=80)  # fmt: skip
    assert_same_state(before, workload_state(work))
    assert work.optimizer.param_groups[0]["lr"] == 1e-2 and found.base_lr == 3e-3
    for row in found.rows:
        (trial,) = row.trials
        assert trial.lr == pytest.approx(3e-3 * math.sqrt(row.batch_size / 16))
        expected = _by_hand(work, row.batch_size, trial.lr, branch_seed(row.batch_size, 0), 80, 0.6, 2)
        assert expected is not None and trial.steps == expected  # bitwise: the very same loop


def test_the_target_is_the_loss_the_base_batch_reaches_in_the_reference_window():
    work = _workload()
    found = branch_critical_batch(work, [8, 16, 32], base_batch=16, reference_steps=10, lr_grid=[1.0])
    assert found.target_loss == _by_hand(work, 16, 1e-2, 0, 10)  # seed=0: the reference run's stream
    assert found.target_loss < found.start_loss


def test_without_gradient_noise_every_batch_takes_the_same_steps_and_b_crit_is_below_them_all():
    """A batch that is always the whole training set has no noise: the batch size cannot matter, so the steps
    are the same at every size (rule "none": the same LR) and the fit says B_crit lies below the smallest."""
    work = _workload(make_batch=lambda b: (X[:500], Y[:500]))
    found = branch_critical_batch(work, [4, 16, 64, 256], base_batch=16, reference_steps=20, rule="none")
    steps = {row.steps for row in found.rows}
    assert len(steps) == 1 and None not in steps
    assert not found.fit.bounded and "below the smallest batch measured (4)" in found.fit.note
    assert found.b_crit < 4


def test_a_built_in_task_s_workload_branches_on_its_own_validation_split():
    """A built-in task (here the teacher-student MLP) hands branch_critical_batch a Workload whose validation is
    the run's own evaluate(): the start loss is the loss a sweep would report."""
    from batchlab.workloads.tasks import Task

    run = Task("teacher-student", noise_every=0)(16, 3e-3, 0)
    for _ in range(5):
        run.train_step()
    work = run.workload()
    before = workload_state(work)
    found = branch_critical_batch(work, [8, 16, 32], base_batch=16, reference_steps=20)
    assert found.start_loss == run.evaluate()["loss"] and found.target_loss < found.start_loss
    assert found.fit is not None
    assert_same_state(before, workload_state(work))


def test_a_batch_above_max_micro_batch_runs_in_accumulation_micro_batches_of_the_same_mean_gradient():
    kwargs = dict(base_batch=16, target_loss=0.45, lr_grid=[1.0], evaluate_every=1, max_steps=60)
    whole = branch_critical_batch(_workload(), [8, 16, 64], **kwargs)
    split = branch_critical_batch(_workload(), [8, 16, 64], max_micro_batch=16, **kwargs)
    assert [(r.micro_batch, r.accumulation) for r in whole.rows] == [(8, 1), (16, 1), (64, 1)]
    assert [(r.micro_batch, r.accumulation) for r in split.rows] == [(8, 1), (16, 1), (16, 4)]
    # the same samples, the mean gradient summed in another order: equal to float rounding, not bitwise
    assert split.rows[2].steps == pytest.approx(whole.rows[2].steps, rel=1e-3)
    assert split.rows[:2] == whole.rows[:2]


def test_a_failure_mid_branch_propagates_and_leaves_the_state_bitwise():
    calls = {"n": 0}

    def flaky(b):
        calls["n"] += 1
        if calls["n"] > 40:  # the checkpoint's 3 steps, then well into the branches
            raise RuntimeError("data loader died")
        index = torch.randint(0, 500, (b,))
        return X[index], Y[index]

    work = _workload(make_batch=flaky)
    before = workload_state(work)
    with pytest.raises(RuntimeError, match="data loader died"):
        branch_critical_batch(work, [8, 16, 32], base_batch=16, target_loss=0.3, lr_grid=[1.0])
    assert_same_state(before, workload_state(work))


def test_trials_are_reported_as_they_run_and_the_result_is_plain_json():
    seen = []
    found = branch_critical_batch(
        _workload(lr=0.16), [8, 16, 32], base_batch=16, reference_steps=10, on_trial=seen.append
    )
    assert seen == [t for row in found.rows for t in row.trials]  # the walk: 3 or more LRs a batch
    assert all(len(row.trials) >= 3 for row in found.rows)
    record = json.loads(json.dumps(found.to_dict()))
    assert record["b_crit"] == found.b_crit and record["fit"]["points"] == 3
    assert record["rows"][0]["trials"][0]["lr_multiplier"] == 1.0
    lines = found.summary().splitlines()
    assert lines[0].startswith("critical batch (branched): B_crit ≈") and len(lines) == 4


def test_the_spent_steps_count_the_reference_run_and_every_branch_step():
    """Evaluated every step, a run of a branch takes ceil(steps to target) steps, or its cap when it never gets
    there (the cap: step_cap, from the best LR so far)."""
    found = branch_critical_batch(_workload(), [8, 16, 32], base_batch=16, reference_steps=10, lr_grid=[1.0, 2.0],
                                  evaluate_every=1)  # fmt: skip
    expected = 10  # the reference run
    for row in found.rows:
        best = None
        for t in row.trials:
            cap = step_cap(60, best, 1, 1)
            expected += math.ceil(t.steps) if t.steps is not None else cap
            best = t.steps if t.steps is not None and (best is None or t.steps < best) else best
    assert found.steps_spent == expected
    assert found.samples_spent > found.steps_spent  # batch >= 8 every step


def test_a_best_lr_at_the_walk_s_bound_is_marked_as_an_upper_bound_and_warned_of():
    """An LR 1000x too small: the walk climbs to its bound (x64) at every batch and stops there, so a faster LR
    may lie beyond; each row says so, and the summary tells the user to set the LR nearer."""
    found = branch_critical_batch(_workload(lr=1e-5), [8, 16, 32], base_batch=16, reference_steps=10)
    assert [row.lr_multiplier for row in found.rows] == [64.0] * 3
    assert all(row.lr_at_edge for row in found.rows) and found.to_dict()["rows"][0]["lr_at_edge"] is True
    assert "warning: at batch 8, 16, 32 the best LR lies at the edge of those tried" in found.summary()
    tuned = branch_critical_batch(
        _workload(lr=0.16), [8, 16, 32], base_batch=16, reference_steps=10
    )  # x16 above
    assert not any(row.lr_at_edge for row in tuned.rows) and "warning" not in tuned.summary()


def test_with_no_three_batches_reaching_the_target_there_is_no_fit_and_the_note_says_why():
    found = branch_critical_batch(_workload(), [8, 16, 32], base_batch=16, target_loss=0.01, max_steps=3,
                                  lr_grid=[1.0])  # fmt: skip
    assert found.fit is None and found.b_crit is None
    assert found.note.startswith("only 0 of 3 batch sizes reached the target: no fit")
    assert "target not reached" in found.summary()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(batch_sizes=[8, 16]),
            ValueError,
            r"batch_sizes \[8, 16\]: fitting B_crit needs at least 3 distinct",
        ),
        (dict(batch_sizes=[8, 8, 16]), ValueError, "at least 3 distinct"),
        (dict(batch_sizes="8,16,32"), TypeError, "batch_sizes must be a sequence of integers"),
        (dict(batch_sizes=[8, 0, 16]), ValueError, r"invalid batch size 0: expected an int >= 1"),
        (dict(base_batch=0), ValueError, r"invalid base_batch 0"),
        (dict(rule="adascale"), ValueError, r"rule 'adascale': expected one of sqrt, linear, none"),
        (dict(lr_grid=[]), ValueError, r"lr_grid \[\]: expected one or more multipliers"),
        (dict(lr_grid=[1.0, -2.0]), ValueError, r"invalid LR multiplier -2.0"),
        (dict(target_loss=-1.0), ValueError, r"invalid target_loss -1.0"),
        (dict(orders=0), ValueError, r"invalid orders 0"),
        (dict(max_micro_batch=0), ValueError, r"invalid max_micro_batch 0"),
        (dict(lr=0.0), ValueError, r"invalid lr 0.0: expected a number > 0"),
        (dict(lr=float("nan")), ValueError, r"invalid lr nan"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_anything_trains(kwargs, error, message):
    work = _workload()
    before = workload_state(work)
    args = {"batch_sizes": [8, 16, 32], "base_batch": 16, **kwargs}
    with pytest.raises(error, match=message):
        branch_critical_batch(work, args.pop("batch_sizes"), **args)
    assert_same_state(before, workload_state(work))


def test_a_target_at_or_above_the_start_is_refused_and_the_state_is_left_bitwise():
    work = _workload()
    before = workload_state(work)
    with pytest.raises(
        ValueError, match=r"target loss 5 is not below the validation loss at the start \(0\.\d+\)"
    ):
        branch_critical_batch(work, [8, 16, 32], base_batch=16, target_loss=5.0)
    assert_same_state(before, workload_state(work))


def test_a_reference_run_that_diverges_is_refused_by_what_diverged_and_the_state_is_left_bitwise():
    calls = {"n": 0}

    def poisoned(b):  # the checkpoint's 3 steps are clean; from the reference run on, the loss is NaN
        calls["n"] += 1
        index = torch.randint(0, 500, (b,))
        return X[index] * (1.0 if calls["n"] <= 3 else math.nan), Y[index]

    work = _workload(make_batch=poisoned)
    before = workload_state(work)
    with pytest.raises(
        ValueError,
        match=r"^the reference run diverged: 10 steps at base_batch 16 and the optimizer's lr 0.01 gave a non-finite",
    ):
        branch_critical_batch(work, [8, 16, 32], base_batch=16, reference_steps=10)
    assert_same_state(before, workload_state(work))


def test_what_is_not_a_workload_with_validation_data_is_refused_in_one_line():
    with pytest.raises(
        TypeError, match="branch_critical_batch trains a batchlab.Workload .* got StepFunction"
    ):
        branch_critical_batch(StepFunction(lambda b: None), [8, 16, 32], base_batch=16)
    work = _workload()
    work.validation = None
    with pytest.raises(WorkloadError, match="without validation data"):
        branch_critical_batch(work, [8, 16, 32], base_batch=16)


def test_a_grid_is_tried_once_each_from_the_rule_s_lr_outwards():
    grid, tried = [0.25, 0.5, 1.0, 2.0, 4.0], []
    while (m := next_multiplier(tried, grid)) is not None:
        tried.append((m, 10.0))
    assert [m for m, _ in tried] == [1.0, 0.5, 2.0, 0.25, 4.0]


# LRs tried: down from 1 the walk tries 2 first; up it never tries 1/2; at the bound 2^6 it stops there.
@pytest.mark.parametrize("best, runs", [(0.125, 6), (1.0, 3), (4.0, 4), (2**6, 7)])
def test_the_walk_climbs_to_the_best_power_of_two_and_stops_with_both_neighbours_slower(best, runs):
    def steps(m):  # a unimodal cost in log2(m), fastest at ``best``
        return 10 + abs(math.log2(m / best))

    tried = []
    while (m := next_multiplier(tried, None)) is not None:
        tried.append((m, steps(m)))
    reached = [(s, m) for m, s in tried if s is not None]
    assert min(reached)[1] == best
    assert {2 * best, best / 2} & {m for m, _ in tried} == {m for m in (2 * best, best / 2) if m <= 2**6}
    assert len(tried) == len(set(tried)) == runs


def test_the_walk_gives_up_after_the_rule_and_both_neighbours_are_unreached():
    tried = []
    while (m := next_multiplier(tried, None)) is not None:
        tried.append((m, None))
    assert [m for m, _ in tried] == [1.0, 2.0, 0.5]


def test_the_cap_stops_only_runs_that_cannot_be_the_best():
    assert step_cap(36, None, orders=3, evaluate_every=1) == 36
    assert step_cap(36, 4.2, orders=3, evaluate_every=2) == 13 + 2
    assert step_cap(36, 20.0, orders=3, evaluate_every=1) == 36


def test_branch_advice_recommends_again_with_the_b_crit_at_the_advice_s_own_lr_base_and_rule():
    """advise --branch's library call: branches at advise's LR, base batch and rule, micro-batches within the
    fit, the same readings recommended with B_crit; without a fit the advice comes back unchanged."""
    import batchlab
    from batchlab.sweeps import branch_advice
    from batchlab.sweeps.branched import MEASURED_BY

    work = _workload()
    advice = batchlab.advise(work, current_batch=16, lr=3e-3, rule="linear", throughput="probes", noise_steps=10,
                             noise_batch=16, max_batch_size=16, device="cpu")  # fmt: skip
    before = workload_state(work)
    found, again = branch_advice(work, advice, [8, 16, 32], reference_steps=10)
    assert_same_state(before, workload_state(work))
    assert (found.base_batch, found.base_lr, found.rule) == (16, 3e-3, "linear") and found.seconds > 0
    assert [(row.micro_batch, row.accumulation) for row in found.rows] == [(8, 1), (16, 1), (16, 2)]
    assert found.b_crit is not None and again.recommendation.noise_scale == found.b_crit
    assert again.recommendation == advice.with_critical_batch(found.b_crit, MEASURED_BY).recommendation
    none, same = branch_advice(work, advice, [8, 16, 32], target_loss=1e-3, reference_steps=5)
    assert none.b_crit is None and same is advice
