"""bf16 weights with fp32 master weights (``precision="bf16w"``), for CPUs and GPUs with fast bf16.

Under bf16 autocast every step casts each fp32 weight to bf16 and runs LayerNorm, GELU, residual
adds and the losses' inputs through fp32 again; on a CPU with AMX those casts and the fp32
element-wise work cost more than the matrix products (docs/performance.md). Here the forward and
backward run on a bf16 copy of the model instead (weights, buffers, activations and floating inputs
in bf16, no autocast; the losses widen their inputs to fp32 themselves), while the model keeps its
fp32 weights as the optimizer's master copy: after each backward the bf16 gradients are widened
onto the master weights, the optimizer steps them in fp32 (small updates are not lost to bf16
rounding), and the copy takes the new weights. Checkpoints, evaluation and resuming see the fp32
model exactly as in an fp32 or bf16 run.
"""
from __future__ import annotations

import copy

import torch


class Bf16Copy:
    """The bf16 copy of ``model`` that a ``bf16w`` step runs on; ``model`` keeps the master weights."""

    def __init__(self, model: torch.nn.Module):
        self.module = copy.deepcopy(model).to(torch.bfloat16)
        self.pairs = list(zip(model.parameters(), self.module.parameters()))

    def __call__(self, **batch):
        return self.module(**{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                              for k, v in batch.items()})

    def gradients_to_masters(self) -> None:
        """Widen the copy's gradients onto the master weights (and clear the copy's). A master's
        gradient buffer is reused from step to step (``copy_``): allocating hundreds of megabytes of
        fresh fp32 gradients every step costs page faults on a CPU."""
        for master, weight in self.pairs:
            if weight.grad is None:
                master.grad = None
            elif master.grad is None:
                master.grad = weight.grad.float()
            else:
                master.grad.copy_(weight.grad)
            weight.grad = None

    def masters_to_copy(self) -> None:
        """Round the master weights into the copy after an optimizer step."""
        with torch.no_grad():
            for master, weight in self.pairs:
                weight.copy_(master)
