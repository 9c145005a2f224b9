"""A training step (forward, backward, AdamW) per spec: eager fp32, eager bf16, compiled bf16, and
compiled fp32 (the fastest on CPUs without native bf16); and bf16w, eager and compiled: bf16 weights
and activations without autocast, fp32 master weights in the optimizer (`master_weights_step`).

Achieved FLOP/s uses the cost pass as the numerator: a training step is ~3x the forward FLOPs
(`Cost.total_flops`, which counts only the attention pairs the routing allows) times the batch. The
machine's matmul peaks are measured first in the same run, so the fractions compare like with like.
A configuration whose predicted time (FLOPs / half the peak of its dtype) exceeds the budget is
skipped and reported as such rather than left running for an hour.
"""
from __future__ import annotations

import time

import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.train.master import Bf16Copy
from avdsl.runtime.trial import random_batch

from .compile import compile_model
from .timing import machine_peaks, peak_tflops

MODES = (("eager", "fp32"), ("eager", "bf16"), ("compiled", "bf16"), ("compiled", "fp32"), ("eager", "bf16w"),
         ("compiled", "bf16w"))


def make_step(model, optimizer, batch: dict, precision: str, device_type: str = "cpu", scope: str | None = None):
    """One optimisation step as a closure; returns the loss. ``precision``: fp32, bf16 (autocast) or
    bf16w (bf16 weights, see `master_weights_step`). ``scope`` (regional or whole) compiles the model
    the step runs on: ``model`` itself, or for bf16w its bf16 copy (a copy made after compiling would
    run eager: the compiled code belongs to the original)."""
    if precision == "bf16w":
        return master_weights_step(model, optimizer, batch, scope)
    runner = compile_model(model, scope) if scope else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = runner(**batch)["loss"]
        loss.backward()
        optimizer.step()
        return loss
    return step


def master_weights_step(model, optimizer, batch: dict, scope: str | None = None):
    """A bf16w step (`avdsl.runtime.train.master`): forward and backward on a bf16 copy of ``model``
    (compiled when ``scope`` is given), an AdamW like ``optimizer`` on its fp32 weights as the master copy."""
    half = Bf16Copy(model)
    if scope:
        half.module = compile_model(half.module, scope)
    group = optimizer.param_groups[0]
    masters = torch.optim.AdamW(model.parameters(), lr=group["lr"], weight_decay=group["weight_decay"], fused=True)

    def step():
        loss = half(**batch)["loss"]
        loss.backward()
        half.gradients_to_masters()
        masters.step()
        half.masters_to_copy()
        return loss
    return step


def time_mode(spec: str, batch: int, mode: str, precision: str, reps: int, scope: str = "regional") -> dict:
    """Build a fresh model, run one untimed step (for `compiled`: the compile), then ``reps`` timed."""
    analysis = analyse(spec)
    torch.manual_seed(0)
    model = compile_graph(analysis.graph).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training loop
    torch.compiler.reset()  # every spec compiles from scratch: no recompiles, no automatic dynamic shapes
    step = make_step(model, optimizer, random_batch(model.inputs, batch), precision,
                     scope=scope if mode == "compiled" else None)
    return time_steps(step, reps)


def time_steps(step, reps: int, sync=lambda: None) -> dict:
    """The first step (compiles when the model is compiled) and the best of ``reps`` more, in seconds."""
    start = time.perf_counter()
    loss = float(step().detach())
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"step_s": min(times), "first_step_s": first, "loss": loss}


def run(specs: list[str], batch: int | None, reps: int, budget: float, scope: str = "regional") -> dict:
    analyses = {spec: analyse(spec) for spec in specs}  # spec mistakes surface before any timing
    peaks = machine_peaks()
    rows = []
    for spec, analysis in analyses.items():
        b = batch or int(analysis.spec.dims.get("B", 2))
        flops = 3 * analysis.cost.total_flops * b
        for mode, precision in MODES:
            peak = peak_tflops(peaks, precision) * 1e12
            row = {"spec": spec, "batch": b, "mode": mode, "precision": precision, "step_flops": flops}
            predicted = flops / (0.5 * peak)
            if predicted > budget:
                row["skipped"] = f"predicted {predicted:.0f} s per step at half the {precision} peak > budget {budget:.0f} s"
            else:
                try:
                    row.update(time_mode(spec, b, mode, precision, reps, scope))
                except Exception as e:  # report and go on with the other configurations
                    row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    rows.append(row)
                    continue
                row["tflops"] = flops / row["step_s"] / 1e12
                row["of_bf16_peak"] = row["tflops"] / peaks["bf16_tflops"]
                row["of_fp32_peak"] = row["tflops"] / peaks["fp32_tflops"]
            rows.append(row)
    return {"peaks": peaks, "rows": rows}


def render(result: dict) -> str:
    p = result["peaks"]
    lines = [f"matmul peak ({p['threads']} threads, {p['cpu']}): fp32 {p['fp32_tflops']:.4f} TFLOP/s, "
             f"bf16 {p['bf16_tflops']:.4f} TFLOP/s",
             f"{'spec':<16}{'batch':>6} {'mode':<9}{'prec':<6}{'GFLOP':>9}{'step ms':>10}{'TFLOP/s':>9}"
             f"{'%bf16pk':>9}{'%fp32pk':>9}{'loss':>9}"]
    for r in result["rows"]:
        head = f"{r['spec']:<16}{r['batch']:>6} {r['mode']:<9}{r['precision']:<6}{r['step_flops'] / 1e9:>9.1f}"
        if "skipped" in r:
            lines.append(f"{head}  skipped: {r['skipped']}")
        else:
            lines.append(f"{head}{r['step_s'] * 1e3:>10.1f}{r['tflops']:>9.4f}{100 * r['of_bf16_peak']:>8.0f}%"
                         f"{100 * r['of_fp32_peak']:>8.0f}%{r['loss']:>9.4f}")
    return "\n".join(lines)
