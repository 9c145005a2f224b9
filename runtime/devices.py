"""Where a step runs: moving a batch to a device, and the autocast context of a precision."""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "bf16w")


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` for ``precision="bf16"`` (and for evaluating a ``bf16w`` run, whose
    model holds fp32 master weights); for "fp32" a context that changes nothing."""
    device_type = device if isinstance(device, str) else device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision in ("bf16", "bf16w"))


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
