"""The profile can time sizes in interleaved rounds (issue 13, item 6; ``rounds=``, one window by default): a
burst of load that covers one size's whole window under one-window timing falls on every size alike, and the
pooled 10th percentile (advise's CPU reading) is a quiet step again. Timings here come from a scripted clock, so
nothing is timed for real."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import batchlab
from batchlab import find_batch_size
from batchlab.advice.pipeline import CPU_STEP_QUANTILE, throughput_curve, throughput_spread
from batchlab.defaults import VERIFY_STEPS, WARMUP_STEPS
from batchlab.devices import SimulatedDevice, allocator_memory
from batchlab.profiling import api as profiling_api
from batchlab.profiling.analysis import DEFAULT_TIMING_ROUNDS, MAX_TIMED_STEPS
from batchlab.profiling.api import profile

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

GiB = 2**30
MiB = 2**20
QUIET = {8: 1.0e-3, 16: 1.2e-3, 32: 1.5e-3}  # seconds per step: 32 has the most samples/s (21333 vs 8000)
SLOWDOWN = 3.0  # a step that starts inside the burst takes 3x: 32 then reads 7111 samples/s, below 8's 8000


class ScriptedClock:
    """``time.perf_counter`` for the profile: it moves only when a step draws its batch, by that size's quiet
    step time -- times :data:`SLOWDOWN` when the step starts inside ``burst`` (other processes' load). ``calls``
    records each step's batch size and start, in order."""

    def __init__(self, burst: tuple[float, float] | None = None):
        self.now = 0.0
        self.burst = burst
        self.calls: list[tuple[int, float]] = []

    def __call__(self) -> float:
        return self.now

    def step(self, batch_size: int) -> None:
        self.calls.append((batch_size, self.now))
        loaded = self.burst is not None and self.burst[0] <= self.now < self.burst[1]
        self.now += QUIET[batch_size] * (SLOWDOWN if loaded else 1.0)


def _workload(clock: ScriptedClock | None = None) -> batchlab.Workload:
    torch.manual_seed(0)
    data = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def make_batch(b):
        if clock is not None:
            clock.step(b)
        index = torch.randint(0, 64, (b,))
        return data[0][index], data[1][index]

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return batchlab.Workload(model, make_batch, nn.functional.cross_entropy,
                             lambda params: torch.optim.Adam(params, lr=1e-3), dataset_size=64)  # fmt: skip


def _profile(monkeypatch, clock: ScriptedClock, rounds: int):
    monkeypatch.setattr(time, "perf_counter", clock)
    # 0.2 s a size (advise's): 30 timed steps of each (the MAX_TIMED_STEPS cap), in one window or 4 of 8
    return profile(
        _workload(clock), device="cpu", batch_sizes=list(QUIET), seconds_per_point=0.2, rounds=rounds
    )


MEMORY_PASS = VERIFY_STEPS * len(QUIET)  # the steps of the memory pass, which come before any timing


def _window(clock: ScriptedClock, batch_size: int) -> tuple[float, float]:
    """When the steps of ``batch_size`` ran in a one-window profile: from its first warm-up step to its last."""
    starts = [t for b, t in clock.calls[MEMORY_PASS:] if b == batch_size]
    return starts[0], starts[-1] + QUIET[batch_size]


def test_a_burst_over_one_window_reverses_the_ranking_and_interleaved_rounds_recover_it(monkeypatch):
    quiet_clock = ScriptedClock()
    quiet = throughput_curve(_profile(monkeypatch, quiet_clock, rounds=1).points, CPU_STEP_QUANTILE)
    assert quiet == pytest.approx({b: b / t for b, t in QUIET.items()}, rel=1e-9)
    assert max(quiet, key=quiet.get) == 32
    # The burst: from batch 32's first step under one-window timing, long enough to cover its whole window
    # slowed (32 steps at 3x) -- the L1/L2 finding, a burst of load as long as one size's window.
    start, end = _window(quiet_clock, 32)
    burst = (start, start + SLOWDOWN * (end - start) + 1e-6)

    one = _profile(monkeypatch, ScriptedClock(burst), rounds=1)
    one_window = throughput_curve(one.points, CPU_STEP_QUANTILE)
    assert one_window[8] == pytest.approx(quiet[8]) and one_window[16] == pytest.approx(quiet[16])
    assert one_window[32] == pytest.approx(quiet[32] / SLOWDOWN)  # every step of 32 slowed: no quantile helps
    assert sorted(one_window, key=one_window.get) == [32, 8, 16]  # the ranking reversed: 32 now the slowest
    low, high = throughput_spread(one.points, CPU_STEP_QUANTILE)[32]
    assert high < quiet[32]  # and its interval does not hold the quiet value either

    clock = ScriptedClock(burst)
    rounds = _profile(monkeypatch, clock, rounds=4)
    assert all(p.rounds == 4 and len(p.step_times) == 4 * 8 for p in rounds.points)  # ceil(30 / 4) a round
    interleaved = throughput_curve(rounds.points, CPU_STEP_QUANTILE)
    assert interleaved == pytest.approx(quiet, rel=1e-9)  # the pooled 10th percentile is a quiet step
    assert sorted(interleaved, key=interleaved.get) == [8, 16, 32]
    for p in rounds.points:  # the same burst hit every size this time, in the later rounds
        assert max(p.step_times) == pytest.approx(SLOWDOWN * QUIET[p.batch_size])
        assert sum(t > 2 * QUIET[p.batch_size] for t in p.step_times) >= 8
    spread = throughput_spread(rounds.points, CPU_STEP_QUANTILE)
    for b, (low, high) in spread.items():  # the interval is the quiet steps' too (they are identical here)
        assert low == pytest.approx(quiet[b], rel=1e-9) and high == pytest.approx(quiet[b], rel=1e-9)


def test_rounds_are_round_robin_smallest_first_each_a_share_of_the_steps(monkeypatch):
    clock = ScriptedClock()
    result = _profile(monkeypatch, clock, rounds=3)
    runs = []  # consecutive steps of one size, as (size, count)
    for b, _ in clock.calls:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    per_window = WARMUP_STEPS + 10  # then ceil(30 / 3) timed
    memory = [[b, VERIFY_STEPS] for b in (8, 16, 32)]  # each size's peak, before anything is timed
    assert runs == memory + [[b, per_window] for _ in range(3) for b in (8, 16, 32)]
    assert all(p.rounds == 3 and len(p.step_times) == 30 for p in result.points)


def test_later_rounds_time_only_what_fitted_and_keep_the_fit_search(monkeypatch):
    """On a simulated device (one ``runs`` entry per device run): the search, then one memory run of every
    planned size the search did not probe -- the one over the edge running out of memory -- then rounds 1 to 3
    over the sizes that fitted, a warm-up and a timed run each; verdicts and peaks are the memory pass's."""
    memory = allocator_memory(GiB, 10 * MiB)
    device = SimulatedDevice(memory, 16 * GiB)
    one = profile(lambda b: None, device=SimulatedDevice(memory, 16 * GiB), seconds_per_point=0)
    result = profile(lambda b: None, device=device, seconds_per_point=0, rounds=3)
    fitting = [p.batch_size for p in result.points if p.fits]
    search_device = SimulatedDevice(memory, 16 * GiB)
    find_batch_size(lambda b: None, device=search_device)
    search = len(search_device.runs)
    assert device.runs[:search] == search_device.runs
    unsearched = [p.batch_size for p in result.points if p.memory_source == "profile run"]
    assert unsearched[-1] == 1 << result.fits["fp32"].batch_size.bit_length()
    assert device.runs[search:] == unsearched + [x for _ in range(3) for b in fitting for x in (b, b)]
    for p, q in zip(result.points, one.points):
        assert (p.batch_size, p.outcome, p.peak_bytes, p.memory_source) == (
            q.batch_size, q.outcome, q.peak_bytes, q.memory_source,
        )  # fmt: skip
        assert p.rounds == (3 if p.fits else 1) and len(p.step_times) == (3 if p.fits else 0)
    assert one.points and all(p.rounds == 1 for p in one.points)  # one window by default


@pytest.mark.parametrize(
    ("rounds", "match"),
    [
        (0, r"invalid rounds 0: expected an int >= 1 or None"),
        (-2, r"invalid rounds -2: expected an int >= 1 or None"),
        (2.5, r"invalid rounds 2.5: expected an int >= 1 or None"),
        (True, r"invalid rounds True: expected an int >= 1 or None"),
        ("4", r"invalid rounds '4': expected an int >= 1 or None"),
        (
            MAX_TIMED_STEPS + 1,
            rf"invalid rounds {MAX_TIMED_STEPS + 1}: expected an int from 1 to {MAX_TIMED_STEPS}",
        ),
    ],
)
def test_bad_rounds_fail_before_anything_runs(rounds, match):
    device = SimulatedDevice(lambda b: MiB, GiB)
    with pytest.raises(ValueError, match=match):
        profile(_workload(), device=device, rounds=rounds)
    assert device.runs == []
    with pytest.raises(ValueError, match=match):
        batchlab.advise(_workload(), device=device, rounds=rounds)
    assert device.runs == []


def test_advise_refuses_rounds_with_the_probes_it_does_not_time():
    with pytest.raises(
        ValueError, match=r"rounds 4 times batch sizes for throughput 'profile'; throughput 'probes'"
    ):
        batchlab.advise(_workload(), throughput="probes", rounds=4)


def test_state_is_restored_bitwise_after_interleaved_rounds():
    work = _workload()
    work.step(8)  # optimizer state and gradients exist: they must come back as they were, too
    model = {k: v.clone() for k, v in work.model.state_dict().items()}
    grads = [p.grad.clone() for p in work.model.parameters()]
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(work.optimizer.state.values())}
    rng = torch.get_rng_state()
    result = profile(work, device="cpu", batch_sizes=[4, 8, 16], seconds_per_point=0, rounds=3)
    assert all(p.rounds == 3 for p in result.points)
    assert all(torch.equal(model[k], v) for k, v in work.model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, work.model.parameters()))
    after = list(work.optimizer.state.values())
    assert all(torch.equal(v, after[i][k]) for i, s in moments.items() for k, v in s.items())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize(("rounds", "expected"), [(None, DEFAULT_TIMING_ROUNDS), (2, 2), (1, 1)])
def test_advise_passes_rounds_to_the_profile_it_reads(monkeypatch, rounds, expected):
    real, seen = profiling_api.profile, []

    def spy(*args, **kwargs):
        seen.append(kwargs["rounds"])
        return real(*args, **kwargs)

    monkeypatch.setattr(profiling_api, "profile", spy)
    advice = batchlab.advise(_workload(), current_batch=16, max_batch_size=32, noise_steps=12,
                             seconds_per_point=0, device="cpu", rounds=rounds)  # fmt: skip
    assert seen == [rounds]
    pooled = f"pooled over {expected} interleaved rounds"
    assert (pooled in advice.throughput_detail) == (expected > 1), advice.throughput_detail


def test_a_point_records_its_rounds_in_its_dict():
    point = profile(lambda b: None, device=SimulatedDevice(lambda b: MiB, GiB), batch_sizes=[2],
                    seconds_per_point=0, rounds=2).points[0]  # fmt: skip
    assert (
        point.to_dict()["rounds"] == 2 and len(point.to_dict()["step_times"]) == 2 * 2
    )  # ceil(3 / 2) a round
