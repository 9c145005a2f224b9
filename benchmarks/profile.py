"""Where a training step's time goes: the top operators of one step under torch.profiler.

    python -m benchmarks profile SPEC [--batch B] [--precision fp32|bf16] [--reps N]

One untimed step warms up, then ``reps`` steps (forward, backward, AdamW) are profiled. Operators are
sorted by their own (self) CPU time, and each is classed as matrix work (matmuls, attention kernels)
or the rest (casts, copies, concatenations, norms, activations, masks, the optimizer), so the share of
the step that is not matrix work is one number.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.trial import random_batch

from .step import make_step
from .timing import cpu_features

MATRIX_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_addmm_activation",
              "aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution")


def run(spec: str, batch: int, precision: str, reps: int, top: int = 25) -> dict:
    torch.manual_seed(0)
    model = compile_graph(analyse(spec).graph).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training loop
    step = make_step(model, optimizer, random_batch(model.inputs, batch), precision)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(({"op": e.key, "calls": e.count // reps, "self_ms": e.self_cpu_time_total / 1e3 / reps,
                    "share": e.self_cpu_time_total / total, "matrix": e.key in MATRIX_OPS} for e in events),
                  key=lambda r: -r["self_ms"])
    matrix = sum(r["self_ms"] for r in rows if r["matrix"])
    return {"spec": spec, "batch": batch, "precision": precision, "reps": reps,
            "step_ms": total / 1e3 / reps, "matrix_ms": matrix, "other_ms": total / 1e3 / reps - matrix,
            "cpu": cpu_features(), "threads": torch.get_num_threads(), "rows": rows[:top]}


def render(result: dict) -> str:
    r = result
    lines = [f"{r['spec']} batch {r['batch']} {r['precision']} ({r['cpu']}, {r['threads']} threads): "
             f"{r['step_ms']:.0f} ms of operator time per step, matrix work {r['matrix_ms']:.0f} ms "
             f"({100 * r['matrix_ms'] / r['step_ms']:.0f}%), the rest {r['other_ms']:.0f} ms",
             f"{'operator':<58}{'calls':>7}{'self ms':>10}{'share':>8}  kind"]
    for row in r["rows"]:
        lines.append(f"{row['op'][:57]:<58}{row['calls']:>7}{row['self_ms']:>10.1f}{100 * row['share']:>7.1f}%  "
                     f"{'matrix' if row['matrix'] else 'other'}")
    return "\n".join(lines)
