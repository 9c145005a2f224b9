"""A training step (forward, backward, AdamW) per spec: eager fp32, eager bf16, compiled bf16, and
compiled fp32 (the fastest on CPUs without native bf16); and bf16w, eager and compiled: bf16 weights
and activations without autocast, fp32 master weights in the optimizer (`master_weights_step`).

Achieved FLOP/s uses the cost pass as the numerator: a training step is ~3x the forward FLOPs
(`Cost.total_flops`, which counts only the attention pairs the routing allows) times the batch. The
machine's matmul peaks are measured first in the same run, so the fractions compare like with like.
A configuration whose predicted time (FLOPs / half the peak of its dtype) exceeds the budget is
skipped and reported as such rather than left running for an hour.

``--attention`` chooses how the encoder layers attend: ``planned`` (the routing plan's blocks, the
default), ``dense`` (one SDPA per layer and weight set over the concatenated tokens with the routing's
boolean mask, `avdsl.runtime.encoder.use_dense_attention`: same weights, same loss) or ``both``, which
adds dense rows beside the planned ones for the eager modes (fp32, bf16 autocast, bf16w) and a table
of the ratios planned / dense of step time, TFLOP/s and peak memory. The compiled modes stay planned
only under ``both``: compiling the dense model too would double the compile time of the run
(``--attention dense`` compiles it). TFLOP/s counts the work the routing allows on both sides, so the
dense figure is lower by the work it spends on masked pairs.

Every configuration runs in a fresh process (``step-once``), so its peak memory (max RSS) is its own.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.encoder import use_dense_attention
from avdsl.runtime.train.master import Bf16Copy
from avdsl.runtime.trial import random_batch

from .compile import compile_model
from .timing import machine_peaks, peak_memory_bytes, peak_tflops, run_child

MODES = (("eager", "fp32"), ("eager", "bf16"), ("compiled", "bf16"), ("compiled", "fp32"), ("eager", "bf16w"),
         ("compiled", "bf16w"))
ATTENTION = ("planned", "dense", "both")


def configurations(attention: str) -> list[tuple[str, str, str]]:
    """(mode, precision, attention) of each row: ``both`` runs dense beside planned in the eager modes."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
    if attention != "both":
        return [(mode, precision, attention) for mode, precision in MODES]
    return [(mode, precision, kind) for mode, precision in MODES
            for kind in (("planned", "dense") if mode == "eager" else ("planned",))]


def make_step(model, optimizer, batch: dict, precision: str, device_type: str = "cpu", scope: str | None = None,
              inductor_options: dict | None = None):
    """One optimisation step as a closure; returns the loss. ``precision``: fp32, bf16 (autocast) or
    bf16w (bf16 weights, see `master_weights_step`). ``scope`` (regional or whole) compiles the model
    the step runs on: ``model`` itself, or for bf16w its bf16 copy (a copy made after compiling would
    run eager: the compiled code belongs to the original)."""
    if precision == "bf16w":
        return master_weights_step(model, optimizer, batch, scope, inductor_options)
    runner = compile_model(model, scope, inductor_options) if scope else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = runner(**batch)["loss"]
        loss.backward()
        optimizer.step()
        return loss
    return step


def master_weights_step(model, optimizer, batch: dict, scope: str | None = None, inductor_options: dict | None = None):
    """A bf16w step (`avdsl.runtime.train.master`): forward and backward on a bf16 copy of ``model``
    (compiled when ``scope`` is given), an AdamW like ``optimizer`` on its fp32 weights as the master copy."""
    half = Bf16Copy(model)
    if scope:
        half.module = compile_model(half.module, scope, inductor_options)
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


def time_mode(spec: str, batch: int, mode: str, precision: str, reps: int, scope: str = "regional",
              attention: str = "planned") -> dict:
    """Build a fresh model, run one untimed step (for `compiled`: the compile), then ``reps`` timed;
    with the peak memory of this process."""
    analysis = analyse(spec)
    torch.manual_seed(0)
    model = compile_graph(analysis.graph).train()
    use_dense_attention(model, attention == "dense")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training loop
    torch.compiler.reset()  # every spec compiles from scratch: no recompiles, no automatic dynamic shapes
    step = make_step(model, optimizer, random_batch(model.inputs, batch), precision,
                     scope=scope if mode == "compiled" else None)
    return {**time_steps(step, reps), "peak_memory_gb": peak_memory_bytes() / 1e9}


def _subprocess(spec: str, batch: int, config: tuple, reps: int, scope: str) -> dict:
    """`time_mode` in a fresh Python process (``python -m benchmarks step-once``)."""
    mode, precision, attention = config
    if Path(spec).is_file():  # the child runs in the repository root
        spec = str(Path(spec).resolve())
    return run_child(["--batch", str(batch), "--reps", str(reps), "--scope", scope, "--attention", attention,
                      "--", "step-once", spec, mode, precision])  # after --: never an option


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


def run(specs: list[str], batch: int | None, reps: int, budget: float, scope: str = "regional",
        attention: str = "planned") -> dict:
    configs = configurations(attention)
    analyses = {spec: analyse(spec) for spec in specs}  # spec mistakes surface before any timing
    peaks = machine_peaks()
    rows = []
    for spec, analysis in analyses.items():
        b = batch or int(analysis.spec.dims.get("B", 2))
        flops = 3 * analysis.cost.total_flops * b
        for mode, precision, kind in configs:
            peak = peak_tflops(peaks, precision) * 1e12
            row = {"spec": spec, "batch": b, "mode": mode, "precision": precision, "attention": kind, "step_flops": flops}
            predicted = flops / (0.5 * peak)
            if predicted > budget:
                row["skipped"] = f"predicted {predicted:.0f} s per step at half the {precision} peak > budget {budget:.0f} s"
            else:
                try:
                    row.update(_subprocess(spec, b, (mode, precision, kind), reps, scope))
                except Exception as e:  # report and go on with the other configurations
                    row["skipped"] = f"failed: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    continue
                row["tflops"] = flops / row["step_s"] / 1e12
                row["of_bf16_peak"] = row["tflops"] / peaks["bf16_tflops"]
                row["of_fp32_peak"] = row["tflops"] / peaks["fp32_tflops"]
            rows.append(row)
    return {"peaks": peaks, "rows": rows, "planned_over_dense": planned_over_dense(rows)}


def planned_over_dense(rows: list[dict]) -> list[dict]:
    """Per spec and mode timed both ways: planned / dense of step time, TFLOP/s and peak memory."""
    timed = {(r["spec"], r["mode"], r["precision"], r["attention"]): r for r in rows if "step_s" in r}
    pairs = []
    for (spec, mode, precision, kind), planned in timed.items():
        dense = timed.get((spec, mode, precision, "dense"))
        if kind != "planned" or dense is None:
            continue
        pair = {"spec": spec, "batch": planned["batch"], "mode": mode, "precision": precision}
        for key in ("step_s", "tflops", "peak_memory_gb"):
            pair[key] = {"planned": planned[key], "dense": dense[key], "ratio": planned[key] / dense[key]}
        pairs.append(pair)
    return pairs


def render(result: dict) -> str:
    p = result["peaks"]
    lines = [f"matmul peak ({p['threads']} threads, {p['cpu']}): fp32 {p['fp32_tflops']:.4f} TFLOP/s, "
             f"bf16 {p['bf16_tflops']:.4f} TFLOP/s",
             f"{'spec':<16}{'batch':>6} {'mode':<9}{'prec':<6}{'attn':<8}{'GFLOP':>9}{'step ms':>10}{'TFLOP/s':>9}"
             f"{'%bf16pk':>9}{'%fp32pk':>9}{'peak GB':>9}{'loss':>9}"]
    for r in result["rows"]:
        head = (f"{r['spec']:<16}{r['batch']:>6} {r['mode']:<9}{r['precision']:<6}{r['attention']:<8}"
                f"{r['step_flops'] / 1e9:>9.1f}")
        if "skipped" in r:
            lines.append(f"{head}  skipped: {r['skipped']}")
        else:
            lines.append(f"{head}{r['step_s'] * 1e3:>10.1f}{r['tflops']:>9.4f}{100 * r['of_bf16_peak']:>8.0f}%"
                         f"{100 * r['of_fp32_peak']:>8.0f}%{r['peak_memory_gb']:>9.2f}{r['loss']:>9.4f}")
    if result["planned_over_dense"]:
        lines += ["", "planned vs dense-masked attention (ratio = planned / dense: step time and memory below 1 "
                      "and TFLOP/s above 1 favour planned)",
                  f"{'spec':<16}{'batch':>6} {'mode':<9}{'prec':<6}{'step ms':>10}{'dense':>10}{'ratio':>7}"
                  f"{'TFLOP/s':>10}{'dense':>9}{'ratio':>7}{'peak GB':>9}{'dense':>8}{'ratio':>7}"]
        for c in result["planned_over_dense"]:
            t, f, m = c["step_s"], c["tflops"], c["peak_memory_gb"]
            lines.append(f"{c['spec']:<16}{c['batch']:>6} {c['mode']:<9}{c['precision']:<6}"
                         f"{t['planned'] * 1e3:>10.1f}{t['dense'] * 1e3:>10.1f}{t['ratio']:>7.2f}"
                         f"{f['planned']:>10.4f}{f['dense']:>9.4f}{f['ratio']:>7.2f}"
                         f"{m['planned']:>9.2f}{m['dense']:>8.2f}{m['ratio']:>7.2f}")
    return "\n".join(lines)
