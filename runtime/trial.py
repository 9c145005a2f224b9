"""Random inputs of the declared shapes, and timed trial steps (for `avdsl build --compile` and benches)."""
from __future__ import annotations

import time

import torch

from . import devices
from .contracts import InputSpec


def random_batch(inputs: list[InputSpec], batch: int, generator: torch.Generator | None = None, device="cpu") -> dict:
    """A batch of plausible random data for each declared input (ids and labels in range)."""
    g = generator or torch.Generator().manual_seed(0)
    out = {}
    for spec in inputs:
        shape = (batch,) + tuple(spec.shape)
        if spec.kind == "label":
            out[spec.name] = torch.randint(0, spec.classes, shape, generator=g)
        elif spec.kind == "multilabel":
            out[spec.name] = (torch.rand(shape, generator=g) < 0.1).float()
        elif spec.kind == "text":
            ids = torch.randint(3, 259, shape, generator=g)
            ids[:, 0] = 1
            out[spec.name] = ids
        else:
            out[spec.name] = torch.randn(shape, generator=g)
    return {k: v.to(device) for k, v in out.items()}


def timed_step(model, batch: dict, precision: str = "fp32", backward: bool = True) -> tuple[float, dict]:
    """One forward (and backward) pass; returns seconds and the outputs."""
    device_type = next(model.parameters()).device.type
    start = time.perf_counter()
    with devices.autocast(device_type, precision):
        out = model(**batch)
    if backward and out["loss"] is not None:
        out["loss"].backward()
    return time.perf_counter() - start, out
