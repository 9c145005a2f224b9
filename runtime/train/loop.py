"""The training loop: AdamW + warmup/cosine, clipping, bf16, checkpoints, evaluation, DDP or FSDP.

``train`` takes a contract-following model (see ``avdsl.runtime.contracts``) and two data sets of
per-item dicts (items may be None: an unreadable file, counted as skipped). It is resumable to the
bit: each step's batch is a pure function of (seed, step, rank) (see ``sampling``), and checkpoints
hold the optimizer, scheduler and RNG states, so a resumed run continues exactly as the
uninterrupted run would have.

Weight decay is decided by role: biases and scales (parameters with ndim <= 1), norms, embedding
tables, and the modules a model lists in ``no_weight_decay`` (a compiled model lists its positional
tables, type embeddings, latent/CLS tokens and mask tokens, from its graph) are not decayed, as
decaying them pulls learned positions and tokens towards zero. Every other weight, patch and
tubelet projections included, is decayed.

SIGINT and SIGTERM ask the loop to stop after the current step; it then writes a checkpoint and
returns normally (``summary.interrupted``). A second SIGINT aborts at once without a checkpoint,
since the state could be half updated.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from avdsl.limits import STOP_GRACE_S

from .. import compile_cache, devices, regional
from ..memory import keep_freed_memory
from . import distributed
from .checkpoint import find_latest, list_checkpoints, load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate
from .master import Bf16Copy
from .report import MetricsLog, RunSummary, summary_table, write_curves, write_summary
from .sampling import make_step_loader
from .schedule import make_scheduler


class NonFiniteLoss(RuntimeError):
    """Training stopped because a loss term (or the gradient norm) was NaN or infinite."""

    def __init__(self, message: str, step: int, terms: list[str]):
        super().__init__(message)
        self.step = step
        self.terms = terms


@dataclass
class StepFlags:
    """What each process reports after a step's forward pass; summed over processes, a field is the
    number of processes that reported it (skipped files: how many)."""

    stop: float  # a stop was requested
    skipped_files: float  # unreadable files left out of the batch
    no_batch: float  # no batch at all this step
    nonfinite: float  # a loss term (or, after backward, the gradient norm) is NaN or infinite

    @classmethod
    def summed(cls, local: "StepFlags", info: distributed.DistInfo) -> "StepFlags":
        values = torch.tensor([float(local.stop), float(local.skipped_files), float(local.no_batch), float(local.nonfinite)])
        return cls(*distributed.all_reduce_sum(values, info).tolist())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decayed weights, and undecayed parameters by role (see module doc)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_TYPES) for p in m.parameters()}
    listed = tuple(getattr(model, "no_weight_decay", ()))  # module or parameter names of the model
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        role_exempt = any(name == n or name.startswith(n + ".") for n in listed)
        exempt_here = parameter.ndim <= 1 or id(parameter) in exempt or role_exempt
        (no_decay if exempt_here else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    """"auto" -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (main thread only).

    A step that does not end within ``grace`` seconds of the signal (a data loader blocked on a file
    that never delivers, a hung collective) does not keep the process alive: a watchdog ends it with
    exit code 128 + the signal number, saying so. `acknowledge` (the loop saw the flag) disarms it."""

    def __init__(self, grace: float = STOP_GRACE_S):
        self.requested = False
        self.previous = {}
        self.grace = grace
        self.watchdog: threading.Timer | None = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # a second signal: abort now
        self.requested = True
        self.watchdog = threading.Timer(self.grace, self._give_up, args=(signum,))
        self.watchdog.daemon = True
        self.watchdog.start()

    @staticmethod
    def _give_up(signum: int) -> None:
        sys.stderr.write(f"error: the current step did not finish within the grace period after signal {signum}; "
                         "stopping without a checkpoint (resume starts from the last one)\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def acknowledge(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        self.acknowledge()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False



def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    )


def _check_fresh_run_dir(run_dir: Path) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's."""
    existing = list_checkpoints(run_dir)
    if existing:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints (newest {existing[-1].name}); "
            "pass resume to continue that run, or choose another run directory."
        )


def train(
    model: torch.nn.Module,
    train_set,
    val_set,
    config: TrainConfig,
    spec_text: str,
    spec_hash: str,
    console: Console | None = None,
    collate_fn: Callable | None = None,
    on_step: Callable[[int, str], None] | None = None,
) -> RunSummary:
    """Train ``model`` for ``config.steps`` optimizer steps and return the run's summary.

    ``collate_fn`` turns a list of present items into a batch (default: torch's default_collate);
    items that are None are dropped before it and counted as skipped files. When run inside a
    process group (see ``distributed``) each process trains on its shard and only rank 0 writes.
    Raises NonFiniteLoss (with on_nonfinite="stop"), CheckpointMismatch (resuming another spec),
    CheckpointWriteError (disk full) and FileExistsError (fresh run in a used run directory).
    ``on_step(step, info)``, when given, replaces the progress bar and the closing summary table
    (a caller showing several runs in one view, such as a sweep).
    """
    started = time.perf_counter()
    info = distributed.current()
    main = info.is_main
    console = (console or Console()) if main else None
    run_dir = Path(config.run_dir)
    device = resolve_device(config.device, info)

    seed_everything(config.seed)
    keep_freed_memory()  # the step's activations reuse freed memory instead of fresh zeroed pages (memory.py)
    model.to(device)
    model.train()
    runner = distributed.wrap(model, config.strategy, info, device)  # before the optimizer: fsdp shards
    sharded = distributed.is_sharded(model)
    evaluates = main or sharded  # a sharded model's forward needs every process
    # fused: one pass over each parameter instead of a dozen (on a CPU several times faster); the
    # sharded DTensor parameters of fsdp take the default implementation
    fused = not sharded and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, fused=fused)
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)

    start_step, counters, baseline, rng = 0, {"skipped_files": 0, "skipped_steps": 0}, {}, None
    latest = find_latest(run_dir) if config.resume else None
    if latest is not None:
        loaded = load_checkpoint(latest, model, optimizer, scheduler, spec_hash=spec_hash)
        start_step, baseline, rng = loaded.step, dict(loaded.baseline), loaded.rng
        for group in optimizer.param_groups:  # the stored groups carry the saving run's choice
            group["fused"] = fused
        counters.update({k: int(v) for k, v in loaded.counters.items()})
        if main:
            console.print(f"resuming from {latest} (step {start_step})")
    else:
        _check_fresh_run_dir(run_dir)  # on every rank, so that all of them stop together
        if main:
            if config.resume:
                console.print(f"no checkpoint in {run_dir}; starting from step 0")
            run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)

    def run_eval() -> dict:
        return evaluate(model, val_set, config.eval_batches, config.batch_size, collate_fn, config.precision)

    if not baseline and evaluates:
        baseline = run_eval()
    distributed.barrier(info)
    if rng is not None:
        restore_rng_state(rng)

    # bf16w: forward and backward on a bf16 copy; `model` keeps the fp32 master weights (master.py)
    half = Bf16Copy(model) if config.precision == "bf16w" else None
    if half is not None:
        if info.distributed:
            raise ValueError("precision bf16w trains in one process; use bf16 (autocast) with --nproc")
        runner = half
    cache_key = None
    if config.compile:
        # a rebuild of an unchanged spec loads what an earlier run compiled instead of compiling again
        cache_key = compile_cache.CacheKey(spec_hash, config.precision, config.batch_size, "train")
        compile_cache.load(cache_key)
        compiled = half.module if half is not None else model
        if not regional.compile_layers(compiled):  # each distinct encoder layer compiled once, reused
            if half is not None:
                half.module = torch.compile(half.module)
            else:
                runner = torch.compile(runner)  # a model without encoder layers: the whole of it

    log = MetricsLog(run_dir, start_step, resumed=latest is not None, enabled=main)
    if main and latest is None:
        log.write("eval", 0, baseline)
    autocast = devices.autocast(device, "fp32" if half is not None else config.precision)
    global_batch = config.batch_size * info.world_size
    loader = make_step_loader(
        train_set, config.batch_size, config.seed, start_step, config.steps,
        info.rank, info.world_size, config.workers, collate_fn,
    )

    def checkpoint(at_step: int, metrics: dict | None = None) -> Path | None:
        path = None
        # a sharded parameter (FSDP's DTensor) is checked in this process's shard
        broken = [name for name, p in model.named_parameters()
                  if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
        if broken:  # never let NaN weights replace the last good checkpoint
            good = find_latest(run_dir) if main else None
            raise NonFiniteLoss(
                f"after step {at_step} the parameters are not finite ({', '.join(broken[:3])}"
                f"{', ...' if len(broken) > 3 else ''}); no checkpoint was written, "
                + (f"the last good checkpoint is {good}." if good else "and none was written before."),
                step=at_step, terms=broken[:3])
        if main or sharded:  # a sharded model: every process writes its own shards
            path = save_checkpoint(
                run_dir, at_step, model, optimizer, scheduler, config.to_dict(), spec_text,
                spec_hash, metrics=metrics, counters=counters, baseline=baseline,
                keep=config.keep_checkpoints,
            )
        distributed.barrier(info)
        return path

    step, interrupted, last_saved, last_path, metrics = start_step, False, None, latest, {}
    window_sums: dict[str, float] = {}
    window_steps, window_started = 0, time.perf_counter()
    loop_started = time.perf_counter()
    progress = _progress(console) if main and on_step is None else None
    task = progress.add_task("train", total=config.steps, completed=start_step, info="") if progress else None
    try:
        with StopRequest() as stop, (progress or contextlib.nullcontext()):
            for batch, skipped in loader:
                values, bad = {}, []
                if batch is not None:
                    batch = devices.to_device(batch, device)
                    with autocast:
                        result = runner(**batch)
                    names = list(result["losses"])
                    stacked = torch.stack(
                        [result["loss"].detach().float()] + [result["losses"][n].detach().float() for n in names]
                    ).tolist()
                    values = dict(zip(["loss"] + [f"loss/{n}" for n in names], stacked))
                    bad = [n for n, v in zip(names, stacked[1:]) if not math.isfinite(v)]
                    if not bad and not math.isfinite(stacked[0]):
                        bad = ["loss"]
                flags = StepFlags.summed(StepFlags(stop.requested, skipped, batch is None, bool(bad)), info)
                counters["skipped_files"] += int(flags.skipped_files)
                if not flags.no_batch and not flags.nonfinite:
                    runner_loss = result["loss"]
                    runner_loss.backward()
                    if half is not None:
                        half.gradients_to_masters()
                    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
                    grad_norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                    if not math.isfinite(grad_norm):
                        bad = ["gradient norm"]
                        flags.nonfinite = 1.0
                    else:
                        values["grad_norm"] = grad_norm
                        optimizer.step()
                        if half is not None:
                            half.masters_to_copy()
                if half is None:  # bf16w: gradients_to_masters overwrites the masters' gradients next step
                    optimizer.zero_grad(set_to_none=True)
                if flags.no_batch or flags.nonfinite:
                    if flags.nonfinite and config.on_nonfinite == "stop":
                        where = ", ".join(repr(t) for t in bad) if bad else "a term on another process"
                        good = find_latest(run_dir) if main else None
                        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
                        raise NonFiniteLoss(
                            f"non-finite loss at step {step + 1}: {where} "
                            f"({', '.join(f'{k}={v}' for k, v in values.items()) or 'no values'}); "
                            f"stopped without saving this state, {kept}. Lower lr, set grad_clip, "
                            "or use on_nonfinite='skip'.",
                            step=step + 1,
                            terms=bad,
                        )
                    counters["skipped_steps"] += 1
                    if main and flags.nonfinite:
                        console.print(f"[yellow]step {step + 1}: non-finite {', '.join(bad) or 'loss'}; update skipped")
                scheduler.step()
                step += 1
                if cache_key is not None and main:
                    compile_cache.save(cache_key)  # after the first compiled step: everything is compiled
                    cache_key = None

                for name, value in values.items():
                    if math.isfinite(value):
                        window_sums[name] = window_sums.get(name, 0.0) + value
                window_steps += 1
                if main:
                    shown = " ".join(f"{k.removeprefix('loss/')} {v:.3f}" for k, v in values.items() if k.startswith("loss/"))
                    rate = window_steps * global_batch / max(1e-9, time.perf_counter() - window_started)
                    if progress is not None:
                        progress.update(task, completed=step, info=f"{shown}  {rate:.0f} samples/s")
                    else:
                        on_step(step, f"{shown}  {rate:.0f} samples/s")
                if config.log_every and step % config.log_every == 0:
                    elapsed = max(1e-9, time.perf_counter() - window_started)
                    record = {k: v / window_steps for k, v in window_sums.items()}
                    record.update(lr=scheduler.get_last_lr()[0], samples_per_s=window_steps * global_batch / elapsed,
                                  skipped_files=counters["skipped_files"], skipped_steps=counters["skipped_steps"])
                    log.write("train", step, record)
                    window_sums, window_steps, window_started = {}, 0, time.perf_counter()
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    if evaluates:
                        metrics = run_eval()
                        log.write("eval", step, metrics)
                    distributed.barrier(info)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    last_path, last_saved = checkpoint(step, metrics), step
                if flags.stop:
                    stop.acknowledge()
                    interrupted = True
                    break
            loop_seconds = time.perf_counter() - loop_started
            if not interrupted and evaluates:
                metrics = run_eval()
                log.write("eval", step, metrics)
            distributed.barrier(info)
            if last_saved != step:
                last_path = checkpoint(step, metrics)
    finally:
        log.close()
        del loader

    summary = RunSummary(
        run_dir=str(run_dir),
        steps=step,
        start_step=start_step,
        target_steps=config.steps,
        wall_time_s=time.perf_counter() - started,
        samples_per_s=(step - start_step) * global_batch / max(1e-9, loop_seconds),
        baseline=baseline,
        final=metrics,
        skipped_files=counters["skipped_files"],
        skipped_steps=counters["skipped_steps"],
        interrupted=interrupted,
        last_checkpoint=str(last_path) if last_path else None,
    )
    if main:
        write_summary(summary, run_dir / "summary.json")
        write_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        if on_step is None:
            console.print(summary_table(summary))
        if interrupted:
            console.print(f"[yellow]interrupted at step {step}; resume with the same run directory")
    return summary
