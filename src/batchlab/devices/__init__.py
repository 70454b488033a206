"""Devices: where a step runs and how its memory is read. See :mod:`batchlab.devices.base`."""

from __future__ import annotations

import torch

from batchlab.devices.base import Device, Measurement
from batchlab.devices.cpu import CPUDevice
from batchlab.devices.cuda import CUDADevice
from batchlab.devices.simulated import SimulatedDevice, allocator_memory

__all__ = [
    "Device",
    "Measurement",
    "CPUDevice",
    "CUDADevice",
    "SimulatedDevice",
    "allocator_memory",
    "parse_device",
    "resolve_device",
]

_ACCEPTED = '"auto", "cpu", "cuda", "cuda:N", a torch.device or a Device'


def parse_device(spec: str | torch.device, *, check_available: bool = True) -> torch.device:
    """Parse ``"auto" | "cpu" | "cuda" | "cuda:N" | torch.device`` to a torch.device; check CUDA exists.

    ``"auto"`` is CUDA when available, else the CPU. Anything else raises ``ValueError`` naming the value.
    """
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        target = torch.device(spec.strip().lower() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {spec!r}: expected {_ACCEPTED}") from None
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r}: batchlab measures {_ACCEPTED}")
    if check_available and target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r}: CUDA is not available in this torch build or on this machine; use 'cpu'"
        )
    return target


def resolve_device(
    spec: str | torch.device | Device | None, model_device: torch.device | None = None
) -> Device:
    """Turn ``"auto" | "cpu" | "cuda[:N]" | torch.device | Device`` into a :class:`Device`.

    ``"auto"`` follows the workload's model (``model_device``), or picks CUDA when available for a plain step
    callable. A device that disagrees with where the model lives is an error: batchlab never moves a model.
    """
    if isinstance(spec, Device):
        return spec
    if (
        spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto")
    ) and model_device is not None:
        target = model_device
    else:
        target = parse_device("auto" if spec is None else spec, check_available=False)
    if model_device is not None and (
        target.type != model_device.type
        or (target.type == "cuda" and target.index is not None and target.index != model_device.index)
    ):
        raise ValueError(
            f"device {spec!r} does not match the workload's model, which is on {model_device}; "
            "move the model first (batchlab never moves it), or pass device='auto'"
        )
    if target.type == "cuda":
        parse_device(target)  # now say so if CUDA is missing
        return CUDADevice(model_device if model_device is not None else target)
    return CPUDevice()
