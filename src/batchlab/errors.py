"""The exceptions batchlab raises, in one place.

    BatchlabError                 base class; catch this to handle anything batchlab decided
    ├── DoesNotFitError           even the smallest batch does not fit the memory budget
    ├── NoNoiseScaleError         advise measured all but a noise scale; its measurements are kept on it
    ├── PeerFailureError          another rank failed mid-step; this one left the step with it (distributed)
    ├── ProcessGroupFailedError   a rank failed where the others waited in a collective; the group timed out
    └── WorkloadError             a workload spec or object that cannot be used (bad name, bad callable)
        └── FakeTensorError       the workload cannot run on fake tensors (``batchlab plan``); names the op

Bad arguments (a batch of 0, a size of "4 potatoes") raise the built-in ``ValueError`` or ``TypeError`` with
a message that names the value and the accepted forms. Errors raised by the user's own model are never
wrapped or renamed: a shape bug surfaces as itself, not as "does not fit".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class BatchlabError(Exception):
    """Base class for errors that batchlab raises about a search or a workload.

    Every one pickles with its fields, so it arrives whole across a process boundary (a Ray trial, a process
    pool): ``Exception``'s own pickling calls the class again with the message alone, which the keyword-only
    fields of the subclasses refuse -- the parent would get "cannot unpickle" in place of the error.
    """

    def __reduce__(self) -> tuple:
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[BatchlabError], args: tuple, state: dict) -> BatchlabError:
    """An error unpickled without calling ``__init__`` again (see :meth:`BatchlabError.__reduce__`)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class DoesNotFitError(BatchlabError):
    """The smallest batch size does not fit the memory budget.

    ``needed_bytes`` is what one step at ``batch_size`` measured (None when it failed with an OOM before a
    peak could be read) and ``budget_bytes`` the budget it was held against.
    """

    def __init__(self, message: str, *, batch_size: int, needed_bytes: int | None, budget_bytes: int):
        super().__init__(message)
        self.batch_size = batch_size
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes


class NoNoiseScaleError(BatchlabError, ValueError):
    """``advise`` measured the fit and the throughput, but the noise scale came out undefined (``note`` says
    why: e.g. the |G|² estimate at or below zero, where the gradient's noise drowns its signal late in training).

    Nothing measured is lost: :meth:`with_critical_batch` recommends on the same fit, readings and ``options``
    (the LR, base batch, rule, the fit's micro-batch: what ``advise`` would recommend with) with a critical batch
    measured apart, e.g. :func:`batchlab.branch_critical_batch`'s ``b_crit``, and returns the
    :class:`~batchlab.Advice`; it pickles with them (``recommend_with`` is a module-level function's partial).
    A ``ValueError`` too, as advise raised before this had a class of its own.
    """

    def __init__(
        self,
        message: str,
        *,
        note: str,
        options: Mapping[str, Any],
        recommend_with: Callable[[float, str | None], Any],
    ):
        super().__init__(message)
        self.note = note
        self.options = options
        self._recommend_with = recommend_with

    def with_critical_batch(self, critical_batch: float, source: str | None = None) -> Any:
        """The :class:`~batchlab.Advice` on the kept measurements with ``critical_batch`` as B_noise (``source``
        in words; default: "the critical batch given")."""
        return self._recommend_with(critical_batch, source)


class PeerFailureError(BatchlabError):
    """Another rank ran out of memory (``out_of_memory``) or raised, so this rank leaves the step too.

    Raised at a sync point (:mod:`batchlab.devices.agreement`) so that no rank waits in a collective that a
    failed rank never reaches; the search and ``OOMGuard`` catch it and step back with every other rank.
    ``ranks`` are the ranks that failed.
    """

    def __init__(self, message: str, *, ranks: list[int], out_of_memory: bool):
        super().__init__(message)
        self.ranks = ranks
        self.out_of_memory = out_of_memory


class ProcessGroupFailedError(BatchlabError):
    """The process group failed mid-step -- a collective waited past its timeout, or a peer closed its
    connection -- and cannot be used any more; every rank raises it, within the collective timeout.

    It follows a failure on one rank *inside* a collective's own work (a buffer it could not allocate) or a
    collective the model issues itself, while the other ranks already waited in it: no sync point can reach
    them there (:mod:`batchlab.devices.agreement`). Not a :class:`PeerFailureError`: no rank may step back and
    retry on a group that is gone. ``reports`` holds what each rank said it raised, in rank order (None: no
    word from that rank), sent through the group's store, which outlives the group.
    """

    def __init__(self, message: str, *, reports: list[str | None]):
        super().__init__(message)
        self.reports = reports


class WorkloadError(BatchlabError):
    """A workload spec or object that batchlab cannot use."""


class FakeTensorError(WorkloadError):
    """The workload cannot run on fake tensors; ``op`` names the operator that needs real data or a kernel.

    Measure on the device instead (``find_batch_size`` / ``batchlab fit``): it needs no fake tensors.
    """

    def __init__(self, message: str, *, op: str, workload: str):
        super().__init__(message)
        self.op = op
        self.workload = workload
