"""The status agreement, the gradient-averaging checks and the N-card plan's bad input, in one process
(issue 14); the torchrun runs are in tests/test_fsdp.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchlab import Workload
from batchlab.devices import CPUDevice, SimulatedDevice
from batchlab.devices.agreement import DONE, ERROR, OUT_OF_MEMORY, PEER, RUNNING, StepAgreement, account
from batchlab.devices.lockstep import LockstepDevice
from batchlab.devices.ranks import Ranks, collective_timeout, current_ranks
from batchlab.errors import PeerFailureError, ProcessGroupFailedError, WorkloadError
from batchlab.integrations.distributed.agreement import (
    agree_on_batch_size,
    check_even_split,
    check_same_everywhere,
)
from batchlab.integrations.distributed.fit import find_batch_size_distributed


def scripted(*rounds):
    """An exchange that answers the given rounds of every rank's codes, recording what this rank sent."""
    sent, answers = [], list(rounds)

    def exchange(code):
        sent.append(code)
        return answers.pop(0)

    return exchange, sent


def test_a_failed_rank_exchanges_until_no_rank_is_still_running():
    exchange, sent = scripted((OUT_OF_MEMORY, RUNNING), (OUT_OF_MEMORY, PEER))
    verdict = StepAgreement(exchange).finish(OUT_OF_MEMORY)
    assert sent == [OUT_OF_MEMORY, OUT_OF_MEMORY]
    assert (verdict.ok, verdict.oom_ranks, verdict.error_ranks) == (False, [0], [])


def test_a_running_rank_leaves_the_step_at_its_sync_point_and_shares_the_verdict():
    exchange, sent = scripted((RUNNING, RUNNING), (RUNNING, OUT_OF_MEMORY), (PEER, OUT_OF_MEMORY))
    agreement = StepAgreement(exchange)
    agreement.checkpoint()  # nobody failed yet: the step goes on
    with pytest.raises(PeerFailureError, match=r"rank\(s\) \[1\] ran out of memory") as caught:
        agreement.checkpoint()
    assert caught.value.out_of_memory and caught.value.ranks == [1]
    verdict = agreement.finish(PEER)
    assert sent == [RUNNING, RUNNING, PEER] and verdict.oom_ranks == [1]


def test_an_error_anywhere_outranks_an_out_of_memory():
    exchange, _ = scripted((RUNNING, ERROR))
    with pytest.raises(PeerFailureError, match=r"rank\(s\) \[1\] raised an error") as caught:
        StepAgreement(exchange).checkpoint()
    assert not caught.value.out_of_memory
    exchange, _ = scripted((OUT_OF_MEMORY, ERROR))
    verdict = StepAgreement(exchange).finish(OUT_OF_MEMORY)
    assert verdict.error_ranks == [1] and not verdict.ok


def test_all_done_is_one_exchange_and_ok():
    exchange, sent = scripted((DONE, DONE, DONE))
    assert StepAgreement(exchange).finish(DONE).ok and sent == [DONE]
    with pytest.raises(ValueError, match="invalid final status 0"):
        StepAgreement(exchange).finish(RUNNING)


def broken(code):
    raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer")


def test_a_failed_group_makes_every_rank_raise_with_each_ranks_account():
    told = []

    def tell(text):
        told.append(text)
        return ["raised RuntimeError: Timed out waiting 5000ms", text, None]

    agreement = StepAgreement(broken, tell, where="batch 128")
    with pytest.raises(
        ProcessGroupFailedError, match="batch 128: the process group failed mid-step"
    ) as caught:
        agreement.finish(OUT_OF_MEMORY, account(OUT_OF_MEMORY, "CUDA out of memory. Tried to allocate 2 GiB"))
    assert told == ["ran out of memory (CUDA out of memory. Tried to allocate 2 GiB)"]
    assert caught.value.reports == ["raised RuntimeError: Timed out waiting 5000ms", told[0], None]
    assert "rank 1 ran out of memory (CUDA out of memory" in str(caught.value)
    assert "rank 2 sent no word" in str(caught.value)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # no way round the group: as it is
        StepAgreement(broken).finish(DONE)


def test_each_rank_accounts_for_its_end_of_the_step():
    assert account(ERROR, ValueError("bad shape\nmore")) == "raised ValueError: bad shape"
    assert account(OUT_OF_MEMORY) == "ran out of memory"
    assert account(PEER) == "left the step for another rank's failure"
    assert account(DONE) == "finished its part of the step"


def test_the_answers_exchange_is_skipped_once_the_group_has_failed():
    def search():
        raise ProcessGroupFailedError("batch 8: the process group failed", reports=[None, None])

    def gather(value):
        raise AssertionError("no collective on a failed group")

    with pytest.raises(ProcessGroupFailedError, match="batch 8"):
        agree_on_batch_size(search, gather, rank=0)


@pytest.fixture
def one_rank_group(monkeypatch):
    """A real gloo group of one rank in this process (timeout 77 s), destroyed after the test."""
    import datetime
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=77))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_collective_timeout_bounds_the_group_inside_and_restores_it(one_rank_group):
    import datetime

    options = one_rank_group._get_backend(torch.device("cpu")).options
    with collective_timeout(5, one_rank_group):
        assert options._timeout == datetime.timedelta(seconds=5)
    assert options._timeout == datetime.timedelta(seconds=77)
    with collective_timeout(None, one_rank_group), collective_timeout(100, one_rank_group):
        assert options._timeout == datetime.timedelta(seconds=77)  # never a longer wait than the group's
    with pytest.raises(KeyError), collective_timeout(5, one_rank_group):
        raise KeyError("a failed try")
    assert options._timeout == datetime.timedelta(seconds=77)


def test_tell_everyone_goes_through_the_store(one_rank_group):
    ranks = current_ranks()
    assert ranks.tell_everyone("ran out of memory", wait_s=1) == ["ran out of memory"]


def test_a_lockstep_device_trains_on_its_ranks_twin_without_a_collective(one_rank_group, monkeypatch):
    ranks = current_ranks()
    device = LockstepDevice(CPUDevice(), ranks, budget_bytes=8 * 2**30)
    device.run(mlp_workload().step, 4)
    assert list(device.rank_peaks) == [4]

    def no_collective(self, value):
        raise AssertionError("making the training twin ran a collective")

    monkeypatch.setattr(Ranks, "all_gather_ints", no_collective)
    twin = device.for_training()
    assert twin.inner.exact is False and device.inner.exact is True  # the CPU's training twin, inside
    assert (twin.rank_budgets, twin.hard_limit_bytes(), twin.name) == (
        device.rank_budgets, device.hard_limit_bytes(), device.name,
    )  # fmt: skip
    monkeypatch.undo()  # a run is collective: the ranks run it together
    assert twin.run(mlp_workload().step, 8).ok
    assert list(twin.rank_peaks) == [8] and list(device.rank_peaks) == [4]  # the search's log kept apart
    simulated = LockstepDevice(SimulatedDevice(lambda b: b, 2**30), ranks, budget_bytes=2**30)
    assert simulated.for_training() is simulated  # nothing differs where training is the measuring device


def test_gradient_averaging_refuses_unequal_shares_and_disagreeing_ranks():
    assert check_even_split(96, 4) == 24
    with pytest.raises(ValueError, match="target_global_batch 100 is not a multiple of world size 8"):
        check_even_split(100, 8)
    check_same_everywhere("grad_accum", [2, 2])
    with pytest.raises(ValueError, match=r"ranks disagree on target_global_batch \(\[96, None\] by rank\)"):
        check_same_everywhere("target_global_batch", [96, -1])


def mlp_workload():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return Workload(
        model, lambda b: (torch.randn(b, 16), torch.randn(b, 4)), F.mse_loss, lambda p: torch.optim.Adam(p)
    )


def test_lockstep_without_a_process_group_is_a_one_line_error():
    assert current_ranks() is None
    with pytest.raises(RuntimeError, match=r"lockstep=True\) needs an initialised process group"):
        find_batch_size_distributed(mlp_workload(), lockstep=True)


def test_the_fsdp_plan_refuses_what_it_does_not_model():
    from batchlab.planning import plan
    from batchlab.planning.sharded import ShardedFakeDevice

    with pytest.raises(ValueError, match="FSDP option 'mp_policy' is not modelled by the plan"):
        plan(mlp_workload(), "h100-80gb", world_size=8, fsdp=True, fsdp_options={"mp_policy": None})
    with pytest.raises(ValueError, match="invalid FSDP option reshard_after_forward=2"):
        ShardedFakeDevice(mlp_workload(), world_size=2, fsdp_options={"reshard_after_forward": 2})
    with pytest.raises(ValueError, match="pass fsdp=True with them"):
        plan(mlp_workload(), "h100-80gb", world_size=8, fsdp_options={"reshard_after_forward": False})
    with pytest.raises(ValueError, match="world_size"):
        plan(mlp_workload(), "h100-80gb", world_size=0, fsdp=True)
    two_groups = mlp_workload()
    two_groups.optimizer = torch.optim.SGD(
        [
            {"params": two_groups.model[0].parameters()},
            {"params": two_groups.model[2].parameters(), "lr": 0.1},
        ],
        lr=0.01,
    )
    with pytest.raises(WorkloadError, match="models one param group; workload .* has 2"):
        ShardedFakeDevice(two_groups, world_size=2)


def test_the_fsdp_plan_shards_per_rank_and_answers_the_global_batch():
    from batchlab.planning import plan
    from batchlab.planning.sharded import ShardedFakeDevice

    work = mlp_workload()
    before = {name: value.clone() for name, value in work.model.state_dict().items()}
    peaks = {w: ShardedFakeDevice(work, world_size=w, device_type="cpu").estimate(64) for w in (2, 4)}
    # the sharded state halves from 2 to 4 ranks; the batch's activations do not
    assert peaks[4].breakdown.parameters * 2 == pytest.approx(peaks[2].breakdown.parameters, rel=0.05)
    assert peaks[4].breakdown.optimizer_state < peaks[2].breakdown.optimizer_state
    assert peaks[4].breakdown.activations == peaks[2].breakdown.activations
    result = plan(work, "64MiB", device_type="cpu", world_size=8, fsdp=True, max_batch_size=512)
    assert result.world_size == 8 and result.fsdp
    assert result.global_batch == result.batch_size * 8 == result.to_dict()["global_batch"]
    assert (
        "8 ranks FSDP2-sharded" in result.summary()
        and f"global batch {result.global_batch}" in result.summary()
    )
    assert all(torch.equal(before[k], v) for k, v in work.model.state_dict().items())  # never touched
    assert current_ranks() is None  # the fake process group is gone again


WORKLOAD_FILE = """
import torch
from torch import nn
from torch.nn import functional as F
from batchlab import Workload

def build(device="cpu"):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return Workload(model, lambda b: (torch.randn(b, 16), torch.randn(b, 4)), F.mse_loss, torch.optim.Adam(model.parameters()))
"""


def test_cli_plan_for_8_cards_with_fsdp_answers_per_rank_and_global(tmp_path, capsys):
    from batchlab.cli import main

    path = tmp_path / "tiny.py"
    path.write_text(WORKLOAD_FILE)
    spec = f"{path}:build"
    args = ["plan", "--workload", spec, "--target", "h100-80gb", "--max-batch-size", "64"]
    assert main([*args, "--world-size", "8", "--fsdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["world_size"], data["fsdp"], data["batch_size"]) == (8, True, 64)
    assert data["global_batch"] == 512
    assert any("FSDP2 on 8 ranks" in note for note in data["notes"])
    assert main([*args, "--world-size", "0", "--fsdp"]) == 1  # batchlab's one-line error, before any build
    assert capsys.readouterr().err.strip() == "batchlab: error: invalid --world-size 0: expected an int >= 1"
