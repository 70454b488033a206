"""A device that runs every probe on every rank at once, for steps that communicate (FSDP, DDP's wrapper).

A sharded model's step cannot run on one rank alone: FSDP all-gathers the parameters before each module and
reduce-scatters the gradients after it, so every rank must probe the *same* batch size at the same time.
:class:`LockstepDevice` wraps each rank's own device (the CPU's whole-process reading, CUDA's allocator) and
makes the search on every rank see the same measurement, so every rank's search takes the same decisions and
runs the same probes in the same order:

- the probe runs under :func:`~batchlab.devices.agreement.sync_points`, so an out-of-memory error on one rank
  ends the probe on all of them (:mod:`batchlab.devices.agreement`), and an error on one makes all raise;
- each rank's peak is scaled to a common budget, ``peak_r x common / budget_r`` (``common`` = the smallest
  rank's budget), and the largest scaled peak is everyone's reading: "fits the common budget" is then
  exactly "every rank fits its own" (``max_r peak_r / budget_r <= fraction``), so ranks with different room
  (mixed cards, another process on one GPU, a different ``memory_budget`` per rank) agree on the batch every
  rank can run;
- the raw peak of every rank is kept per batch size (:attr:`rank_peaks`), so a result can name the rank that
  limited it.

Every probe runs under :func:`~batchlab.devices.ranks.collective_timeout` (``collective_timeout``): a rank
that fails where no sync point reaches the others (inside a collective they already wait in) makes every
rank raise :class:`~batchlab.errors.ProcessGroupFailedError` within that time, naming what each raised,
instead of holding them for the group's own timeout (:mod:`batchlab.devices.agreement`).

Capacity and the hard limit (CPU RAM) are gathered once, when the device is made -- the search asks for them
at times that need not line up across ranks -- scaled the same way, the tightest rank's taken.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab.defaults import COLLECTIVE_TIMEOUT_S
from batchlab.devices.agreement import (
    DONE,
    ERROR,
    OUT_OF_MEMORY,
    PEER,
    StepAgreement,
    account,
    reset_after_failure,
    sync_points,
)
from batchlab.devices.base import Device, Measurement
from batchlab.devices.oom import is_out_of_memory
from batchlab.devices.ranks import Ranks, collective_timeout
from batchlab.errors import BatchlabError, PeerFailureError

_NONE = -1  # on the wire: no reading (an out-of-memory error left no peak, or the device has no hard limit)


class LockstepDevice(Device):
    """Every rank's ``inner`` device, probed together; each reading the tightest rank's (module docstring).

    Args:
        inner: this rank's own device.
        ranks: this rank and the world (:func:`batchlab.devices.ranks.current_ranks`).
        budget_bytes: this rank's budget (its ``memory_budget``, else its device's capacity).
        models: the modules whose sharded parts get sync points (the workload's model).
        collective_timeout: seconds any collective of a probe may wait (None: the group's own timeout).
    """

    def __init__(
        self,
        inner: Device,
        ranks: Ranks,
        budget_bytes: int,
        models: Sequence[torch.nn.Module] = (),
        collective_timeout: float | None = COLLECTIVE_TIMEOUT_S,
    ):
        self.inner, self.ranks, self.models = inner, ranks, list(models)
        self.collective_timeout = collective_timeout
        self.name = f"{inner.name} x {ranks.world_size} ranks (lockstep)"
        self.rank_budgets = ranks.all_gather_ints(int(budget_bytes))
        if min(self.rank_budgets) <= 0:
            raise ValueError(f"every rank needs a positive memory budget; got {self.rank_budgets}")
        self.common_bytes = min(self.rank_budgets)
        own_limit = inner.hard_limit_bytes()
        limits = ranks.all_gather_ints(_NONE if own_limit is None else int(own_limit))
        scaled = [self._scale(limit, rank) for rank, limit in enumerate(limits) if limit != _NONE]
        self._hard_limit = min(scaled) if scaled else None
        self.rank_peaks: dict[int, list[int | None]] = {}  # batch size -> every rank's raw peak

    def _scale(self, value: int, rank: int) -> int:
        """``value`` on ``rank`` in the common budget's terms."""
        return math.ceil(value * self.common_bytes / self.rank_budgets[rank])

    def capacity_bytes(self) -> int:
        return self.common_bytes

    def hard_limit_bytes(self) -> int | None:
        return self._hard_limit

    def in_use_bytes(self) -> int:
        return self.inner.in_use_bytes()

    def for_training(self) -> LockstepDevice:
        """This device around each rank's training twin (:meth:`Device.for_training`: on the CPU glibc's speed
        back), for the timing of a profile given this device (an FSDP model's, every rank together). The
        ranks, budgets and hard limit are this device's, so making it runs no collective -- the ranks need not
        ask at the same moment -- and its readings go to a log of their own, never into the search's
        :attr:`rank_peaks`."""
        inner = self.inner.for_training()
        if inner is self.inner:
            return self
        twin = copy.copy(self)
        twin.inner, twin.rank_peaks = inner, {}
        return twin

    def settings(self) -> dict[str, Any]:
        return {
            **self.inner.settings(),
            "ranks": self.ranks.world_size,
            "rank_budgets": self.rank_budgets,
            "reading": "each rank's peak scaled to the smallest budget; the largest of them",
        }

    def release(self) -> None:
        self.inner.release()

    def synchronize(self) -> None:
        self.inner.synchronize()

    def _begin(self) -> int:  # pragma: no cover - run() is overridden
        raise NotImplementedError

    def _end(self) -> tuple[int, int | None]:  # pragma: no cover - run() is overridden
        raise NotImplementedError

    def _gather_scaled(self, value: int | None) -> list[int]:
        """Every rank's ``value`` (``_NONE`` for None), each scaled to the common budget."""
        values = self.ranks.all_gather_ints(_NONE if value is None else int(value))
        return [_NONE if v == _NONE else self._scale(v, rank) for rank, v in enumerate(values)]

    def run(self, step: Callable[[int], Any], batch_size: int, steps: int = 2) -> Measurement:
        """Run the probe on this rank while every other rank runs it; return the tightest rank's reading.

        Every rank returns the same :class:`Measurement`: ``ok`` only if it fitted everywhere. An error on any
        rank raises on every rank -- this rank's own error, or :class:`~batchlab.errors.BatchlabError` naming
        the rank that raised; a failed process group raises
        :class:`~batchlab.errors.ProcessGroupFailedError` on every rank (module docstring).
        """
        with collective_timeout(self.collective_timeout, self.ranks.group):
            return self._run_together(step, batch_size, steps)

    def _run_together(self, step: Callable[[int], Any], batch_size: int, steps: int) -> Measurement:
        agreement = StepAgreement.among(self.ranks, f"batch {batch_size}", self.collective_timeout)
        own: Measurement | None = None
        error: Exception | None = None
        peer = False
        with sync_points(self.models, agreement):
            try:
                own = self.inner.run(step, batch_size, steps)
                code = DONE if own.ok else OUT_OF_MEMORY
            except PeerFailureError:
                code, peer = PEER, True
            except Exception as exc:  # re-raised below, once every rank knows
                # an OOM the inner device did not turn into a measurement cannot step back (a framework's own)
                code, error = (OUT_OF_MEMORY if is_out_of_memory(exc) else ERROR), exc
        verdict = agreement.finish(code, account(code, error or (own.error if own is not None else None)))
        if verdict.error_ranks:
            if error is not None:
                raise error
            raise BatchlabError(
                f"batch {batch_size}: rank(s) {verdict.error_ranks} raised during the probe; every rank stops "
                "(see that rank's log for its error)"
            )
        if not verdict.ok:
            reset_after_failure(self.models)  # every rank's sharded modules as before the probe
        if peer or error is not None:
            self.inner.release()  # outside the except block: its traceback held the step's tensors
        peaks = self.ranks.all_gather_ints(_NONE if own is None or own.peak_bytes is None else own.peak_bytes)
        self.rank_peaks[batch_size] = [None if p == _NONE else p for p in peaks]
        scaled = [_NONE if p == _NONE else self._scale(p, rank) for rank, p in enumerate(peaks)]
        baselines = self._gather_scaled(None if own is None else own.baseline_bytes)
        allocated = self._gather_scaled(None if own is None else own.allocated_bytes)
        seconds = max(self.ranks.all_gather_ints(0 if own is None else round(own.seconds * 1e6))) / 1e6
        known = [p for p in scaled if p != _NONE]
        return Measurement(
            batch_size,
            verdict.ok,
            max(known) if known else None,
            max(baselines) if max(baselines) != _NONE else None,
            seconds,
            steps,
            max(allocated) if max(allocated) != _NONE else None,
            None if verdict.ok else f"out of memory on rank(s) {verdict.oom_ranks}",
        )

    def limiting_rank(self, batch_size: int) -> int | None:
        """The rank with the least room at ``batch_size``: the largest share of its own budget used."""
        peaks = self.rank_peaks.get(batch_size)
        if not peaks or any(p is None for p in peaks):
            return None
        return max(range(len(peaks)), key=lambda rank: peaks[rank] / self.rank_budgets[rank])

    def __repr__(self) -> str:
        return f"LockstepDevice({self.inner!r}, rank {self.ranks.rank} of {self.ranks.world_size})"


__all__ = ["LockstepDevice"]
