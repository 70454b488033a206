"""The search over batch shapes (issue 12): one verified answer per length or image size, fewer probes than
one search per shape, bad shape lists refused in one line, and the pure pieces (the peak model, the prior)."""

from __future__ import annotations

import hashlib
import math
import random
import re
import statistics

import pytest
import torch
from rich.console import Console
from torch import nn

from batchlab import DoesNotFitError, Workload, find_batch_size
from batchlab.checks import shapes as check_shapes
from batchlab.cli.common import print_table_footer
from batchlab.devices import CPUDevice, SimulatedDevice
from batchlab.fit import MemoryLine, Probe
from batchlab.fit.peak_model import fit_fixed_part, fit_peak_model
from batchlab.fit.records import Outcome
from batchlab.fit.shape_decision import (
    PRIOR_BACKOFF,
    PRIOR_PREDICTION,
    TABLE_TOLERANCE,
    ShapeGuide,
    accepts,
    conservative,
    credible_slopes,
    next_shape_candidate,
    planned_noise,
    reading_noise,
)
from batchlab.fit.shapes import ShapeTable, search_order
from batchlab.planning import estimate_memory_lines
from conftest import in_a_fresh_process

MiB = 2**20
GiB = 2**30


# ------------------------------------------------------------------------------------------ simulated memory


def shaped_memory(
    fixed: float, alpha: float, beta: float, block: int = 2 * MiB, noise: float = 0.0, shared: float = 0.0
):
    """``memory(b)`` of a step whose batch shape the step itself sets: fixed + shared L^2 + b (alpha L + beta L^2)
    (``shared``: an ``L x L`` tensor the whole batch shares, as a float attention mask), times
    ``1 + noise * u`` with ``u`` in [-1, 1] repeatable per (shape, b) (as ``allocator_memory``'s), rounded up
    to ``block``. ``truth(shape, budget)``: the largest b that fits, by scanning every b (noise can make a
    size fit above one that does not)."""
    current: dict[str, object] = {}

    def step(batch_size: int, shape=None) -> None:
        current["shape"] = shape

    def memory(batch_size: int) -> int:
        shape = current["shape"]
        length = shape if isinstance(shape, int) else math.prod(shape)
        value = fixed + shared * length**2 + batch_size * (alpha * length + beta * length**2)
        if noise:
            digest = hashlib.blake2b(f"{shape}:{batch_size}".encode(), digest_size=8).digest()
            value *= 1 + noise * (int.from_bytes(digest, "little") / 2**64 * 2 - 1)
        return int(math.ceil(value / block) * block)

    def truth(shape, budget: int) -> int:
        current["shape"] = shape
        return max(b for b in range(1, 100_000) if memory(b) <= budget)

    return step, memory, truth


@pytest.mark.parametrize(
    ("fixed", "alpha", "beta", "capacity"),
    [
        (2 * GiB, 400_000.0, 0.0, 16 * GiB),  # linear in L: an MLP over tokens
        (4 * GiB, 300_000.0, 300.0, 40 * GiB),  # attention's L^2 about as large as the rest at L = 1000
        (10 * GiB, 50_000.0, 2_000.0, 80 * GiB),  # L^2 dominant
    ],
)
def test_every_shape_gets_its_true_maximum_for_fewer_probes_than_one_search_per_shape(
    fixed, alpha, beta, capacity
):
    step, memory, truth = shaped_memory(fixed, alpha, beta)
    device = SimulatedDevice(memory, capacity)
    shapes = [128, 256, 512, 1024, 2048]
    table = find_batch_size(step, device=device, shapes=shapes)
    assert isinstance(table, ShapeTable)
    assert [entry.shape for entry in table.entries] == shapes
    for entry in table.entries:  # each answer ran in full at its own shape, within the budget
        answer = [p for p in entry.result.probes if p.batch_size == entry.batch_size][-1]
        assert answer.verified and answer.fits and answer.peak_bytes <= table.budget_bytes
        true_max = truth(entry.shape, table.budget_bytes)
        assert (1 - TABLE_TOLERANCE) * true_max <= entry.batch_size <= true_max
    singles = []
    for shape in shapes:
        single = find_batch_size(lambda b, s=shape: step(b, shape=s), device=device)
        assert single.batch_size == truth(shape, table.budget_bytes)  # the single search: to the sample
        singles.append(len(single.probes))
    assert table.probes < sum(singles)
    predicted = [e for e in table.entries if e.shape not in table.order[:2]]  # interpolated by the model
    assert all(len(e.result.probes) <= 2 for e in predicted)
    # fitted over every shape: each one's slope through the fixed part of the first shape's wide line
    assert table.model is not None and table.model.lengths == tuple(shapes)


def test_the_table_is_searched_longest_first_then_shortest_then_inwards():
    assert search_order([128, 256, 512, 1024, 2048]) == [2048, 128, 1024, 512, 256]
    assert search_order([(320, 320), (640, 480), (640, 640)]) == [(640, 640), (320, 320), (640, 480)]
    assert search_order([64]) == [64]


def test_the_table_says_what_it_measured_as_plain_data():
    step, memory, _ = shaped_memory(2 * GiB, 20_000.0, 0.0)
    table = find_batch_size(step, device=SimulatedDevice(memory, 16 * GiB), shapes=[(64, 64), (128, 128)])
    data = table.to_dict()
    assert [e["shape"] for e in data["entries"]] == [[64, 64], [128, 128]]
    assert data["entries"][0]["length"] == 64 * 64
    assert data["entries"][0]["tokens_per_batch"] == data["entries"][0]["batch_size"] * 64 * 64
    assert data["entries"][0]["predicted_batch_size"] is not None  # the shorter one came second, predicted
    assert data["probes"] == sum(len(e["result"]["probes"]) for e in data["entries"])
    assert set(data["model"]) == {"fixed_bytes", "alpha", "beta", "lengths", "fixed_per_length2"}
    assert table.to_json() and "shape (64, 64): batch" in table.summary()


def test_the_table_footer_writes_the_fitted_model_with_its_shared_part():
    step, memory, _ = shaped_memory(687 * MiB, 11_600.0, 2.0, block=64 * 1024, shared=8.0)
    table = find_batch_size(step, device=SimulatedDevice(memory, 960 * MiB), shapes=[128, 512, 2048])
    console = Console(record=True, width=200)
    print_table_footer(console, table, estimated=False)
    assert re.search(
        r"peak\(b, L\) = \S+ MiB \+ (7\.9|8\.0)\d* L\^2 \+ b x \(1\.1\d+e\+04 L", console.export_text()
    )


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ([], r"invalid shapes \[\]: expected a non-empty list"),
        ([256, 128], r"\(128 after 256\)"),
        ([128, 128], r"\(128 after 128\)"),
        ([128, 0], r"invalid shape in shapes 0"),
        ([-5], r"invalid shape in shapes -5"),
        ([True], r"invalid shape in shapes True"),
        ([128, (16, 16)], r"shapes of one kind"),
        ([(16, 0)], r"invalid shape in shapes \(16, 0\)"),
        ("128", r"invalid shapes '128'"),
    ],
)
def test_a_bad_shape_list_is_one_line_naming_the_value(shapes, match):
    with pytest.raises(ValueError, match=match):
        check_shapes("shapes", shapes)
    step, memory, _ = shaped_memory(GiB, 1e5, 0.0)
    device = SimulatedDevice(memory, 8 * GiB)
    with pytest.raises(ValueError, match=match):
        find_batch_size(step, device=device, shapes=shapes)
    assert device.runs == []  # refused before anything ran


def tiny_sequence_workload(max_length: int = 64) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))

    def make_batch(batch_size: int, shape: int = 16):
        if shape > max_length:
            raise ValueError(f"no sequence longer than {max_length} tokens")
        tokens = torch.randint(0, 50, (batch_size, shape))
        return tokens, tokens

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1))

    return Workload(model, make_batch, loss_fn, lambda p: torch.optim.Adam(p), name="tiny-seq")


def test_a_shape_the_workload_cannot_build_is_one_line_naming_it_and_keeps_the_rng():
    workload = tiny_sequence_workload(max_length=64)
    rng = torch.get_rng_state()
    with pytest.raises(
        ValueError, match=r"cannot build shape 128: .* ValueError: no sequence longer than 64"
    ):
        find_batch_size(workload, device="cpu", shapes=[32, 128])
    assert torch.equal(torch.get_rng_state(), rng)  # the trial batch's draws were given back


def test_a_make_batch_without_a_shape_parameter_is_one_line():
    workload = Workload(nn.Linear(4, 2), lambda b: (torch.randn(b, 4), torch.randn(b, 2)), nn.functional.mse_loss,
                        lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    with pytest.raises(TypeError, match=r"shape 128 needs make_batch\(batch_size, shape=...\)"):
        workload.with_shape(128)
    with pytest.raises(TypeError, match=r"shape 128 needs step\(batch_size, shape=...\)"):
        find_batch_size(lambda b: None, device=SimulatedDevice(lambda b: b, 100), shapes=[128])


def test_with_shape_passes_the_shape_and_other_commands_keep_the_default():
    workload = tiny_sequence_workload()
    inputs, _ = workload.next_batch(3)
    assert inputs.shape == (3, 16)  # the default: what profile, noise and sweep see
    shaped = workload.with_shape(40)
    assert shaped.next_batch(3)[0].shape == (3, 40) and shaped.shape == 40
    assert shaped.model is workload.model and shaped.optimizer is workload.optimizer
    assert shaped.with_amp("bf16").shape == 40


# ------------------------------------------------------------------------------------- a real step on the CPU


WIDTH, VOCAB = 32, 64


class TinyAttention(nn.Module):
    """Embedding, one attention layer (its L^2 scores), a head over the vocabulary: a language model in small."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(x + self.attention(x, x, x, need_weights=False)[0])


def tiny_attention_workload() -> Workload:
    """The shape-aware workload of these tests (and of the CLI's and plan's: ``tests/test_shapes.py:...``)."""
    torch.manual_seed(0)

    def make_batch(batch_size: int, shape: int = 32):
        tokens = torch.randint(0, VOCAB, (batch_size, shape))
        return tokens, tokens

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    return Workload(
        TinyAttention(), make_batch, loss_fn, lambda p: torch.optim.Adam(p), name="tiny-attention"
    )


def test_a_real_cpu_table_is_verified_and_leaves_the_state_as_it_was():
    workload = tiny_attention_workload()
    model = workload.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    budget = int((CPUDevice().in_use_bytes() + 40 * MiB) / 0.9)
    table = find_batch_size(workload, device="cpu", memory_budget=budget, shapes=[64, 128, 256])
    sizes = table.max_batch_by_shape()
    assert sizes[64] > sizes[128] > sizes[256] >= 2
    for entry in table.entries:
        assert entry.fits and entry.result.peak_bytes <= table.budget_bytes
        assert entry.result.probes[-1].verified or any(
            p.verified and p.batch_size == entry.batch_size for p in entry.result.probes
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and model.embed.weight.grad is None
    assert workload.optimizer.state == {}


# ------------------------------------------------------------------------------------------- the pure pieces


def test_the_peak_model_recovers_both_coefficients_from_two_lengths():
    def line(length, alpha=1000.0, beta=3.0):
        return length, MemoryLine(5e8, alpha * length + beta * length**2)

    model = fit_peak_model([line(128), line(2048)])
    assert model.alpha == pytest.approx(1000.0) and model.beta == pytest.approx(3.0)
    assert model.peak(10, 512) == pytest.approx(5e8 + 10 * (1000 * 512 + 3 * 512**2))
    assert fit_peak_model([line(128), line(512), line(2048)]).beta == pytest.approx(3.0)
    one = fit_peak_model([line(256)])
    assert one.beta == 0 and one.alpha == pytest.approx(1000 + 3 * 256)  # one length: linear
    shrinking = fit_peak_model([(128, MemoryLine(0, 2000.0 * 128)), (1024, MemoryLine(0, 1000.0 * 1024))])
    assert shrinking.beta == 0 and shrinking.alpha > 0  # never a negative coefficient
    assert fit_peak_model([(128, MemoryLine(0, 0.0))]) is None


def test_the_fixed_part_grows_as_l_squared_only_where_the_intercepts_show_it_beyond_their_noise():
    grown = fit_fixed_part([(2048, 719 * MiB, 0.1 * MiB), (128, 687 * MiB + 8 * 128**2, 0.7 * MiB)])
    assert grown[1] == pytest.approx(8.0, rel=0.01) and grown[0] == pytest.approx(687 * MiB, rel=1e-4)
    assert (
        fit_fixed_part([(2048, 719 * MiB, 20 * MiB), (128, 687 * MiB, 20 * MiB)]) is None
    )  # inside the noise
    assert fit_fixed_part([(2048, 687 * MiB, 0.1 * MiB), (128, 719 * MiB, 0.1 * MiB)]) is None  # shrinking
    assert fit_fixed_part([(512, 687 * MiB, 0.0), (512, 690 * MiB, 0.0)]) is None  # one length
    model = fit_peak_model([(128, MemoryLine(0, 1000.0 * 128))], fixed=(5e8, 8.0))
    assert model.line(1024).fixed_bytes == pytest.approx(5e8 + 8 * 1024**2)


def test_a_fixed_part_that_grows_with_the_length_is_fitted_and_each_shape_between_costs_one_probe():
    """A step that holds one ``L x L`` tensor for the whole batch (``nn.MultiheadAttention``'s float mask: 4 bytes
    x L^2 per block, two blocks) -- benchmarks/shapes.py's byte LM, whose intercept at 2048 sat 32 MiB over the one
    at 128. With one fixed part for every length the slopes through it ran 20% low at the shorter shapes, and
    the shapes between took 1, 2 and 3 probes (14 in all); with the growth fitted, one each (11)."""
    step, memory, truth = shaped_memory(687 * MiB, 11_600.0, 2.0, block=64 * 1024, shared=8.0)
    device = SimulatedDevice(memory, 960 * MiB)
    table = find_batch_size(step, device=device, shapes=[128, 256, 512, 1024, 2048])
    assert table.model.fixed_per_length2 == pytest.approx(8.0, rel=0.05)
    for entry in table.entries:
        assert (1 - TABLE_TOLERANCE) * truth(entry.shape, table.budget_bytes) <= entry.batch_size
    between = [e for e in table.entries if e.shape not in table.order[:2]]
    assert [len(e.result.probes) for e in between] == [1, 1, 1]


def byte_lm_plan(shapes, slope_error: float = 1.0, mask: float = 8.0) -> dict[int, MemoryLine]:
    """What fake tensors estimate for the simulated byte LM of the test above: its tensors only (3 MiB of state and
    the mask), no process; ``slope_error`` scales every slope (a plan off by that factor), ``mask`` the ``L^2``."""
    return {length: MemoryLine(3 * MiB + mask * length**2, slope_error * (11_600.0 * length + 2.0 * length**2))
            for length in shapes}  # fmt: skip


@pytest.mark.parametrize(
    ("slope_error", "mask", "probes"),
    [(1.0, 8.0, 7), (0.8, 8.0, 8), (1.25, 8.0, 8), (1.0, 0.0, 8)],
    ids=["exact", "slopes 20% low", "slopes 25% high", "the mask left out"],
)
def test_a_table_seeded_from_a_plan_predicts_the_second_shape_and_every_entry_holds(
    slope_error, mask, probes
):
    """``estimate={shape: line}``: the first shape goes from batch 2 straight to where the planned slope puts the
    budget (no 8x growth), the second is the plan's line moved onto the first -- one probe where the plan knows
    the mask -- and acceptance rests on measured slopes, so a plan off by a quarter, or one that misses the
    ``L^2`` mask, still gives every entry within the tolerance. The first shape stops at 2 and the answer where
    the plan's slope agrees with the line through them (``planned_noise``), and waits for a failure where it
    does not (slopes off by a fifth or a quarter). Without the plan this table takes 11 probes."""
    step, memory, truth = shaped_memory(687 * MiB, 11_600.0, 2.0, block=64 * 1024, shared=8.0)
    device = SimulatedDevice(memory, 960 * MiB)
    shapes = [128, 256, 512, 1024, 2048]
    plain = find_batch_size(step, device=device, shapes=shapes)
    seeded = find_batch_size(
        step, device=device, shapes=shapes, estimate=byte_lm_plan(shapes, slope_error, mask)
    )
    assert (plain.probes, seeded.probes) == (11, probes)
    first = seeded.entries[-1].result.probes
    assert first[0].batch_size == 2 and first[1].batch_size <= 5  # the planned slope's aim, not 2 x 8
    assert len(first) == (2 if slope_error == 1.0 else 3)
    second = seeded.entries[0]
    assert len(second.result.probes) == (1 if mask else 3)
    for entry in seeded.entries:
        answer = [p for p in entry.result.probes if p.batch_size == entry.batch_size][-1]
        assert answer.verified and answer.fits and answer.peak_bytes <= seeded.budget_bytes
        assert entry.batch_size >= (1 - TABLE_TOLERANCE) * truth(entry.shape, seeded.budget_bytes)


def test_a_seeded_table_at_three_tenths_of_a_percent_of_noise_holds_every_entry_within_three_percent():
    """The random truths of the unseeded check below, each with its exact plan (the tensors' slopes; a fixed part
    of a tenth of the truth's, as a plan sees no process): every entry >= 0.97 of its true maximum, and fewer
    probes than without the plan."""
    rng = random.Random(12)
    short, seeded_probes, plain_probes = [], [], []
    shapes = [128, 256, 512, 1024, 2048]
    for _ in range(120):
        step, device, truth, (fixed, alpha, beta) = random_truth(rng, noise=0.003)
        plan = {length: MemoryLine(0.1 * fixed, alpha * length + beta * length**2) for length in shapes}
        try:
            table = find_batch_size(step, device=device, shapes=shapes, estimate=plan)
        except DoesNotFitError:  # nothing fits at 2048 on this card
            continue
        seeded_probes.append(table.probes)
        plain_probes.append(find_batch_size(step, device=device, shapes=shapes).probes)
        for entry in table.entries:
            true_max = truth(entry.shape, table.budget_bytes)
            if entry.batch_size < (1 - TABLE_TOLERANCE) * true_max:
                short.append((entry.shape, entry.batch_size, true_max))
    assert short == []
    assert statistics.mean(seeded_probes) < statistics.mean(plain_probes) - 0.4


def test_a_line_through_two_sizes_is_trusted_only_as_far_as_the_planned_slope_agrees():
    """A seeded first shape runs batch 2 and the answer: a line passes through any two readings, so on its own
    the room it leaves says nothing of their noise (``noise_known``). The planned slope is a second estimate
    without reading noise: where it agrees with the line the entry is accepted; where it is 10% off, that
    disagreement times the span is taken as the noise, and the entry waits for a failure above it. Taking the
    line as exact put 4 of 1,905 simulated entries under 0.97 of their truth (the worst 0.909)."""
    probes = [probe(2, "fits", 1000 + 2 * 100), probe(26, "fits", 1000 + 26 * 100)]  # room 50 = half a sample
    assert next_shape_candidate(probes, 3650, ShapeGuide(estimated_slope=100.0)).batch_size is None
    assert planned_noise(probes, ShapeGuide(estimated_slope=110.0)) == pytest.approx(10.0 * 24)
    off = ShapeGuide(estimated_slope=110.0)
    assert next_shape_candidate(probes, 3650, off).batch_size == 27
    assert next_shape_candidate([*probes, probe(27, "over budget", 3700)], 3650, off).batch_size is None
    assert planned_noise(probes, ShapeGuide()) is None and planned_noise(probes[:1], off) is None
    later = ShapeGuide(MemoryLine(1000, 100), fixed_bytes=1000)  # a later shape
    assert next_shape_candidate(probes, 3650, later).batch_size is None


@pytest.mark.parametrize(
    ("estimate", "error", "match"),
    [
        (MemoryLine(0, 1.0), TypeError, r"with shapes=, estimate must map each shape .* got MemoryLine"),
        ({8: MemoryLine(0, 1.0)}, ValueError, r"estimate has lines for \[8\]; expected one for each of the shapes \[8, 16\]"),
        ({8: MemoryLine(0, 1.0), 16: MemoryLine(0, 1.0), 32: MemoryLine(0, 1.0)}, ValueError, r"lines for \[8, 16, 32\]"),
        ({8: MemoryLine(0, 1.0), 16: MemoryLine(0, 0.0)}, ValueError, r"estimate for shape 16 is MemoryLine\(.*bytes_per_sample > 0"),
        ({8: MemoryLine(0, 1.0), 16: 3.0}, ValueError, r"estimate for shape 16 is 3.0; expected a MemoryLine"),
        ({8: MemoryLine(0, 1.0), 0: MemoryLine(0, 1.0)}, ValueError, r"invalid shape in estimate 0"),
    ],
)  # fmt: skip
def test_a_bad_estimate_for_a_table_is_one_line_before_anything_runs(estimate, error, match):
    device = SimulatedDevice(lambda b: b, 100)
    with pytest.raises(error, match=match):
        find_batch_size(lambda b, shape=1: None, device=device, shapes=[8, 16], estimate=estimate)
    assert device.runs == []


def test_estimated_lines_seed_a_real_cpu_table_and_leave_the_state_as_it_was():
    """``planning.estimate_memory_lines`` on a real attention workload: one line per shape, growing with the
    length; the table it seeds verifies every entry on the real CPU and leaves model, optimizer and RNG as they
    were (bitwise)."""
    workload = tiny_attention_workload()
    lines = estimate_memory_lines(workload, [64, 128, 256], device_type="cpu")
    assert list(lines) == [64, 128, 256]
    assert 0 < lines[64].bytes_per_sample < lines[128].bytes_per_sample < lines[256].bytes_per_sample
    model = workload.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    budget = int((CPUDevice().in_use_bytes() + 40 * MiB) / 0.9)
    table = find_batch_size(
        workload, device="cpu", memory_budget=budget, shapes=[64, 128, 256], estimate=lines
    )
    sizes = table.max_batch_by_shape()
    assert sizes[64] > sizes[128] > sizes[256] >= 2
    assert table.entries[-1].result.probes[0].batch_size == 2  # the first shape anchors at batch 2
    for entry in table.entries:
        answer = [p for p in entry.result.probes if p.batch_size == entry.batch_size][-1]
        assert answer.verified and answer.fits and answer.peak_bytes <= table.budget_bytes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and model.embed.weight.grad is None
    assert workload.optimizer.state == {}


def probe(batch_size, outcome, peak, predicted=None):
    return Probe(batch_size, Outcome(outcome), peak, 0, predicted, 0.1, 2)


def test_a_predicted_shape_opens_at_a_conservative_size_in_full_and_steps_down_from_a_failure():
    prior = MemoryLine(1000, 10)  # the budget 2000 holds 100 samples by it
    guide = ShapeGuide(prior)
    first = next_shape_candidate([], 2000, guide)
    # half the 3% below the prediction (98.5 -> 98), run in full: it may be the answer
    assert (first.batch_size, first.reason, first.scout) == (98, PRIOR_PREDICTION, False)
    assert next_shape_candidate([], 2000, ShapeGuide(prior, slack_bytes=100)).batch_size == 88  # 90 - 1.5%
    over = next_shape_candidate([probe(100, "over budget", 2100)], 2000, guide)
    assert over.batch_size == 90 and over.reason == PRIOR_PREDICTION  # 100 sizes of slope 10 over by 100
    measured = next_shape_candidate(
        [probe(100, "over budget", 2100)], 2000, ShapeGuide(prior, fixed_bytes=1100)
    )
    assert measured.batch_size == 90  # slope (2100 - 1100) / 100 = 10 measured here: 100 - 100 / 10
    oom = next_shape_candidate([probe(100, "oom", None)], 2000, guide)
    assert oom.batch_size == int(100 * PRIOR_BACKOFF)
    again = next_shape_candidate(
        [probe(100, "over budget", 2100), probe(90, "over budget", 2010)], 2000, guide
    )
    assert again.batch_size == int(90 * PRIOR_BACKOFF)  # a second failure: geometric, whatever the peaks say
    capped = next_shape_candidate([], 2000, guide, cap=40, hard_limit_bytes=1500)
    assert capped.batch_size == 40
    assert next_shape_candidate([], 2000, guide, hard_limit_bytes=1300).batch_size == 30


def test_one_size_at_a_new_shape_measures_its_slope_through_the_known_fixed_part():
    # the prior (a bound from one length) says 20 per sample; through the fixed part 1000, the fit at 40 says 5
    guide = ShapeGuide(MemoryLine(1000, 20), fixed_bytes=1000)
    decision = next_shape_candidate([probe(40, "fits", 1200)], 2000, guide)
    assert decision.batch_size == 197  # (2000 - 1000) / 5 = 200, half the tolerance below it (conservative)
    assert not decision.scout
    # at 197 the room left holds 0.6 samples: the truth is at most 197, accepted without probing 198
    done = next_shape_candidate([probe(40, "fits", 1200), probe(197, "fits", 1985)], 2000, guide)
    assert decision.reason == "line prediction" and done.batch_size is None


def test_an_entry_is_accepted_only_when_the_measurements_bound_the_truth_within_the_tolerance():
    fit = probe(97, "fits", 1970)  # slope 10, 30 bytes of room: the truth is at most 100 -> 97 is 0.97 of it
    assert accepts(fit, [10.0], None, 2000, 0.0, TABLE_TOLERANCE)
    assert not accepts(fit, [10.0], None, 2000, 10.0, TABLE_TOLERANCE)  # noise: 101 could still fit
    assert not accepts(fit, [10.0, 5.0], None, 2000, 0.0, TABLE_TOLERANCE)  # the lowest slope counts: 103
    assert accepts(fit, [5.0], 101, 2000, 0.0, TABLE_TOLERANCE)  # a failure at 101 bounds it at 100
    small = probe(6, "fits", 1990)  # at six samples one more is 17%: only a room under one sample settles it
    assert accepts(small, [12.0], None, 2000, 0.0, TABLE_TOLERANCE)
    assert not accepts(small, [9.0], None, 2000, 0.0, TABLE_TOLERANCE)
    assert accepts(small, [9.0], 7, 2000, 0.0, TABLE_TOLERANCE)


def test_a_failure_inside_the_noise_does_not_settle_an_entry_a_clear_one_does():
    guide = ShapeGuide(MemoryLine(990, 10), slack_bytes=20)  # readings within 20 bytes of the line
    fit = probe(97, "fits", 1960)
    noisy = next_shape_candidate([fit, probe(101, "over budget", 2010)], 2000, guide)
    # 2010 is within twice the noise of the budget: 102..105 may still read under it; 97 is not proven
    assert (noisy.batch_size, noisy.reason) == (98, "below a failure in the noise")  # the gap split by ratio
    clear = next_shape_candidate([fit, probe(101, "over budget", 2100)], 2000, guide)
    assert clear.batch_size is None  # 101 is over by more than the noise: the truth <= 100, 97 >= 0.97 of it


def test_the_readings_noise_comes_from_every_size_and_lowers_the_slopes_an_entry_is_accepted_by():
    on_line = [probe(2, "fits", 1020), probe(16, "fits", 1160), probe(97, "fits", 1970)]  # 1000 + 10 b
    assert reading_noise(on_line[1:]) == 0.0  # two sizes: a line through them says nothing of the noise
    assert reading_noise(on_line) == pytest.approx(0.0, abs=1e-9)
    noisy = [probe(2, "fits", 1032), *on_line[1:]]  # batch 2 reads 12 over the line through the others
    assert 0 < reading_noise(noisy) < 12
    guide = ShapeGuide()
    assert credible_slopes(on_line, on_line[-1], guide, 0.0) == [pytest.approx(10.0)]
    assert credible_slopes(on_line, on_line[-1], guide, 9.0) == [pytest.approx(10.0 - 18 / 81)]
    fixed = ShapeGuide(fixed_bytes=1000)
    assert credible_slopes(on_line[-1:], on_line[-1], fixed, 9.7) == [pytest.approx((970 - 19.4) / 97)]
    assert (
        next_shape_candidate(on_line, 2000, guide).batch_size is None
    )  # room 30 = 3 samples: 97 >= 0.97 x 100
    assert next_shape_candidate(noisy, 2000, guide).batch_size is not None  # the noise leaves 101 possible


def test_the_try_past_the_noise_is_made_once_even_where_the_readings_creep_up():
    guide = ShapeGuide(MemoryLine(990, 10), slack_bytes=20)
    probes = [probe(97, "fits", 1960), probe(98, "over budget", 2005)]  # 98: over, inside the noise
    assert next_shape_candidate(probes, 2000, guide).batch_size == 101  # the size whose failure settles 97
    probes.append(probe(101, "over budget", 2008))  # inside the noise too (the readings creep, not grow)
    past = next_shape_candidate(probes, 2000, guide)
    assert (past.batch_size, past.reason) == (106, "past the noise")  # 97 + (2000 + 40 - 1960) / 10, + 1
    probes.append(probe(106, "over budget", 2013))  # before: 118, 144, 173, 186, 191, 193, each over
    assert next_shape_candidate(probes, 2000, guide).batch_size is None


def test_a_conservative_size_is_half_the_tolerance_below_unless_that_leaves_it():
    assert conservative(1000.0, 0.03) == 985
    assert conservative(61.5, 0.03) == 60
    assert conservative(14.0, 0.03) == 14  # 13 would be 0.93 of 14: the rounding down is the margin
    assert conservative(6.9, 0.03) == 6


GPT2_SMALL = 768, 12, 12  # width, heads, layers


def gpt2_memory(attention: str, noise: float = 0.0):
    """GPT-2 small's activations per sample by Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", fp16): ``L h (34 + 5 a L / h)`` bytes per layer -- ``34 h L`` linear, ``5 a L^2``
    the eager attention's scores and softmax, which FlashAttention does not keep (``beta = 0``); 2 GiB of
    fixed memory (124M parameters with fp32 Adam: 16 bytes each)."""
    width, heads, layers = GPT2_SMALL
    beta = 5.0 * heads * layers if attention == "eager" else 0.0
    return shaped_memory(2 * GiB, 34.0 * width * layers, beta, noise=noise)


@pytest.mark.parametrize(
    ("attention", "noise"),
    [("flash", 0.0), ("eager", 0.0), ("eager", 0.001)],
    ids=["linear in L", "attention's L^2", "L^2 with 0.1% noise"],
)
def test_five_shapes_cost_at_most_twice_one_search_and_every_entry_is_within_three_percent(attention, noise):
    """Issue 12, item 1's target on simulated truths: <= 2x the probes of one single-shape search (the mean over
    the five), every entry >= 0.97 of its true maximum (found by scanning every size) and verified in full."""
    step, memory, truth = gpt2_memory(attention, noise)  # memory(b) at the shape the last step set
    device = SimulatedDevice(memory, 24 * GiB)  # a 24 GiB card (an RTX 4090, an A10)
    shapes = [128, 256, 512, 1024, 2048]
    table = find_batch_size(step, device=device, shapes=shapes)
    singles = [len(find_batch_size(lambda b, s=s: step(b, shape=s), device=device).probes) for s in shapes]
    assert table.probes <= 2 * statistics.mean(singles)
    for entry in table.entries:
        answer = [p for p in entry.result.probes if p.batch_size == entry.batch_size][-1]
        assert answer.verified and answer.fits and answer.peak_bytes <= table.budget_bytes
        assert entry.batch_size >= (1 - TABLE_TOLERANCE) * truth(entry.shape, table.budget_bytes)


def random_truth(rng: random.Random, noise: float):
    """A random shaped memory (as the sweep in benchmarks/RESULTS.md, "The shape table at the issue's
    tolerance"): fixed 5-50% of a 16, 40 or 80 GiB card, alpha log-uniform in 3e3..1e6 bytes per token, beta 0
    or alpha / (10..10^4), and ``truth(shape, budget)`` scanned near the noiseless answer (the noise moves it
    by well under 5%); last, ``(fixed, alpha, beta)``."""
    capacity = rng.choice([16, 40, 80]) * GiB
    fixed = rng.uniform(0.05, 0.5) * capacity
    alpha = math.exp(rng.uniform(math.log(3e3), math.log(1e6)))
    beta = 0.0 if rng.random() < 0.5 else alpha / math.exp(rng.uniform(math.log(10), math.log(1e4)))
    step, memory, _ = shaped_memory(fixed, alpha, beta, noise=noise)

    def truth(shape: int, budget: int) -> int:
        step(1, shape=shape)
        nominal = (budget - fixed) / (alpha * shape + beta * shape**2)
        sizes = range(max(1, int(nominal * 0.95) - 2), int(nominal * 1.05) + 3)
        return max([b for b in sizes if memory(b) <= budget], default=0)

    return step, SimulatedDevice(memory, capacity), truth, (fixed, alpha, beta)


def test_at_three_tenths_of_a_percent_of_noise_every_entry_is_within_three_percent():
    """The first shape's line runs through two sizes near its answer and says nothing of the readings' noise:
    without an estimate of it (shape_decision.reading_noise) an entry was accepted on a room that the noise had
    shrunk -- 5 of 730 entries under 0.97 at 0.3% repeatable noise, the worst 0.941 (benchmarks/RESULTS.md).
    Over 200 random truths, every entry of every table >= 0.97 of its true maximum."""
    rng = random.Random(12)
    short = []
    for _ in range(200):
        step, device, truth, _ = random_truth(rng, noise=0.003)
        try:
            table = find_batch_size(step, device=device, shapes=[128, 256, 512, 1024, 2048])
        except DoesNotFitError:  # nothing fits at 2048 on this card
            continue
        for entry in table.entries:
            true_max = truth(entry.shape, table.budget_bytes)
            if entry.batch_size < (1 - TABLE_TOLERANCE) * true_max:
                short.append((entry.shape, entry.batch_size, true_max))
    assert short == []


def test_a_shape_where_nothing_fits_is_named_in_the_error():
    step, memory, _ = shaped_memory(GiB, 1e6, 0.0)
    with pytest.raises(DoesNotFitError, match=r"^at shape 8192: batch 1 does not fit"):
        find_batch_size(step, device=SimulatedDevice(memory, 8 * GiB), shapes=[128, 8192])


IMAGE_TABLE = """
import json

from batchlab import find_batch_size
from batchlab.devices import CPUDevice
from batchlab.workloads import load_workload

workload = load_workload("cnn")  # make_batch(b, shape=(h, w)): 3 x h x w images
budget = int((CPUDevice().in_use_bytes() + 80 * 2**20) / 0.9)
table = find_batch_size(workload, device="cpu", memory_budget=budget, shapes=[(16, 16), (24, 32), (32, 32)])
print(json.dumps({"order": table.order, "budget": table.budget_bytes, "entries": [
    [e.shape, e.length, e.batch_size, e.fits, e.result.peak_bytes] for e in table.entries]}))
"""


def test_a_generic_image_workload_gets_its_table_over_image_sizes():
    """In a fresh process (conftest.in_a_fresh_process): in one that ran other tests first the baseline crept
    up between the shapes, and the last searched, (24, 32), got 27 against the first's 30 at (32, 32). With 40 MiB
    of room (answers 19 at (32, 32), 24 at (24, 32)) a fresh process still crept 3-5 MiB when a shape's first
    sizes read just over, and (24, 32) fell to 18 (1 of 8 runs; the same before and after the L^2 fixed part):
    80 MiB (answers 60 and 78) keeps the order a statement about the shapes, not the creep."""
    run = in_a_fresh_process(IMAGE_TABLE)
    assert run["order"][0] == [32, 32]  # the largest image first, as Ultralytics' multi-scale worst case
    sizes = {tuple(shape): batch for shape, _, batch, _, _ in run["entries"]}
    assert sizes[(16, 16)] > sizes[(24, 32)] >= sizes[(32, 32)] >= 2
    assert [length for _, length, _, _, _ in run["entries"]] == [16 * 16, 24 * 32, 32 * 32]  # pixels
    for _, _, _, fits, peak in run["entries"]:
        assert fits and peak <= run["budget"]
