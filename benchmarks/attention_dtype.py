"""bf16 attention on this CPU: PyTorch's bf16 kernel against attending in fp32 (`runtime/attention.py`).

    python -m benchmarks attention-dtype [--batch B] [--reps N]
    python -m benchmarks attention-dtype SPEC [--precision bf16w|bf16] [--batch B] [--reps N]

For each shape (keys = queries, heads, head width), forward and backward of one attention over bf16
Q, K, V: ``scaled_dot_product_attention`` in bf16, and the same call on Q, K, V cast to fp32 with
the result cast back. The shapes are the paper specs' attention calls and a grid of token counts at
head widths 32 and 64; the last column says which the runtime runs (``attention.in_fp32``), so the
table shows whether `CPU_FP32_KEYS` sits at this machine's crossover.

With a SPEC, whole training steps instead: one model, its steps alternated between the runtime's
choice and bf16 attention everywhere (the limit set to 0 for those steps), ``reps`` rounds after one
untimed round, so that the machine's slow and fast phases hit both alike.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime import attention
from avdsl.runtime.attention import CPU_FP32_KEYS, in_fp32
from avdsl.runtime.trial import random_batch

from .timing import best_of_each, cpu_features

# (what, tokens, heads, head width) at paper size
PAPER_SHAPES = (("cav-mae video, unimodal", 49, 12, 64), ("cav-mae audio, unimodal", 128, 12, 64),
                ("cav-mae joint", 177, 12, 64), ("mammut text", 77, 12, 64), ("zorro audio", 256, 12, 64),
                ("mbt audio + bottleneck", 404, 12, 64), ("cav-mae decoder", 708, 16, 32),
                ("zorro video", 784, 12, 64), ("zorro fusion (all tokens)", 1048, 12, 64))
GRID = tuple((f"grid, head width {width}", tokens, 768 // width, width)
             for width in (32, 64) for tokens in (128, 256, 512, 1024))


def _forward_backward(q, k, v, grad, fp32: bool):
    def run():
        for t in (q, k, v):
            t.grad = None
        if fp32:
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        y.backward(grad)
    return run


def run(batch: int = 4, reps: int = 3) -> dict:
    rows = []
    for what, tokens, heads, width in PAPER_SHAPES + GRID:
        q, k, v, grad = (torch.randn(batch, heads, tokens, width, dtype=torch.bfloat16, requires_grad=i < 3)
                         for i in range(4))
        best = best_of_each({"bf16": _forward_backward(q, k, v, grad, False),
                             "fp32": _forward_backward(q, k, v, grad, True)}, reps, min_seconds=1.0)
        rows.append({"what": what, "tokens": tokens, "heads": heads, "width": width, "bf16_ms": best["bf16"] * 1e3,
                     "fp32_ms": best["fp32"] * 1e3, "runtime": "fp32" if in_fp32(q, k) else "bf16"})
    return {"batch": batch, "cpu": cpu_features(), "threads": torch.get_num_threads(), "limit": CPU_FP32_KEYS,
            "rows": rows}


def render(result: dict) -> str:
    lines = [f"bf16 attention, forward + backward, batch {result['batch']} ({result['cpu']}, {result['threads']} "
             f"threads); the runtime attends in fp32 up to keys x head width = {result['limit']}",
             f"{'shape':<30}{'tokens':>7}{'heads':>6}{'width':>6}{'bf16 ms':>10}{'fp32 ms':>10}{'bf16/fp32':>11}"
             f"{'runtime':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['what']:<30}{r['tokens']:>7}{r['heads']:>6}{r['width']:>6}{r['bf16_ms']:>10.1f}"
                     f"{r['fp32_ms']:>10.1f}{r['bf16_ms'] / r['fp32_ms']:>10.2f}x{r['runtime']:>9}")
    return "\n".join(lines)


def run_steps(spec: str, precision: str = "bf16w", batch: int = 4, reps: int = 4) -> dict:
    """Training steps of ``spec`` (eager), alternating fp32 attention where the runtime chooses it and
    bf16 attention everywhere; seconds per step of each round."""
    from .step import make_step

    torch.manual_seed(0)
    model = compile_graph(analyse(spec).graph).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = make_step(model, optimizer, random_batch(model.inputs, batch), precision)
    limits = {"runtime's choice": CPU_FP32_KEYS, "bf16 everywhere": 0}
    times: dict = {name: [] for name in limits}
    try:
        for round_ in range(reps + 1):
            for name, limit in limits.items():
                attention.CPU_FP32_KEYS = limit
                start = time.perf_counter()
                step()
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    finally:
        attention.CPU_FP32_KEYS = CPU_FP32_KEYS
    return {"spec": spec, "precision": precision, "batch": batch, "cpu": cpu_features(),
            "threads": torch.get_num_threads(), "times": times}


def render_steps(result: dict) -> str:
    r = result
    lines = [f"{r['spec']} batch {r['batch']} {r['precision']}, eager training steps alternated "
             f"({r['cpu']}, {r['threads']} threads)"]
    for name, times in r["times"].items():
        ordered = sorted(times)
        lines.append(f"{name:<18} best {ordered[0]:.2f} s  median {ordered[len(ordered) // 2]:.2f} s  "
                     f"all {[round(t, 2) for t in times]}")
    ours, bf16 = (sorted(t) for t in r["times"].values())
    lines.append(f"bf16 everywhere / runtime's choice: best {bf16[0] / ours[0]:.2f}x, "
                 f"median {bf16[len(bf16) // 2] / ours[len(ours) // 2]:.2f}x")
    return "\n".join(lines)
