"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate used for optimizer step ``step`` (0-based).

    Warmup rises linearly so that step 0 already trains (factor 1/warmup) and step warmup-1 reaches
    1.0. After warmup the factor follows half a cosine from 1.0 at ``warmup_steps`` down to
    ``min_lr_ratio`` at ``total_steps``, and stays there if training runs longer.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`lr_factor`; call ``scheduler.step()`` once per optimizer step."""
    factor = partial(
        lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
