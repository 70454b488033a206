"""find_batch_size_distributed: 2 gloo ranks with different room agree on the smallest answer; global batch.

Each rank measures on a simulated device whose capacity differs by rank (so the agreed minimum is known
exactly), then both run a real CPU search and one DDP step at the agreed plan. The exchange protocol is also
tested in-process, with failures on one rank.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from batchlab import BatchlabError, DoesNotFitError, find_batch_size
from batchlab.integrations.ddp import agree_on_batch_size, find_batch_size_distributed

WORKER_PATH = Path(__file__).with_name("integration_ddp_worker.py")
spec = importlib.util.spec_from_file_location("integration_ddp_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


@needs_gloo
def test_two_ranks_agree_on_the_minimum_and_report_the_global_batch(tmp_path):
    ranks = worker.run_ranks("plain", tmp_path)
    # what each rank would answer alone, from the same search on one process
    alone = [
        find_batch_size(worker.make_workload(worker.make_model()), device=worker.simulated(r)).batch_size
        for r in range(2)
    ]
    assert alone[1] < alone[0]
    for rank, result in enumerate(ranks):
        agreed = result["agreed"]
        assert agreed["per_rank"] == alone
        assert agreed["batch_size"] == min(alone) == 44
        assert agreed["rank"] == rank and agreed["world_size"] == 2 and agreed["limited_by_rank"] == 1
        assert agreed["global_batch"] == 44 * 1 * 2
        assert agreed["local"]["batch_size"] == alone[rank]  # each rank keeps its own measurement
        planned = result["planned"]  # target 96 on 2 ranks: 48 per rank, at most 44 fits -> 24 x 2
        assert (planned["batch_size"], planned["accumulation_steps"], planned["global_batch"]) == (24, 2, 96)
        assert planned["plan"]["exact"]
        assert result["real"]["batch_size"] == min(result["real"]["per_rank"])
        assert result["state_unchanged"]
    assert ranks[0]["real"] == ranks[1]["real"]
    assert ranks[0]["weights_after_ddp_step"] == ranks[1]["weights_after_ddp_step"]  # DDP kept them in sync


def test_without_a_process_group_it_is_one_rank():
    result = find_batch_size_distributed(
        worker.make_workload(worker.make_model()), device=worker.simulated(1)
    )
    assert (result.world_size, result.rank, result.per_rank) == (1, 0, [44])
    assert result.global_batch == result.batch_size == 44
    assert "global batch 44" in result.summary()


def test_a_failing_rank_still_takes_part_in_the_exchange_and_every_rank_raises():
    sent = []

    def gather_with(other):
        def gather(value):
            sent.append(value)
            return [value, other]

        return gather

    def too_big():
        raise DoesNotFitError("batch 1 does not fit", batch_size=1, needed_bytes=None, budget_bytes=0)

    with pytest.raises(DoesNotFitError):
        agree_on_batch_size(too_big, gather_with(12), rank=0)
    assert sent == [0]  # 0: "does not fit" was still sent
    with pytest.raises(BatchlabError, match=r"does not fit on rank\(s\) \[1\]"):
        agree_on_batch_size(lambda: 12, gather_with(0), rank=0)
    with pytest.raises(BatchlabError, match=r"failed on rank\(s\) \[1\]"):
        agree_on_batch_size(lambda: 12, gather_with(-1), rank=0)

    def bug():
        raise ValueError("shape bug")

    with pytest.raises(ValueError, match="shape bug"):
        agree_on_batch_size(bug, gather_with(12), rank=0)
    assert sent[-1] == -1
    assert agree_on_batch_size(lambda: 30, gather_with(12), rank=0) == (12, [30, 12])
