"""FSDP2 under torchrun with gloo on the CPU (issue 14): a fit every rank agrees on, mixed budgets, and an
out-of-memory error (or any error) on rank 1 alone that every rank handles together without a deadlock.

Each test starts ``torchrun`` on tests/fsdp_worker.py under ``timeout``; every rank writes its results, and
the test asserts that all ranks exited in time and wrote them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp_worker.py")
LIMIT_S = 180  # per torchrun: a hang detector; a run takes 20-80 s on 2 shared, busy cores

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], ranks: int, **env: str) -> subprocess.CompletedProcess:
    """``torchrun`` of ``script`` on ``ranks`` ranks under ``timeout``; fails if a rank hung."""
    import batchlab

    src = str(Path(batchlab.__file__).resolve().parents[1])
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    command = [
        "timeout", str(LIMIT_S), sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1", f"--master-port={_port()}",
        str(script), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=LIMIT_S + 30)
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode != 124, (
        f"torchrun {script.name} did not finish in {LIMIT_S} s (a rank hung):\n{log}"
    )
    return done


def torchrun(mode: str, ranks: int, out: Path, **env: str) -> list[dict]:
    """Run ``mode`` on ``ranks`` ranks; every rank's results (fails with the log if one is missing)."""
    done = launch(WORKER, [mode, str(out)], ranks, **env)
    log = (done.stdout + done.stderr)[-4000:]
    results = []
    for rank in range(ranks):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote nothing (exit {done.returncode}):\n{log}"
        result = json.loads(path.read_text())
        for name, part in result.items():
            assert not (isinstance(part, dict) and "crashed" in part), (
                f"rank {rank} {name}: {part['crashed']}"
            )
        results.append(result)
    return results


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """The four failure modes of fsdp_worker.py, on 2 ranks in one torchrun: every rank's results by mode."""
    return torchrun("failures", 2, tmp_path_factory.mktemp("failures"))


@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp_ranks_agree_on_a_batch_that_fits_every_rank_for_20_later_steps(tmp_path, ranks):
    # 200 MiB over the process: answers of ~11,000 samples of ~10 KB. At 100 MiB (answers ~1,200) the ranks'
    # process grew ~0.1-0.3 MiB a probe -- 1-3% of the answer -- and the search chased it to its probe limit
    # on about one run in three (the noted CPU creep; the search's weakness, not the agreement's).
    results = [r["fit"] for r in torchrun("fit", ranks, tmp_path, BUDGETS_MIB=",".join(["200"] * ranks))]
    first = results[0]["result"]
    for rank, result in enumerate(results):
        fit = result["result"]
        assert fit["lockstep"] and fit["world_size"] == ranks and fit["rank"] == rank
        assert fit["batch_size"] == first["batch_size"] > 16  # one answer, not the smallest probe
        assert result["probes"] == results[0]["probes"]  # the same probes, in the same order, on every rank
        assert fit["rank_peak_bytes"] == first["rank_peak_bytes"] and len(fit["rank_peak_bytes"]) == ranks
        assert 0 <= fit["limited_by_rank"] < ranks
        assert (
            result["later_ok"] and result["later_peak"] <= result["budget"]
        )  # 20 steps fit this rank's budget
        assert result["unchanged"]  # the search restored every rank's shards
        assert fit["local"]["memory_breakdown"]["optimizer_state"] > 0  # Adam's moments counted (this shard)


def test_mixed_budgets_answer_what_the_tightest_rank_runs_with_an_exact_plan(tmp_path):
    # rank 1 has 10 MiB less room; the target's 4000 per rank does not fit, so accumulation makes it up
    results = [r["fit"] for r in torchrun("fit", 2, tmp_path, BUDGETS_MIB="100,90", TARGET="8000")]
    for result in results:
        fit = result["result"]
        assert fit["limited_by_rank"] == 1
        assert fit["rank_budget_bytes"][1] < fit["rank_budget_bytes"][0]
        assert fit["plan"]["exact"] and fit["global_batch"] == 8000
        assert fit["batch_size"] * fit["accumulation_steps"] == 4000 and fit["accumulation_steps"] > 1
        assert result["later_ok"] and result["later_peak"] <= result["budget"]
    assert results[0]["result"]["batch_size"] == results[1]["result"]["batch_size"]


def test_an_oom_on_rank_1_during_the_search_makes_every_rank_step_back_together(failures):
    results = [r["oom-search"] for r in failures]
    inject_at = 24  # fsdp_worker.INJECT_AT: rank 1 alone runs out of memory from this batch on
    assert results[0]["probes"] == results[1]["probes"]
    assert results[0]["batch_size"] == results[1]["batch_size"] == inject_at - 1
    assert all(outcome == "oom" for size, outcome in results[0]["probes"] if size >= inject_at)


def test_an_error_on_rank_1_during_the_search_makes_every_rank_raise(failures):
    results = [r["error-search"] for r in failures]
    assert (results[1]["raised"], results[1]["message"]) == ("ValueError", "injected shape bug")
    assert results[0]["raised"] == "BatchlabError"
    assert "rank(s) [1] raised during the probe" in results[0]["message"]


def test_oomguard_an_oom_on_rank_1_shrinks_every_rank_together(failures):
    results = [r["oom-guard"] for r in failures]
    for result in results:
        assert result["micro"] == [16, 4]  # 64 -> 32 -> 16 on both ranks, the effective batch kept
        assert [(e["micro_before"], e["micro_after"]) for e in result["events"]] == [(64, 32), (32, 16)]
        assert len(result["losses"]) == 3
    assert results[0]["events"][0]["error"] == "out of memory on rank(s) [1]"
    assert results[1]["events"][0]["error"].startswith("injected: out of memory")
    assert results[0]["losses"] == results[1]["losses"]  # same data, same averaged gradient: the same run


def test_oomguard_an_error_on_rank_1_makes_every_rank_raise(failures):
    results = [r["error-guard"] for r in failures]
    assert (results[1]["raised"], results[1]["message"]) == ("ValueError", "injected shape bug")
    assert results[0]["raised"] == "BatchlabError" and "rank(s) [1] raised" in results[0]["message"]
    assert len(results[0]["losses"]) == len(results[1]["losses"]) == 1  # step 0 ran; step 1 stopped both


@pytest.fixture(scope="module")
def backward_failures(tmp_path_factory):
    """Rank 1 raising inside a sharded module's backward (fsdp_worker.py), on 2 ranks in one torchrun."""
    return torchrun("backward-failures", 2, tmp_path_factory.mktemp("backward-failures"))


def test_an_oom_in_rank_1s_sharded_backward_makes_every_rank_step_back_and_the_search_go_on(
    backward_failures,
):
    # the other rank would wait in layer 2's reduce-scatter: it meets rank 1 at a sync point ahead of it
    results = [r["oom-backward-search"] for r in backward_failures]
    inject_at = 24
    assert results[0]["probes"] == results[1]["probes"]
    assert results[0]["batch_size"] == results[1]["batch_size"] == inject_at - 1
    assert all(outcome == "oom" for size, outcome in results[0]["probes"] if size >= inject_at)
    assert any(outcome == "fits" for size, outcome in results[0]["probes"] if size < inject_at)


def test_an_error_in_rank_1s_sharded_backward_makes_every_rank_raise(backward_failures):
    results = [r["error-backward-search"] for r in backward_failures]
    assert (results[1]["raised"], results[1]["message"]) == ("ValueError", "injected shape bug")
    assert results[0]["raised"] == "BatchlabError"
    assert "rank(s) [1] raised during the probe" in results[0]["message"]


def test_oomguard_an_oom_in_rank_1s_first_layer_backward_shrinks_every_rank_together(
    backward_failures, failures
):
    # layer 0's input needs no gradient: its reduce-scatter runs in FSDP's final callback of the backward
    results = [r["oom-backward-guard"] for r in backward_failures]
    for rank, result in enumerate(results):
        assert result["micro"] == [16, 4]
        assert [(e["micro_before"], e["micro_after"]) for e in result["events"]] == [(64, 32), (32, 16)]
        assert result["losses"] == failures[rank]["oom-guard"]["losses"]  # the same run as a forward OOM
    assert results[0]["events"][0]["error"] == "out of memory on rank(s) [1]"
    assert results[1]["events"][0]["error"].startswith("injected: out of memory")


def test_oomguard_an_error_in_rank_1s_backward_makes_every_rank_raise(backward_failures):
    results = [r["error-backward-guard"] for r in backward_failures]
    assert (results[1]["raised"], results[1]["message"]) == ("ValueError", "injected shape bug")
    assert results[0]["raised"] == "BatchlabError" and "rank(s) [1] raised" in results[0]["message"]
    assert len(results[0]["losses"]) == len(results[1]["losses"]) == 1


def test_on_4_ranks_an_oom_in_rank_1s_sharded_backward_makes_all_step_back_together(
    tmp_path, backward_failures
):
    results = torchrun("backward-ooms", 4, tmp_path)
    for result in results:  # the same probes and answer, and the same recovery, as on 2 ranks
        assert (
            result["oom-backward-search"]["probes"] == backward_failures[0]["oom-backward-search"]["probes"]
        )
        assert result["oom-backward-search"]["batch_size"] == 23
        guard = result["oom-backward-guard"]
        assert guard["micro"] == [16, 4] and len(guard["events"]) == 2 and len(guard["losses"]) == 3
    assert [r["oom-backward-guard"]["events"][0]["error"] for r in results] == [
        "out of memory on rank(s) [1]",
        "injected: out of memory on this rank only",
        "out of memory on rank(s) [1]",
        "out of memory on rank(s) [1]",
    ]


@pytest.mark.parametrize("mode", ["stalled-search", "stalled-guard"])
def test_a_failure_no_sync_point_reaches_makes_every_rank_raise_within_the_collective_timeout(tmp_path, mode):
    # rank 0 waits in the layer's own all_reduce, which rank 1 never reaches; the group's own timeout (PG_TIMEOUT_S)
    # is past the hang detector, so only batchlab's collective_timeout of 5 s can end the wait in time
    results = [r[mode] for r in torchrun(mode, 2, tmp_path, COLLECTIVE_TIMEOUT_S="5", PG_TIMEOUT_S="1800")]
    for result in results:
        assert result["raised"] == "ProcessGroupFailedError"
        assert "the process group failed mid-step" in result["message"]
        assert result["reports"][1] == "ran out of memory (injected: out of memory on this rank only)"
        assert result["reports"][0].startswith("raised RuntimeError: ")  # what rank 0 met: gloo's timeout
    assert results[0]["reports"] == results[1]["reports"]  # every rank names the same failures


EXAMPLE = Path(__file__).parents[1] / "examples" / "fsdp_torchrun.py"
DOCS = Path(__file__).parents[1] / "docs" / "integrations.md"


def test_the_docs_fsdp_example_is_the_examples_file_verbatim():
    text = DOCS.read_text()
    marker = "<!-- example: examples/fsdp_torchrun.py -->\n```python\n"
    assert marker in text
    block = text.split(marker, 1)[1].split("```", 1)[0]
    assert block == EXAMPLE.read_text()


def test_the_docs_fsdp_example_runs_under_torchrun():
    done = launch(EXAMPLE, [], 2)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "x 2 ranks = global batch 512" in done.stdout
    assert "trained 3 steps at" in done.stdout


def test_lightning_model_parallel_fsdp2_finder_probes_in_lockstep(tmp_path):
    """BatchlabFinder under Lightning's ModelParallelStrategy (FSDP2) on 2 CPU ranks; Lightning's own FSDP
    strategy (FSDP1) refuses the CPU ("requires a GPU accelerator")."""
    pytest.importorskip("lightning")
    import batchlab

    src = str(Path(batchlab.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
    }
    script = Path(__file__).with_name("lightning_fsdp_worker.py")
    command = ["timeout", str(LIMIT_S), sys.executable, str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LIMIT_S + 30)
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode != 124, f"Lightning FSDP2 run did not finish in {LIMIT_S} s:\n{log}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["probes"] == ranks[1]["probes"]  # the same probes in the same order on both ranks
    assert ranks[0]["optimal"] == ranks[1]["optimal"] > 16
    assert all(
        r["device"] == "cpu x 2 ranks (lockstep)" and r["model_batch_size"] == r["optimal"] for r in ranks
    )


def test_oomguard_an_oom_in_rank_1s_loss_reaches_the_other_rank_before_the_backward(failures):
    by_loss = [r["oom-guard-loss"] for r in failures]
    by_forward = [r["oom-guard"] for r in failures]
    for rank in range(2):
        assert by_loss[rank]["micro"] == [16, 4]
        # the same recovery, wherever the error came from: the very same training on each rank's shard
        assert by_loss[rank]["losses"] == by_forward[rank]["losses"]
        assert by_loss[rank]["local_weights"] == by_forward[rank]["local_weights"]
