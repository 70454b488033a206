"""Plan without the device: a training step's memory from fake tensors, for a card you do not have.

- :mod:`~batchlab.planning.fake`: :class:`FakeDevice`, a step on fake tensors under torch's MemTracker.
- :mod:`~batchlab.planning.allocator`: what the CUDA caching allocator adds over the tensors.
- :mod:`~batchlab.planning.kernels`: kernels whose fake versions leave memory out (oneDNN's LSTM workspace).
- :mod:`~batchlab.planning.cards`: the card table and the one target parser.
- :mod:`~batchlab.planning.plan`: :func:`plan`, the largest batch on a target, searched on the fake device.
- :mod:`~batchlab.planning.shapes`: :func:`plan_shapes`, the largest batch per sequence length or image size;
  :func:`estimate_memory_lines`, the lines that seed a measured shape table.
"""

from batchlab.planning.cards import CARDS, Card, PlanTarget, resolve_target
from batchlab.planning.fake import FakeDevice, FakeEstimate
from batchlab.planning.plan import PlanResult, estimate_memory_line, plan
from batchlab.planning.shapes import PlanShapeTable, estimate_memory_lines, plan_shapes

__all__ = [
    "CARDS",
    "Card",
    "FakeDevice",
    "FakeEstimate",
    "PlanResult",
    "PlanShapeTable",
    "PlanTarget",
    "estimate_memory_line",
    "estimate_memory_lines",
    "plan",
    "plan_shapes",
    "resolve_target",
]
