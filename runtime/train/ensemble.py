"""Several runs of one model as one vectorized computation (``torch.func``).

Members share the model's code and parameter shapes and may differ in what an optimizer holds on its
own: initial weights (their seed), learning rate, weight decay, warmup, minimum lr, clipping; and in
the model's two per-member buffers: loss weights (``loss_weights``, which the generated code reads)
and dropout rates (`encoder.Dropout`, which then drops with each member's own rate). Each
member keeps its own ``nn.Module`` (its parameters are the leaves), its own AdamW, scheduler, data
order (its seed), run directory, metrics log, checkpoints and summary, in the same format as
``train`` writes, so ``avdsl eval``/``export``/``train --resume`` read them like any run. Per step the
members' parameters and buffers are stacked (as ``torch.func.stack_module_state`` does, but with
the autograd link to each member's own parameters kept), their batches stacked, and one
``vmap(functional_call)`` runs the forward of all of them; one backward fills every member's
gradients, and each member clips and steps on its own (`Vectorized` is that forward).

What matches a lone run (``train``) step for step: members without random operations (no dropout,
DropToken or random masking), fp32: the same losses and weights within float rounding of the
batched matmuls. With random operations, ``vmap(randomness="different")`` draws independent random
numbers per member from the global generator, so curves match a lone run in distribution, not
draw for draw. Not supported here: several processes (DDP), ``torch.compile`` (members run eagerly),
data whose batches can differ in size between members (items that fail to load).
"""
from __future__ import annotations

import contextlib
import io
import math
import time
import tokenize
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch.func import functional_call, vmap
from torch.utils.data import Dataset

from . import distributed
from ..encoder import Dropout
from .checkpoint import find_latest, load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate
from .loop import NonFiniteLoss, StopRequest, _check_fresh_run_dir, param_groups, resolve_device, seed_everything
from .report import MetricsLog, RunSummary, write_curves, write_summary
from .sampling import make_step_loader
from .schedule import make_scheduler

# settings in which members may differ (each has its own optimizer and data order); `avdsl sweep`
# groups runs that agree in everything else
MEMBER_SETTINGS = ("seed", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "run_dir")


@dataclass
class Member:
    """One run of an ensemble: what ``train`` takes for a lone run."""

    model: torch.nn.Module
    train_set: Dataset
    val_set: Dataset
    config: TrainConfig
    spec_text: str
    spec_hash: str


def _body(code: str) -> str:
    """What generated code runs: its tokens without comments (the header names the spec file and
    hash, and comments show values such as loss weights that members hold apart)."""
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL))


def check_members(members: list[Member]) -> None:
    """Raise ValueError unless the members can run as one ensemble."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    first = members[0]
    shapes = [(n, tuple(p.shape), p.requires_grad) for n, p in first.model.named_parameters()]
    shared = [f.name for f in fields(TrainConfig) if f.name not in MEMBER_SETTINGS]
    for m in members[1:]:
        if [(n, tuple(p.shape), p.requires_grad) for n, p in m.model.named_parameters()] != shapes:
            raise ValueError("ensemble members must have the same parameters (names and shapes)")
        if _body(getattr(m.model, "code", "")) != _body(getattr(first.model, "code", "")):
            raise ValueError("ensemble members must run the same generated code")
        differ = [k for k in shared if getattr(m.config, k) != getattr(first.config, k)]
        if differ:
            raise ValueError(f"ensemble members may differ only in {', '.join(MEMBER_SETTINGS)}; these differ: {differ}")
    if len({str(Path(m.config.run_dir).resolve()) for m in members}) != len(members):
        raise ValueError("ensemble members need one run directory each")


class Vectorized:
    """The members' forward passes as one: ``vmap(functional_call)`` over their stacked parameters,
    buffers and batches. Call it with a batch whose tensors are stacked along a new first dim (one
    slice per member); it returns the members' total losses [N] and loss terms {name: [N]}.
    Parameters are stacked with autograd, so one backward fills every member's own gradients;
    running statistics updated in the pass (BatchNorm) are copied back into each member."""

    def __init__(self, models: list[torch.nn.Module], randomness: str = "different"):
        self.base = models[0]
        self.param_names = [n for n, _ in models[0].named_parameters()]
        self.buffer_names = [n for n, _ in models[0].named_buffers()]
        self.params = [dict(m.named_parameters()) for m in models]
        self.buffers = [dict(m.named_buffers()) for m in models]
        self.vectorized = vmap(self._member, randomness=randomness)
        # dropout sites whose rate differs between members: every member drops with its own rate
        sites = [[m for m in model.modules() if isinstance(m, Dropout)] for model in models]
        for same_site in zip(*sites):
            if len({d.p for d in same_site}) > 1:
                for d in same_site:
                    d.per_member = True

    def _member(self, params: dict, buffers: dict, batch: dict):
        result = functional_call(self.base, (params, buffers), args=(), kwargs=batch)
        return result["loss"], result["losses"]

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict]:
        params = {n: torch.stack([p[n] for p in self.params]) for n in self.param_names}
        buffers = {n: torch.stack([b[n] for b in self.buffers]) for n in self.buffer_names}
        with warnings.catch_warnings():
            # vmap runs CPU flash attention member by member (no batching rule yet) and says so each step
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            loss, terms = self.vectorized(params, buffers, batch)
        with torch.no_grad():
            for n, stacked in buffers.items():
                for i, b in enumerate(self.buffers):
                    b[n].copy_(stacked[i])
        return loss, terms


def train_ensemble(
    members: list[Member],
    on_step: Callable[[int, str], None] | None = None,
    collate_fn: Callable | None = None,
    randomness: str = "different",
) -> list[RunSummary | NonFiniteLoss]:
    """Train the members together; return each one's summary (or the NonFiniteLoss that stopped it).

    ``on_step(step, info)`` is called after every step (a progress view). A member whose loss turns
    non-finite with ``on_nonfinite="stop"`` stops updating and gets no further checkpoints; the others
    go on. Resuming needs every member at the same step (their checkpoints are written together).
    """
    check_members(members)
    started = time.perf_counter()
    first = members[0].config
    n = len(members)
    device = resolve_device(first.device, distributed.current())
    seed_everything(first.seed)
    models = [m.model.to(device).train() for m in members]
    run_dirs = [Path(m.config.run_dir) for m in members]
    optimizers = [torch.optim.AdamW(param_groups(m.model, m.config.weight_decay), lr=m.config.lr) for m in members]
    schedulers = [make_scheduler(o, m.config.warmup_steps, m.config.steps, m.config.min_lr_ratio)
                  for o, m in zip(optimizers, members)]
    counters = [{"skipped_files": 0, "skipped_steps": 0} for _ in members]
    baselines: list[dict] = [{} for _ in members]

    latest = [find_latest(d) if first.resume else None for d in run_dirs]
    start_step, rng = 0, None
    if any(latest):
        if not all(latest):
            raise ValueError("resuming an ensemble needs a checkpoint of every member")
        loaded = [load_checkpoint(p, m.model, o, s, spec_hash=m.spec_hash)
                  for p, m, o, s in zip(latest, members, optimizers, schedulers)]
        if len({c.step for c in loaded}) != 1:
            raise ValueError(f"ensemble members are at different steps {[c.step for c in loaded]}; resume them apart")
        start_step, rng = loaded[0].step, loaded[0].rng
        for i, c in enumerate(loaded):
            baselines[i] = dict(c.baseline)
            counters[i].update({k: int(v) for k, v in c.counters.items()})
    else:
        for d in run_dirs:
            _check_fresh_run_dir(d)
            d.mkdir(parents=True, exist_ok=True)

    def run_eval(i: int) -> dict:
        m = members[i]
        return evaluate(m.model, m.val_set, m.config.eval_batches, m.config.batch_size, collate_fn, m.config.precision)

    for i in range(n):
        if not baselines[i]:
            baselines[i] = run_eval(i)
    if rng is not None:
        restore_rng_state(rng)
    logs = [MetricsLog(d, start_step, resumed=start_step > 0) for d in run_dirs]
    if start_step == 0:
        for log, b in zip(logs, baselines):
            log.write("eval", 0, b)
    loaders = [iter(make_step_loader(m.train_set, m.config.batch_size, m.config.seed, start_step, m.config.steps,
                                     0, 1, m.config.workers, collate_fn)) for m in members]
    forward = Vectorized(models, randomness)
    # bf16w trains lone runs only; an ensemble of bf16w runs uses autocast, as their evaluation does
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if first.precision != "fp32" else contextlib.nullcontext()

    failed: dict[int, NonFiniteLoss] = {}
    metrics: list[dict] = [{} for _ in members]
    window: list[dict] = [{} for _ in members]
    window_steps, window_started = 0, time.perf_counter()
    step, interrupted, last_saved = start_step, False, None
    last_paths: list = list(latest)
    loop_started = time.perf_counter()

    def checkpoint(at: int) -> None:
        for i, m in enumerate(members):
            if i not in failed:
                last_paths[i] = save_checkpoint(
                    run_dirs[i], at, m.model, optimizers[i], schedulers[i], m.config.to_dict(), m.spec_text,
                    m.spec_hash, metrics=metrics[i], counters=counters[i], baseline=baselines[i],
                    keep=m.config.keep_checkpoints)

    try:
        with StopRequest() as stop:
            for _ in range(start_step, first.steps):
                batches = [next(loader) for loader in loaders]
                if any(b is None or skipped for b, skipped in batches):
                    raise ValueError("an item failed to load: ensemble members need complete batches "
                                     "(train such data with lone runs)")
                batch = {k: torch.stack([b[k] for b, _ in batches]).to(device) for k in batches[0][0]}
                with autocast:
                    loss, terms = forward(batch)
                names = list(terms)
                table = torch.stack([loss.detach().float()] + [terms[k].detach().float() for k in names], dim=1).tolist()
                loss.sum().backward()
                for i, row in enumerate(table):
                    if i in failed:  # stopped: computed along with the others, never updated again
                        optimizers[i].zero_grad(set_to_none=True)
                        continue
                    values = dict(zip(["loss"] + [f"loss/{k}" for k in names], row))
                    bad = [k for k, v in zip(names, row[1:]) if not math.isfinite(v)] or (["loss"] if not math.isfinite(row[0]) else [])
                    if not bad:
                        clip = members[i].config.grad_clip
                        norm = float(torch.nn.utils.clip_grad_norm_(models[i].parameters(), clip if clip > 0 else float("inf")))
                        if math.isfinite(norm):
                            values["grad_norm"] = norm
                            optimizers[i].step()
                        else:
                            bad = ["gradient norm"]
                    optimizers[i].zero_grad(set_to_none=True)
                    if bad:
                        counters[i]["skipped_steps"] += 1
                        if members[i].config.on_nonfinite == "stop":
                            failed[i] = NonFiniteLoss(f"non-finite loss at step {step + 1}: {', '.join(bad)}; "
                                                      "this member stopped, the others went on", step + 1, bad)
                    for k, v in values.items():
                        if math.isfinite(v):
                            window[i][k] = window[i].get(k, 0.0) + v
                for s in schedulers:
                    s.step()
                step += 1
                window_steps += 1
                if on_step is not None:
                    alive = [r[0] for i, r in enumerate(table) if i not in failed and math.isfinite(r[0])]
                    rate = window_steps * first.batch_size * n / max(1e-9, time.perf_counter() - window_started)
                    shown = f"loss {sum(alive) / len(alive):.3f}" if alive else "no member left"
                    on_step(step, f"{shown}  {n} members  {rate:.0f} samples/s")
                if first.log_every and step % first.log_every == 0:
                    elapsed = max(1e-9, time.perf_counter() - window_started)
                    for i, log in enumerate(logs):
                        record = {k: v / window_steps for k, v in window[i].items()}
                        record.update(lr=schedulers[i].get_last_lr()[0], samples_per_s=window_steps * first.batch_size / elapsed,
                                      skipped_files=0, skipped_steps=counters[i]["skipped_steps"])
                        log.write("train", step, record)
                    window, window_steps, window_started = [{} for _ in members], 0, time.perf_counter()
                if first.eval_every and step % first.eval_every == 0 and step < first.steps:
                    for i, log in enumerate(logs):
                        if i not in failed:
                            metrics[i] = run_eval(i)
                            log.write("eval", step, metrics[i])
                if first.checkpoint_every and step % first.checkpoint_every == 0:
                    checkpoint(step)
                    last_saved = step
                if stop.requested:
                    interrupted = True
                    break
            loop_seconds = time.perf_counter() - loop_started
            if not interrupted:
                for i, log in enumerate(logs):
                    if i not in failed:
                        metrics[i] = run_eval(i)
                        log.write("eval", step, metrics[i])
            if last_saved != step:
                checkpoint(step)
    finally:
        for log in logs:
            log.close()

    results: list[RunSummary | NonFiniteLoss] = []
    for i, m in enumerate(members):
        if i in failed:
            results.append(failed[i])
            continue
        summary = RunSummary(
            run_dir=str(run_dirs[i]), steps=step, start_step=start_step, target_steps=m.config.steps,
            wall_time_s=time.perf_counter() - started,
            samples_per_s=(step - start_step) * m.config.batch_size / max(1e-9, loop_seconds),
            baseline=baselines[i], final=metrics[i], skipped_files=0,
            skipped_steps=counters[i]["skipped_steps"], interrupted=interrupted,
            last_checkpoint=str(last_paths[i]) if last_paths[i] else None)
        write_summary(summary, run_dirs[i] / "summary.json")
        write_curves(run_dirs[i] / "metrics.jsonl", run_dirs[i] / "curves.png")
        results.append(summary)
    return results
