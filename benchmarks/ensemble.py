"""N runs of one spec: N lone training steps one after another, against one vectorized ensemble step
(`avdsl.runtime.train.ensemble.Vectorized`: vmap over stacked parameters and batches).

Both sides do the whole optimisation step of each member (forward, backward, gradient clipping,
AdamW), eager fp32, on the same random batches; data loading is left out (it is the same work
either way). Rounds are interleaved so that load from other processes hits both alike, and the
fastest round of each is reported.
"""
from __future__ import annotations

import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.train.ensemble import Vectorized
from avdsl.runtime.trial import random_batch

from .timing import best_of_each


def run(spec: str, members: int, batch: int | None, reps: int) -> dict:
    analysis = analyse(spec)
    b = batch or int(analysis.spec.dims.get("B", 2))
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(compile_graph(analysis.graph).train())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    batches = [random_batch(models[0].inputs, b, torch.Generator().manual_seed(seed)) for seed in range(members)]
    stacked = {k: torch.stack([x[k] for x in batches]) for k in batches[0]}
    vectorized = Vectorized(models)

    def update(i: int) -> None:
        torch.nn.utils.clip_grad_norm_(models[i].parameters(), 1.0)
        optimizers[i].step()
        optimizers[i].zero_grad(set_to_none=True)

    def sequential() -> None:
        for i, (model, x) in enumerate(zip(models, batches)):
            model(**x)["loss"].backward()
            update(i)

    def ensemble() -> None:
        loss, _ = vectorized(stacked)
        loss.sum().backward()
        for i in range(members):
            update(i)

    best = best_of_each({"sequential": sequential, "ensemble": ensemble}, reps=reps)
    samples = members * b
    return {"spec": spec, "members": members, "batch": b, "threads": torch.get_num_threads(),
            "cpu": torch.backends.cpu.get_cpu_capability(),
            **{f"{k}_step_s": v for k, v in best.items()},
            **{f"{k}_samples_per_s": samples / v for k, v in best.items()},
            "speedup": best["sequential"] / best["ensemble"]}


def render(rows: list[dict]) -> str:
    lines = [f"{'spec':<14}{'members':>8}{'batch':>6}{'threads':>8}{'sequential ms':>15}{'ensemble ms':>13}"
             f"{'seq samples/s':>15}{'ens samples/s':>15}{'speedup':>9}"]
    for r in rows:
        lines.append(f"{r['spec']:<14}{r['members']:>8}{r['batch']:>6}{r['threads']:>8}{r['sequential_step_s'] * 1e3:>15.1f}"
                     f"{r['ensemble_step_s'] * 1e3:>13.1f}{r['sequential_samples_per_s']:>15.0f}"
                     f"{r['ensemble_samples_per_s']:>15.0f}{r['speedup']:>8.2f}x")
    return "\n".join(lines)
