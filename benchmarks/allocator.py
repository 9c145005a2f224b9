"""The training step with glibc's default malloc thresholds against `avdsl.runtime.memory.keep_freed_memory`.

    python -m benchmarks allocator [SPEC] [--precision fp32] [--mode eager|compiled] [--batch 4] [--reps 3]

Each setting runs in its own fresh process (the thresholds are process-wide and glibc adjusts its
defaults as a process runs), alternating default, kept, default, kept, so that a change in the
machine's speed falls on both. Per step: wall time, user and system CPU time, minor page faults
(pages the kernel had to map and zero-fill) and the peak resident memory of the process. Page faults
and system time are what the setting changes directly; wall time follows, within the machine's noise.
"""
from __future__ import annotations

import resource
import statistics
import time

import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.trial import random_batch

from .step import make_step
from .timing import ChildFailed, cpu_features, peak_memory_bytes, run_child

SETTINGS = ("default", "kept")


def once(spec: str, batch: int, precision: str, mode: str, reps: int) -> dict:
    """Two untimed steps (the compile, for `compiled`; glibc's thresholds settle), then ``reps`` steps."""
    torch.manual_seed(0)
    model = compile_graph(analyse(spec).graph).train()
    data = random_batch(model.inputs, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = make_step(model, optimizer, data, precision, "cpu", "regional" if mode == "compiled" else None)
    step()
    step()
    walls = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(reps):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": min(walls), "user_s": (after.ru_utime - before.ru_utime) / reps,
            "sys_s": (after.ru_stime - before.ru_stime) / reps, "faults": (after.ru_minflt - before.ru_minflt) / reps,
            "peak_gb": peak_memory_bytes() / 1e9}


def run(spec: str, batch: int, precision: str, mode: str, reps: int, rounds: int = 2) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        for setting in SETTINGS:
            try:
                runs[setting].append(run_child(["allocator-once", spec, "--batch", str(batch), "--precision", precision,
                                                "--mode", mode, "--reps", str(reps), "--allocator", setting]))
            except ChildFailed as failed:
                raise RuntimeError(f"allocator-once {setting} failed:\n{failed.stderr[-2000:]}") from None
    rows = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in SETTINGS}
    return {"spec": spec, "batch": batch, "precision": precision, "mode": mode, "reps": reps, "rounds": rounds,
            "cpu": cpu_features(), "threads": torch.get_num_threads(), "rows": rows, "runs": runs}


def render(result: dict) -> str:
    lines = [f"CPU capability: {result['cpu']}, {result['threads']} threads",
             f"{result['spec']} batch {result['batch']}, {result['mode']} {result['precision']} training step; "
             f"median over {result['rounds']} fresh processes per setting (each the best wall of {result['reps']} steps)",
             f"{'malloc':<10}{'wall s':>8}{'user s':>8}{'sys s':>8}{'faults':>10}{'peak GB':>9}"]
    for setting, r in result["rows"].items():
        lines.append(f"{setting:<10}{r['wall_s']:>8.2f}{r['user_s']:>8.2f}{r['sys_s']:>8.2f}{r['faults']:>10.0f}{r['peak_gb']:>9.2f}")
    d, k = result["rows"]["default"], result["rows"]["kept"]
    lines.append(f"kept / default: wall {k['wall_s'] / d['wall_s']:.2f}x, system time {k['sys_s'] / max(d['sys_s'], 1e-9):.2f}x, "
                 f"page faults {k['faults'] / max(d['faults'], 1):.3f}x")
    return "\n".join(lines)
