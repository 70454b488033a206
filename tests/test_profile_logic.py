"""The profile's pure math, and its run sequence on a simulated device: reuse of the search, exact and fast."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from batchlab import Workload, find_batch_size
from batchlab.defaults import WARMUP_STEPS
from batchlab.devices import SimulatedDevice, allocator_memory
from batchlab.profiling.analysis import (
    MAX_TIMED_STEPS,
    MIN_TIMED_STEPS,
    default_batch_sizes,
    knee_batch_size,
    memory_per_sample,
    small_batch_scaling,
    summarize_variant,
    timed_steps_for,
)
from batchlab.profiling.api import profile
from batchlab.profiling.findings import findings
from batchlab.profiling.records import MemorySource, PointOutcome, ProfilePoint

GiB = 2**30
MiB = 2**20


def noop(batch_size: int) -> None:
    return None


# ---- pure math ---------------------------------------------------------------------------------------------


def test_knee_is_the_smallest_batch_reaching_the_threshold():
    sizes = [1, 2, 4, 8, 16, 32]
    speed = [100, 190, 350, 560, 600, 610]
    assert knee_batch_size(sizes, speed, 0.95) == 16  # 600 >= 0.95 * 610 = 579.5; 560 is not
    assert knee_batch_size(sizes, speed, 0.90) == 8  # 560 >= 549
    assert knee_batch_size(sizes, speed, 1.0) == 32
    assert knee_batch_size([4, 8], [None, 0.0]) is None
    assert knee_batch_size([], []) is None


def test_knee_when_throughput_falls_after_a_peak():
    # A falling tail (cache or allocator effects) does not move the knee past the peak.
    assert knee_batch_size([8, 16, 32, 64], [500, 980, 1000, 700], 0.95) == 16


def test_knee_defaults_to_the_shared_threshold_and_refuses_one_outside_0_1():
    # 0.95 from batchlab.defaults: 600 >= 0.95 * 610, 560 is not.
    assert knee_batch_size([8, 16, 32], [560, 600, 610]) == 16
    with pytest.raises(ValueError, match=r"invalid threshold 1.5: expected a number in \(0, 1\]"):
        knee_batch_size([1, 2], [1.0, 2.0], 1.5)
    with pytest.raises(ValueError, match="invalid threshold 0: expected a number in"):
        knee_batch_size([1, 2], [1.0, 2.0], 0)


def test_outcomes_are_str_enums_that_print_and_serialise_as_their_strings():
    point = ProfilePoint("fp32", "fp32", False, 8, "over budget", 10 * MiB, None, "profile run")
    assert point.outcome is PointOutcome.OVER_BUDGET and point.memory_source is MemorySource.PROFILE_RUN
    assert point.outcome == "over budget" and not point.fits
    assert f"{point.outcome:<12}|{point.memory_source}" == "over budget |profile run"
    data = point.to_dict()
    assert type(data["outcome"]) is str and json.loads(json.dumps(data))["outcome"] == "over budget"
    assert data["memory_source"] == "profile run"
    with pytest.raises(ValueError, match="'fit' is not a valid PointOutcome"):
        ProfilePoint("fp32", "fp32", False, 8, "fit", None, None, "profile run")


def test_memory_per_sample_uses_the_larger_sizes_like_the_search():
    sizes = [1, 2, 64, 128, 256]
    # 1 and 2 are off the line (their kernels differ); 64..256 lie on 100 MiB + 3 MiB/sample.
    peaks = [500 * MiB, 510 * MiB] + [100 * MiB + 3 * MiB * b for b in (64, 128, 256)]
    fixed, slope = memory_per_sample(sizes, peaks)
    assert slope == pytest.approx(3 * MiB)
    assert fixed == pytest.approx(100 * MiB)
    assert memory_per_sample([8], [1.0]) is None
    # Fewer than two sizes in the window: the two largest.
    assert memory_per_sample([1, 101], [10, 210])[1] == pytest.approx(2.0)


def test_timed_steps_adapt_to_the_step_time():
    assert timed_steps_for(0.001, 1.0) == MAX_TIMED_STEPS  # a fast step: the cap
    assert timed_steps_for(0.1, 1.0) == 10
    assert timed_steps_for(5.0, 1.0) == MIN_TIMED_STEPS  # a slow step: the floor
    assert timed_steps_for(0.1, 0.0) == MIN_TIMED_STEPS
    assert timed_steps_for(0.0, 1.0) == MAX_TIMED_STEPS


def test_default_sizes_are_powers_of_two_from_the_smallest_probe_plus_the_answer():
    assert default_batch_sizes(27, smallest=2) == [2, 4, 8, 16, 27]
    assert default_batch_sizes(32, smallest=2) == [2, 4, 8, 16, 32]
    assert default_batch_sizes(3, smallest=1) == [1, 2, 3]
    assert default_batch_sizes(24, smallest=8) == [8, 16, 24]


def test_small_batch_scaling():
    # Constant step time: throughput grows with the batch, efficiency 1.
    assert small_batch_scaling([1, 2, 4, 8], [10, 20, 40, 80]) == (1, 4, 1.0)
    # Flat throughput (compute-bound from the start): efficiency 1/4 over a 4x span.
    b0, b1, efficiency = small_batch_scaling([2, 4, 8, 16], [50, 51, 52, 52])
    assert (b0, b1) == (2, 8) and efficiency == pytest.approx(52 / 50 / 4)
    assert small_batch_scaling([8], [1.0]) is None


def _points(variant, precision, ckpt, rows):
    """rows: (batch, outcome, peak MiB, ms per step or None)."""
    points = []
    for b, outcome, peak, ms in rows:
        seconds = ms / 1e3 if ms else None
        points.append(
            ProfilePoint(
                variant, precision, ckpt, b, outcome, int(peak * MiB), None, "profile run",
                seconds, b / seconds if seconds else None,
            )
        )  # fmt: skip
    return points


def test_findings_in_plain_words():
    off = _points(
        "fp32", "fp32", False,
        [(64, "fits", 300, 100), (128, "fits", 500, 190), (256, "fits", 900, 370), (512, "over budget", 1700, None)],
    )  # fmt: skip
    on = _points(
        "fp32+ckpt", "fp32", True,
        [(64, "fits", 150, 130), (128, "fits", 200, 250), (256, "fits", 300, 481), (512, "fits", 500, 960)],
    )  # fmt: skip
    variants = [
        summarize_variant("fp32", "fp32", False, off, fit_batch_size=256),
        summarize_variant("fp32+ckpt", "fp32", True, on, fit_batch_size=512),
    ]
    assert variants[0].knee_batch == 128  # 673.7 >= 0.95 * 691.9
    assert variants[0].largest_fitting_batch == 256
    assert variants[0].bytes_per_sample == pytest.approx((900 - 300) / (256 - 64) * MiB)
    assert variants[1].bytes_per_sample < variants[0].bytes_per_sample
    lines, warnings = findings(variants, off + on, budget_bytes=1000 * MiB)
    text = "\n".join(lines)
    assert "most samples/s within the 1000.00 MiB budget: fp32 at batch 256" in text
    assert (
        "checkpointing (fp32) lets batch 512 fit (largest without: 256) at 1.30x the step time (batch 256)"
        in text
    )
    # The step time grows almost with the batch from 64 on: flat throughput, said once per variant.
    assert len(warnings) == 2 and all("expected on a CPU" in w for w in warnings)


def test_findings_compare_precisions_and_warn_on_flat_small_batches():
    fp32 = _points("fp32", "fp32", False, [(2, "fits", 100, 20), (4, "fits", 110, 40), (8, "fits", 130, 80)])
    bf16 = _points("bf16", "bf16", False, [(2, "fits", 100, 10), (4, "fits", 105, 10), (8, "fits", 115, 10)])
    variants = [
        summarize_variant("fp32", "fp32", False, fp32),
        summarize_variant("bf16", "bf16", False, bf16),
    ]
    lines, warnings = findings(variants, fp32 + bf16, budget_bytes=GiB, device_type="cuda")
    assert any(line.startswith("bf16 vs fp32: 8.00x the samples/s at batch 8") for line in lines)
    # fp32's throughput is flat from 2 to 8 (the step time grows with the batch): warned; bf16's is not.
    assert len(warnings) == 1 and warnings[0].startswith("fp32: throughput grows only 1.0x from batch 2 to 8")
    assert "input loading" in warnings[0]


# ---- the run sequence on a simulated device ------------------------------------------------------------------


def test_profile_reuses_the_search_and_runs_each_size_once():
    memory = allocator_memory(GiB, 10 * MiB)
    search_device = SimulatedDevice(memory, 16 * GiB)
    fit = find_batch_size(noop, device=search_device)
    device = SimulatedDevice(memory, 16 * GiB)
    result = profile(noop, device=device, seconds_per_point=0)
    search_runs = device.runs[: len(search_device.runs)]
    assert search_runs == search_device.runs  # the same search, once
    timed = default_batch_sizes(fit.batch_size, smallest=min(p.batch_size for p in fit.probes if p.fits))
    above = 1 << fit.batch_size.bit_length()  # the next power of two: one run, out of memory
    probes = {p.batch_size: p for p in fit.probes}
    # After the search: one memory run of each size it did not probe, then every fitting size's warm-up run
    # and timed run -- nothing else and no second search.
    memory = [b for b in timed if b not in probes] + [above]
    assert device.runs[len(search_runs) :] == memory + [x for b in timed for x in (b, b)]
    for point in result.points:
        if point.batch_size in probes:
            assert point.memory_source == "fit search"
            assert point.peak_bytes == probes[point.batch_size].peak_bytes
        else:
            assert point.memory_source == "profile run"
    assert [p.batch_size for p in result.points] == timed + [above]
    assert result.points[-1].outcome == "oom" and not result.points[-1].fits
    assert [p.fit_answer for p in result.points].count(True) == 1
    assert (
        result.variant("fp32").fit_batch_size
        == fit.batch_size
        == result.variant("fp32").largest_fitting_batch
    )
    assert result.fits["fp32"].batch_size == fit.batch_size


def test_search_failures_are_reported_without_running_them_again():
    # A memory jump just above the line's prediction makes the search fail once before it settles.
    memory = allocator_memory(GiB, 10 * MiB, jumps={1300: 2 * GiB})
    device = SimulatedDevice(memory, 16 * GiB)
    result = profile(noop, device=device, seconds_per_point=0)
    failed = [p for p in result.fits["fp32"].probes if not p.fits]
    assert failed, "the jump should make the search overshoot once"
    for probe in failed:
        assert device.runs.count(probe.batch_size) == 1  # run by the search only
        point = next(p for p in result.points if p.batch_size == probe.batch_size)
        assert not point.fits and point.memory_source == "fit search" and point.outcome == probe.outcome


def test_explicit_sizes_skip_everything_above_a_failure():
    device = SimulatedDevice(allocator_memory(GiB, 10 * MiB), 16 * GiB)
    result = profile(noop, device=device, batch_sizes=[4096, 512, 1024, 2048], seconds_per_point=0)
    # No search: each size's memory run (4096 never runs), then the fitting ones timed.
    assert device.runs == [512, 1024, 2048, 512, 512, 1024, 1024]
    assert [(p.batch_size, p.outcome) for p in result.points] == [
        (512, "fits"), (1024, "fits"), (2048, "oom"), (4096, "skipped"),
    ]  # fmt: skip
    assert all(p.memory_source == "profile run" for p in result.points)
    fitting = [p for p in result.points if p.fits]
    assert all(len(p.step_times) >= MIN_TIMED_STEPS and p.warmup_steps == WARMUP_STEPS for p in fitting)


def test_a_variant_whose_smallest_size_does_not_fit():
    device = SimulatedDevice(lambda b: 20 * GiB, 16 * GiB)
    result = profile(noop, device=device, seconds_per_point=0)
    assert result.best is None and result.fits["fp32"] is None
    assert all(not p.fits for p in result.points)
    assert "does not fit" in result.summary()


# ---- validation before anything runs, and restoration after a failure ----------------------------------------


def _blocks_workload(fail_at: int | None = None) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, 3),
    )

    def make_batch(b: int):
        if b == fail_at:
            raise RuntimeError(f"shape bug at batch {b}")
        return torch.randn(b, 8), torch.randint(0, 3, (b,))

    return Workload(model, make_batch, nn.functional.cross_entropy, lambda p: torch.optim.Adam(p, lr=1e-2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(precisions=["fp64"]), "invalid amp"),
        (dict(checkpointing="yes"), "invalid checkpointing"),
        (dict(batch_sizes=[0, 4]), "invalid batch_sizes"),
        (dict(knee_threshold=1.5), "invalid knee_threshold"),
        (
            dict(seconds_per_point=float("inf")),
            r"invalid seconds_per_point inf: expected a number >= 0 \(seconds\)",
        ),
        (dict(max_batch_size=0), "invalid max_batch_size 0: expected an int >= 1 or None"),
        (dict(fraction=1.5), "invalid memory fraction"),
        (dict(checkpoint_modules=[nn.Linear(2, 2)]), "needs checkpointing=True"),
        (dict(checkpointing=True, checkpoint_modules=[nn.Linear(2, 2)]), "not part of the model"),
        (dict(memory_budget="4 potatoes"), "invalid byte size"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(kwargs, match):
    device = SimulatedDevice(lambda b: MiB, GiB)
    with pytest.raises(ValueError, match=match):
        profile(_blocks_workload(), device=device, **kwargs)
    assert device.runs == []


def test_a_plain_step_callable_is_fp32_only():
    with pytest.raises(ValueError, match="need a batchlab.Workload"):
        profile(noop, device=SimulatedDevice(lambda b: MiB, GiB), precisions="bf16")


def test_state_and_patches_are_restored_when_a_step_raises():
    work = _blocks_workload(fail_at=8)
    before = {k: v.clone() for k, v in work.model.state_dict().items()}
    rng = torch.get_rng_state()
    blocks = [work.model[1], work.model[2]]
    with pytest.raises(RuntimeError, match="shape bug at batch 8"):
        profile(
            work,
            device=SimulatedDevice(lambda b: MiB, GiB),
            batch_sizes=[2, 4, 8],
            checkpointing=True,  # the failure comes while the blocks are patched
            seconds_per_point=0,
        )
    after = work.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert work.optimizer.state == {} and all(p.grad is None for p in work.model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert all("forward" not in block.__dict__ for block in blocks)


def test_profile_to_dict_is_json_ready():
    result = profile(
        noop, device=SimulatedDevice(allocator_memory(GiB, 10 * MiB), 4 * GiB), seconds_per_point=0
    )
    data = json.loads(result.to_json())
    assert data["variants"][0]["variant"] == "fp32"
    assert {p["batch_size"] for p in data["points"]} == {p.batch_size for p in result.points}
    assert math.isclose(data["knee_threshold"], 0.95)
