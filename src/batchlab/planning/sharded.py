"""Plan for N cards without them: one rank's step under FSDP2, on fake tensors in a fake process group.

:class:`ShardedFakeDevice` is the fake device (:mod:`batchlab.planning.fake`) with two changes: the fake
copy of the model is sharded with FSDP2's ``fully_shard`` over a fake process group of ``world_size`` ranks
(torch's ``"fake"`` backend with ``FakeStore``: collectives return at once, touching no data), and the step
runs under torch's ``FSDPMemTracker``, which follows what FSDP adds over a plain step -- this rank's shard of
the parameters, gradients and optimizer state, the unsharded parameters while a module runs, and the
all-gather and reduce-scatter buffers. The estimate is rank 0's; with even shards every rank's is the same.

What is modelled, and what is refused (one line naming the option): ``fully_shard`` on each module of the
classes in ``shard`` (default: every direct child of the model that holds parameters, the members of a ModuleList or ModuleDict child one by one) and then on the model
itself, over a 1-D mesh, with ``reshard_after_forward`` (True or False). Mixed precision, CPU offload, HSDP
(2-D meshes) and a custom ``shard_placement_fn`` are not modelled. The optimizer is rebuilt over the sharded
parameters with its first param group's settings (FSDP replaces the parameters); several param groups are
refused.

Not counted, because it is not the step's memory: what a process's *first* FSDP2 step adds to its resident
memory once -- ~19 MiB on the CPU whatever the model or world size, 16.5 MiB of it file-backed (the code
pages of libtorch and gloo its code paths fault in, shared by every rank on a host) and ~2.5 MiB of Python
objects and caches (measured, torch 2.14.1: benchmarks/RESULTS.md, "Where the 4-rank miss came from").

torch's pieces here are private modules (``torch.testing._internal.distributed.fake_pg``,
``torch.distributed._tools.fsdp2_mem_tracker``): imported in :func:`_fsdp_internals` only, tested on their
own. Validated against real 2- and 4-rank gloo runs on the CPU (benchmarks/fsdp_plan.py, RESULTS.md).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from batchlab import checks
from batchlab.errors import WorkloadError
from batchlab.planning.cards import PlanTarget
from batchlab.planning.fake import FakeDevice
from batchlab.workload.workload import Workload

# The fully_shard options the plan models, with what each accepts.
MODELLED_OPTIONS = {"reshard_after_forward": (True, False)}

# FSDPMemTracker's category labels (the values of its private enum) -> batchlab's names. The unsharded
# parameters and the collective buffers are what sharding adds; they are "other" in the breakdown and
# listed by name in the estimate's notes.
FSDP_CATEGORIES = {
    "Sharded Param": "parameters",
    "Buffer": "buffers",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "OptState": "optimizer_state",
    "Activation": "activations",
    "Inputs": "activations",
    "Temp": "temporaries",
    "Unsharded Param": "other",
    "All Gather": "other",
    "Reduce Scatter": "other",
}


def check_fsdp_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The ``fully_shard`` options, checked: a one-line error for one the plan does not model."""
    options = dict(options or {})
    for name, value in options.items():
        if name not in MODELLED_OPTIONS:
            raise ValueError(
                f"FSDP option {name!r} is not modelled by the plan: it models "
                f"{', '.join(MODELLED_OPTIONS)} (measure with find_batch_size_distributed on the ranks instead)"
            )
        if value not in MODELLED_OPTIONS[name]:
            raise ValueError(
                f"invalid FSDP option {name}={value!r}: expected one of {MODELLED_OPTIONS[name]}"
            )
    return options


def _fsdp_internals() -> dict[str, Any]:
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed.fsdp import fully_shard
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as exc:  # a torch build without torch.distributed, or before FSDP2's tracker
        raise ImportError(
            f"planning for several ranks needs FSDP2 and its memory tracker, missing from torch "
            f"{torch.__version__}: {exc}"
        ) from None
    return {"FSDPMemTracker": FSDPMemTracker, "fully_shard": fully_shard, "FakeStore": FakeStore}


@contextlib.contextmanager
def fake_process_group(world_size: int, device_type: str = "cpu") -> Iterator[Any]:
    """A fake process group of ``world_size`` ranks (this process is rank 0) and its 1-D device mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        raise RuntimeError(
            "a process group is already initialised in this process: a plan for N ranks runs its own fake one; "
            "plan before torch.distributed.init_process_group, or in another process"
        )
    internals = _fsdp_internals()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=internals["FakeStore"]())
    try:
        # The mesh is made outside fake mode: its construction reads rank values (tolist).
        yield init_device_mesh(device_type, (world_size,))
    finally:
        dist.destroy_process_group()


class ShardedFakeDevice(FakeDevice):
    """One rank's estimated step under FSDP2 on ``world_size`` ranks (module docstring).

    Args:
        workload: the :class:`~batchlab.Workload` with its *unsharded* model (never modified).
        world_size: the ranks the model is sharded over.
        target, device_type: as :class:`~batchlab.planning.fake.FakeDevice` (the card each rank has).
        shard: module classes to ``fully_shard`` one by one (e.g. a transformer block); default: every direct
            child of the model that holds parameters.
        fsdp_options: ``fully_shard`` options; only :data:`MODELLED_OPTIONS`.
    """

    categories = FSDP_CATEGORIES

    def __init__(
        self,
        workload: Workload,
        *,
        world_size: int,
        target: str | int | PlanTarget | None = None,
        device_type: str | None = None,
        shard: Sequence[type[torch.nn.Module]] | None = None,
        fsdp_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workload, target=target, device_type=device_type)
        self.world_size = checks.integer("world_size", world_size)
        self.options = check_fsdp_options(fsdp_options)
        self.shard = tuple(shard) if shard is not None else None
        if self.shard is not None and not all(
            isinstance(c, type) and issubclass(c, torch.nn.Module) for c in self.shard
        ):
            raise TypeError(f"shard must be nn.Module classes, got {shard!r}")
        groups = len(workload.optimizer.param_groups)
        if groups != 1:
            raise WorkloadError(
                f"the FSDP plan rebuilds the optimizer over the sharded parameters and models one param group; "
                f"workload {workload.name!r} has {groups}"
            )
        _fsdp_internals()
        self.name = f"{self.name} x {self.world_size} ranks (FSDP2)"
        self.extra_notes = [
            f"FSDP2 on {self.world_size} ranks (fake process group): rank 0's step; unsharded parameters and "
            "all-gather / reduce-scatter buffers are counted in 'other'"
        ]
        self._mesh: Any = None

    @contextlib.contextmanager
    def _environment(self) -> Iterator[None]:
        with fake_process_group(self.world_size, self.emulated_on.type) as mesh:
            self._mesh = mesh
            try:
                yield
            finally:
                self._mesh = None

    def _units(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules sharded one by one, before the model itself. Modules that share a parameter (tied
        embedding and head) stay in the model's own group: FSDP2 refuses a parameter in two groups."""
        if self.shard is not None:
            units = [m for m in model.modules() if m is not model and isinstance(m, self.shard)]
        else:
            units = []
            for child in model.children():
                # a ModuleList / ModuleDict has no forward to hook: its members (a transformer's blocks) are units
                members = (
                    child.children()
                    if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))
                    else [child]
                )
                units.extend(m for m in members if any(True for _ in m.parameters()))
        holders: dict[int, int] = {}  # id(parameter) -> how many units hold it
        for unit in units:
            for param in set(unit.parameters()):
                holders[id(param)] = holders.get(id(param), 0) + 1
        tied = {i for i, unit in enumerate(units) if any(holders[id(p)] > 1 for p in unit.parameters())}
        return [unit for index, unit in enumerate(units) if index not in tied]

    def _copy(self, fake_mode: Any, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model, optimizer = super()._copy(fake_mode, device)
        fully_shard = _fsdp_internals()["fully_shard"]
        with fake_mode:
            for module in self._units(model):
                fully_shard(module, mesh=self._mesh, **self.options)
            fully_shard(model, mesh=self._mesh, **self.options)
            # the first group's settings that the constructor takes (AdamW's group also holds derived keys)
            accepted = inspect.signature(type(optimizer).__init__).parameters
            group = optimizer.param_groups[0]
            settings = {key: value for key, value in group.items() if key in accepted and key != "params"}
            sharded = type(optimizer)(model.parameters(), **settings)
        return model, sharded

    def _tracker(
        self, torch_: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Any:
        return _fsdp_internals()["FSDPMemTracker"](model, optimizer)


__all__ = [
    "FSDP_CATEGORIES",
    "MODELLED_OPTIONS",
    "ShardedFakeDevice",
    "check_fsdp_options",
    "fake_process_group",
]
