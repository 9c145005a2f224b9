"""Cold vs warm build + compile, each in a fresh Python process.

Three runs per spec, each a new process that builds the model from the spec, compiles it (fullgraph;
``--scope regional``, the default: each distinct encoder layer once, reused by the layers like it, see
`avdsl.runtime.regional`; ``--scope whole``: the whole model) and runs one forward + backward:
  cold          empty avdsl cache, empty inductor cache (and no precompiled headers): everything is compiled;
  warm          the avdsl cache and the inductor cache of the cold run: what a second run of
                `avdsl train --compile` on the same machine sees (the CLI keeps inductor's cache dir
                under avdsl's, `$AVDSL_CACHE_DIR/inductor`);
  fresh-machine the avdsl cache of the cold run, a *new empty* inductor cache (and no precompiled
                headers): only the blob of
                `avdsl.runtime.compile_cache` helps (a fresh container given the avdsl cache dir).
"graphs" is how many graphs Dynamo traced (regional: one per distinct kind of layer call).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime import compile_cache, regional
from avdsl.runtime.trial import random_batch, timed_step

from .timing import ChildFailed, run_child


def compile_model(model, scope: str, inductor_options: dict | None = None):
    """The model compiled with fullgraph (a graph break is an error): per encoder layer, or whole;
    ``inductor_options`` go to the regional compile (over `regional.CPU_OPTIONS`)."""
    extra = {"options": inductor_options} if inductor_options else {}
    if scope == "regional" and regional.compile_layers(model, fullgraph=True, dynamic=False, **extra):
        return model
    return torch.compile(model, fullgraph=True, dynamic=False)


def once(spec: str, batch: int, precision: str, scope: str = "regional") -> dict:
    """Build + compile + one training forward/backward in this process, using the compile cache."""
    start = time.perf_counter()
    analysis = analyse(spec)
    model = compile_graph(analysis.graph).train()
    build_s = time.perf_counter() - start
    key = compile_cache.CacheKey(model.spec_hash, precision, batch, f"train-{scope}")
    loaded = compile_cache.load(key)
    compiled = compile_model(model, scope)
    data = random_batch(model.inputs, batch)
    step_start = time.perf_counter()
    timed_step(compiled, data, precision)
    compile_s = time.perf_counter() - step_start
    saved = None if loaded else compile_cache.save(key)
    # private API: Dynamo's own count of the graphs it traced in this process (no public counter)
    from torch._dynamo.utils import counters
    return {"build_s": build_s, "compile_s": compile_s, "total_s": time.perf_counter() - start,
            "cache_loaded": loaded, "cache_saved": str(saved) if saved else None, "graph_breaks": 0,
            "graphs": counters["stats"]["unique_graphs"]}


def _subprocess(spec: str, batch: int, precision: str, scope: str, avdsl_dir: str, inductor_dir: str) -> dict:
    # inductor keeps its precompiled C++ headers under $TMPDIR whatever its cache dir: a temp dir beside
    # the inductor cache makes a cold run build them as a new machine does
    tmp = Path(f"{inductor_dir}-tmp")
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, AVDSL_CACHE_DIR=avdsl_dir, TORCHINDUCTOR_CACHE_DIR=inductor_dir, TMPDIR=str(tmp))
    start = time.perf_counter()
    try:
        result = run_child(["compile-once", spec, "--batch", str(batch), "--precision", precision, "--scope", scope], env)
    except ChildFailed as failed:
        raise RuntimeError(f"compile of {spec} failed:\n{failed.stderr[-3000:]}") from None
    result["process_s"] = time.perf_counter() - start  # includes starting Python and importing torch
    return result


def run(specs: list[str], batch: int, precision: str, scope: str = "regional") -> dict:
    rows = []
    for spec in specs:
        with tempfile.TemporaryDirectory() as root:
            avdsl, inductor, empty = f"{root}/avdsl", f"{root}/inductor", f"{root}/inductor-empty"
            runs = {"cold": _subprocess(spec, batch, precision, scope, avdsl, inductor),
                    "warm": _subprocess(spec, batch, precision, scope, avdsl, inductor),
                    "fresh-machine": _subprocess(spec, batch, precision, scope, avdsl, empty)}
        rows.append({"spec": spec, "batch": batch, "precision": precision, "scope": scope, "runs": runs})
    return {"rows": rows}


def render(result: dict) -> str:
    scopes = sorted({r.get("scope", "whole") for r in result["rows"]})
    lines = [f"compiled: {', '.join(scopes)}", f"{'spec':<16}{'run':<15}{'build s':>9}{'graphs':>7}{'compile+step s':>16}{'in-process s':>14}{'process s':>11}  cache"]
    for r in result["rows"]:
        for name, x in r["runs"].items():
            cache = "loaded" if x["cache_loaded"] else ("saved" if x["cache_saved"] else "-")
            lines.append(f"{r['spec']:<16}{name:<15}{x['build_s']:>9.2f}{x.get('graphs', 0):>7}{x['compile_s']:>16.2f}{x['total_s']:>14.2f}"
                         f"{x['process_s']:>11.2f}  {cache}")
    return "\n".join(lines)
