"""`avdsl build`: validate a spec, build its graph, print the summary; optionally compile and run it."""
from __future__ import annotations

import json
import time
from enum import Enum
from typing import List, Optional

import typer

from ..api import analyse
from ..limits import MAX_BATCH
from .common import SPEC_HELP, Precision, complete_spec, out
from ..summary import render, summarize


class Emit(str, Enum):
    code = "code"
    graph = "graph"


def build_command(
    spec: str = typer.Argument(..., help=SPEC_HELP, autocompletion=complete_spec),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a value: `--set encoders.backbone.depth=6` (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (for scripts)."),
    emit: Optional[Emit] = typer.Option(None, "--emit", help="Print the generated forward code, or the graph (nodes and edges)."),
    compile_: bool = typer.Option(False, "--compile", help="Also torch.compile the model and time one forward+backward on random inputs."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, max=MAX_BATCH, help="Batch size for --compile (default: the spec's `dims.B`, else 2)."),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="Precision for --compile (bf16: autocast)."),
) -> None:
    """Validate SPEC, infer every shape, and print a summary: streams, routing per layer range,
    parameters per component and forward FLOPs.

    Examples:

      avdsl build zorro

      avdsl build specs/tiny/zorro.yaml --compile

      avdsl build mbt --set vars.fusion_layer=4 --json

      avdsl build tiny/zorro --emit code
    """
    t0 = time.perf_counter()
    analysis = analyse(spec, set_ or [])
    build_seconds = time.perf_counter() - t0
    summary = summarize(analysis)
    summary["timings"] = {"build_s": round(build_seconds, 4)}
    if emit == Emit.code:
        from ..codegen import generate

        print(generate(analysis.graph))
        return
    if emit == Emit.graph:
        g = analysis.graph
        for node in g.nodes():
            ins = ", ".join(node.inputs)
            print(f"{node.id:<28} {node.kind:<10} ({ins}) -> " +
                  ", ".join(f"{o}{list(g.tensors[o].shape)}" for o in node.outputs if o in g.tensors))
        return
    if compile_:
        summary["compile"] = _compile_and_run(analysis, batch or int(analysis.spec.dims.get("B", 2)), precision.value)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(render(summary))
    out.print(f"built in {build_seconds:.2f} s")
    if compile_:
        c = summary["compile"]
        out.print(f"compiled in {c['compile_s']:.1f} s{' (from the compile cache)' if c['cache_hit'] else ''} with "
                  f"one graph (fullgraph); forward+backward "
                  f"(batch {c['batch']}, {c['precision']}): eager {c['eager_step_s'] * 1000:.1f} ms, compiled "
                  f"{c['compiled_step_s'] * 1000:.1f} ms; loss {c['loss']:.4f}")


def _compile_and_run(analysis, batch: int, precision: str) -> dict:
    import torch

    from ..compiler import compile_graph, device_memory
    from ..passes.memory import check_fits
    from ..runtime import compile_cache
    from ..runtime.trial import random_batch, timed_step

    check_fits(analysis.graph, analysis.cost, batch, True, device_memory("cpu"))  # a training step at this batch
    model = compile_graph(analysis.graph)
    model.train()
    data = random_batch(model.inputs, batch)
    timed_step(model, data, precision)  # warm up eager
    eager_s, _ = timed_step(model, data, precision)
    key = compile_cache.CacheKey(model.spec_hash, precision, batch, "train")
    cached = compile_cache.load(key)  # an unchanged spec reuses what an earlier build compiled
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error, not a slow fallback
    t0 = time.perf_counter()
    _, result = timed_step(compiled, data, precision)
    compile_s = time.perf_counter() - t0
    if not cached:
        compile_cache.save(key)
    steps = [timed_step(compiled, data, precision)[0] for _ in range(3)]
    return {"batch": batch, "precision": precision, "fullgraph": True, "cache_hit": cached,
            "compile_s": round(compile_s, 2), "eager_step_s": round(eager_s, 4),
            "compiled_step_s": round(min(steps), 4), "loss": float(result["loss"].detach())}
