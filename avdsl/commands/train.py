"""`avdsl train`, `avdsl eval`, `avdsl export`: train a spec on data, evaluate and export checkpoints.

Data is the embedded synthetic audio-visual set by default (rendered at the sizes the spec declares,
nothing to download) or a manifest of real media files (`--data clips/manifest.jsonl`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .. import limits
from ..api import analyse_doc
from ..diagnostics import Loc, SpecError
from ..loader import load_file, load_text, read_text
from .common import EXIT_BAD_SPEC, EXIT_FINDINGS, SPEC_HELP, CommandError, Precision, complete_spec, err, out

class Strategy(str, Enum):
    """How several processes hold the model (`--strategy`)."""

    ddp = "ddp"
    fsdp = "fsdp"


TRAIN_DEFAULTS = {"train_size": 2048, "val_size": 256}


class ExportFormat(str, Enum):
    torch_export = "torch-export"
    onnx = "onnx"
    safetensors = "safetensors"


def _datasets(model, data: str, train_size: int, val_size: int, seed: int, materialize: bool):
    """(train set, validation set) for a model's declared inputs."""
    from ..runtime.data import MediaDataset, SyntheticAV
    from ..runtime.data.loader import Materialized

    if data == "synthetic":
        train_set = SyntheticAV(model.inputs, train_size, seed=seed, split="train") if train_size else None
        val_set = SyntheticAV(model.inputs, val_size, seed=seed, split="val")
        if materialize and (train_size + val_size) * _clip_bytes(model.inputs) > limits.MATERIALIZE_BYTES:
            materialize = False  # too many clips to hold in memory: render each when it is read
        if materialize:
            with Progress(TextColumn("rendering synthetic clips"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeRemainingColumn(), console=err, transient=True) as bar:
                task = bar.add_task("render", total=train_size + val_size)
                train_set = Materialized(train_set, lambda i, n: bar.update(task, completed=i))
                val_set = Materialized(val_set, lambda i, n: bar.update(task, completed=train_size + i))
        return train_set, val_set
    from ..runtime.data.media import ManifestError

    path = Path(data)
    if not path.is_file():
        raise SpecError(Loc(data), f"--data: no manifest file '{data}'",
                        "pass `synthetic` (the default) or a .csv/.jsonl manifest of media files")
    try:
        return (MediaDataset(path, model.inputs, split="train", train=True) if train_size else None,
                MediaDataset(path, model.inputs, split="val", train=False))
    except ManifestError as e:
        raise SpecError(Loc(data, max(e.line, 1)), f"--data: {e}",
                        "one JSON object (or CSV row) per clip with `path`, `label`, `caption`, `split` (train/val)") from None


def _clip_bytes(inputs) -> int:
    """Bytes one rendered clip takes in memory (float32 / int64 tensors of every input)."""
    total = 0
    for spec in inputs:
        total += 8 * math.prod(d for d in spec.shape if isinstance(d, int))
    return total


def _config(spec_train: dict, options: dict):
    from ..runtime.train import TrainConfig

    merged = {**{k: v for k, v in spec_train.items() if k not in TRAIN_DEFAULTS}, **{k: v for k, v in options.items() if v is not None}}
    try:
        return TrainConfig.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise CommandError(f"invalid training setting: {e}", "see `avdsl train --help`") from None


def _default_run_dir(name: str, resume: bool) -> str:
    base = Path("runs")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "model"
    if resume:
        previous = sorted(base.glob(f"{safe}-*"))
        if previous:
            return str(previous[-1])
        raise CommandError(f"--resume: no earlier run of '{name}' under runs/", "pass --run-dir DIR of the run to continue")
    return str(base / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}")


def _train_process(spec: str, overrides: list, options: dict, data: str, sizes: dict, log_to_stderr: bool = False,
                   init: str | None = None) -> dict:
    """Build and train in this process (called directly, or once per rank by `--nproc`); ``init``: the
    checkpoint folder whose weights the model starts from."""
    import torch

    from ..compiler import compile_graph, device_memory
    from ..passes.memory import check_fits
    from ..runtime.train import CheckpointMismatch, load_checkpoint, setup_distributed, train

    info = setup_distributed()
    analysis = analyse_doc(load_file(spec, overrides))
    torch.manual_seed(options.get("seed") or 0)
    config = _config(analysis.spec.train, options)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device.replace("auto", "cpu")
    check_fits(analysis.graph, analysis.cost, config.batch_size, True, device_memory(device), f"device {device}")
    model = compile_graph(analysis.graph)
    if init is not None:
        try:
            load_checkpoint(init, model)  # the weights only: names and shapes must match, the spec may differ
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"--init: {e}") from None
    train_set, val_set = _datasets(model, data, sizes["train_size"], sizes["val_size"], config.seed,
                                   materialize=data == "synthetic" and config.workers == 0)
    summary = train(model, train_set, val_set, config, model.spec_text, model.spec_hash,
                    console=(err if log_to_stderr else out) if info.is_main else None)
    return summary.to_dict()


def _fits(analysis, batch: int) -> None:
    """Refuse a batch whose inputs and activations cannot fit, before they are allocated."""
    from ..compiler import device_memory
    from ..passes.memory import check_fits

    check_fits(analysis.graph, analysis.cost, batch, False, device_memory("cpu"))


def _learning_rate(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value <= limits.MAX_LR):
        raise typer.BadParameter(f"{value} is not a learning rate: it must be a number above 0 and at most {limits.MAX_LR:g}")
    return value


def _check_device(name: str | None) -> None:
    """``--device`` must name a device this machine has (checked before any work starts)."""
    import torch

    if name in (None, "auto"):
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {name!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise CommandError(f"--device {name!r}: only cpu and cuda devices are supported", "use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        raise CommandError(f"--device {name!r}: this machine has {count} CUDA device{'s' if count != 1 else ''}",
                        "use --device auto or cpu" + (f", or cuda:0 .. cuda:{count - 1}" if count else ""))


_VIRTUAL_FILESYSTEMS = ("/proc", "/sys", "/dev")


def _check_run_dir(run_dir: str) -> None:
    """The run directory must be a directory this process can create and write files in."""
    path = Path(run_dir)
    hint = "pass --run-dir pointing at a writable folder (it is created if missing)"
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError):
        raise CommandError(f"--run-dir {run_dir!r} is not a usable path", hint) from None
    if any(real == Path(v) or real.is_relative_to(v) for v in _VIRTUAL_FILESYSTEMS):
        raise CommandError(f"--run-dir {run_dir!r} lies in {real.parts[1] and '/' + real.parts[1]}, not on a disk", hint)
    if path.exists() and not path.is_dir():
        raise CommandError(f"--run-dir {run_dir!r} exists and is not a directory", hint)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CommandError(f"--run-dir {run_dir!r} cannot be written: {e.strerror or e}", hint) from None


class _Terminated(Exception):
    """SIGTERM arrived before the training loop took over the signal."""


def _terminate_early(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_before_training():
    """Until the training loop installs its own handler, SIGTERM ends the command with a message (143)."""
    previous = signal.signal(signal.SIGTERM, _terminate_early)
    try:
        yield
    except _Terminated:
        raise CommandError("terminated (SIGTERM) before training started; no checkpoint was written",
                           "nothing to resume: start the run again", 143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_command(
    spec: str = typer.Argument(..., help=SPEC_HELP, autocompletion=complete_spec),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec value (repeatable)."),
    data: str = typer.Option("synthetic", "--data", help="`synthetic` (embedded, generated) or a .csv/.jsonl manifest of media files."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=limits.MAX_STEPS, help="Optimizer steps (default: the spec's `train.steps`)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, max=limits.MAX_BATCH, help="Per-process batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=_learning_rate, help="Peak learning rate (AdamW, warmup + cosine)."),
    precision: Optional[Precision] = typer.Option(None, "--precision", help="Training precision (bf16: autocast; default: the spec's `train.precision`)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where checkpoints, metrics.jsonl, curves.png and summary.json go."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint of --run-dir (or of the newest run of this spec)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from the weights of this checkpoint (a run directory or a step-* folder, e.g. written by `avdsl import`); optimizer and step start afresh. A checkpoint found by --resume wins."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=limits.MAX_SEED),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=0, max=limits.MAX_STEPS, help="Evaluate on the held-out split every N steps (0: only at the end)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=0, max=limits.MAX_STEPS, help="Write a checkpoint every N steps (0: only at the end)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, max=limits.MAX_WORKERS, help="DataLoader worker processes."),
    skip_nonfinite: bool = typer.Option(False, "--skip-nonfinite", help="Skip steps with a non-finite loss instead of stopping."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=limits.MAX_NPROC, help="Processes on this machine (gloo on CPU, nccl on GPU), started by torch's launcher."),
    strategy: Optional[Strategy] = typer.Option(None, "--strategy", help="With several processes: ddp (each holds the model) or fsdp (parameters, gradients and optimizer state sharded)."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, max=limits.MAX_SYNTHETIC_CLIPS, help="Synthetic clips in the training split."),
    val_size: Optional[int] = typer.Option(None, "--val-size", min=1, max=limits.MAX_SYNTHETIC_CLIPS, help="Synthetic clips in the held-out split."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON on stdout (progress goes to stderr)."),
) -> None:
    """Train SPEC and print live progress, held-out metrics before and after, and a summary.

    The run directory gets checkpoints (safetensors weights, optimizer/scheduler/RNG state, the
    resolved spec and its hash; written atomically), metrics.jsonl, curves.png and summary.json.

    Examples:

      avdsl train tiny/zorro

      avdsl train tiny/cav-mae --steps 200 --precision bf16

      avdsl train tiny/zorro --run-dir runs/a --resume

      avdsl train cav-mae --init runs/cav-mae-from-cav-mae

      avdsl train tiny/mbt --nproc 2 --strategy fsdp

    Several machines: `torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT
    -m avdsl train SPEC ...` on each (each process trains its shard of every batch).
    """
    with _sigterm_before_training():
        summary = _train(spec, set_ or [], data, nproc, as_json, {
            "steps": steps, "batch_size": batch_size, "lr": lr, "precision": precision.value if precision else None,
            "compile": compile_, "seed": seed, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
            "workers": workers, "device": device, "strategy": strategy.value if strategy else None,
            "resume": resume or None, "on_nonfinite": "skip" if skip_nonfinite else None, "run_dir": run_dir},
            {"train_size": train_size, "val_size": val_size}, init)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    if summary.get("interrupted"):
        raise typer.Exit(130)


def _train(spec: str, overrides: list, data: str, nproc: int, as_json: bool, options: dict, sizes: dict,
           init: str | None = None) -> dict:
    """Check everything that can be checked before work starts, then train (in ``nproc`` processes);
    return rank 0's summary. ``options`` are the command-line settings (None: the spec's or the default)."""
    doc = load_file(spec, overrides)
    analysis = analyse_doc(doc)  # a bad spec fails here, before any process starts (and before torch loads)
    _check_device(options["device"])
    init = str(_checkpoint_folder(init)) if init is not None else None
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ..runtime.train import CheckpointCorrupt, CheckpointMismatch, CheckpointWriteError, NonFiniteLoss, launch

    spec_train = analysis.spec.train
    sizes = {k: sizes[k] or spec_train.get(k, v) for k, v in TRAIN_DEFAULTS.items()}
    options = {**options, "run_dir": options["run_dir"] or _default_run_dir(analysis.spec.name, bool(options["resume"]))}
    _config(spec_train, options)  # a bad setting fails here, before any process starts
    _check_run_dir(options["run_dir"])
    (err if as_json else out).print(f"training [bold]{escape(analysis.spec.name)}[/] ({escape(doc.file)}) -> {escape(options['run_dir'])}")
    try:
        # with --nproc N, torch's launcher runs _train_process once per process; rank 0's summary returns
        summary = launch(nproc, _train_process, spec, overrides, options, data, sizes, as_json, init) or {}
    except NonFiniteLoss as e:
        raise CommandError(str(e), "lower --lr, try --precision fp32, or pass --skip-nonfinite to skip such steps; "
                           "the last good checkpoint is kept (resume with --resume)", EXIT_FINDINGS) from None
    except CheckpointMismatch as e:
        hint = ("--init needs a checkpoint whose tensors have the names and shapes of this spec's model"
                if str(e).startswith("--init") else "train it from scratch with another --run-dir")
        raise CommandError(str(e), hint, EXIT_BAD_SPEC) from None
    except CheckpointCorrupt as e:
        raise CommandError(f"the checkpoint cannot be read: {e}", "it is damaged or incomplete: move it away, or pass "
                           "another --run-dir", EXIT_BAD_SPEC) from None
    except CheckpointWriteError as e:
        raise CommandError(str(e), "free disk space or pass another --run-dir; earlier checkpoints are intact",
                           EXIT_FINDINGS) from None
    except FileExistsError as e:
        raise CommandError(str(e), "pass --resume to continue that run, or another --run-dir") from None
    except ChildFailedError as e:  # --nproc: a process failed; the launcher names the rank and its error
        raise CommandError(str(e), "the failing rank's error is shown above", EXIT_FINDINGS) from None
    return summary


def _checkpoint_folder(checkpoint: str) -> Path:
    """The checkpoint folder a run directory (its newest checkpoint) or a step-* folder names."""
    from ..runtime.train import find_latest

    path = Path(checkpoint)
    if path.is_dir() and not (path / "meta.json").is_file():  # not a checkpoint folder (of either form)
        latest = find_latest(path)
        if latest is None:
            raise SpecError(Loc(checkpoint), "no complete checkpoint here", "pass a run directory or one of its step-* folders")
        path = latest
    if not (path / "spec.yaml").is_file():
        raise SpecError(Loc(checkpoint), "this is not a checkpoint (no spec.yaml)", "pass a run directory or one of its step-* folders")
    return path


def _load_run(checkpoint: str, set_: list):
    """The spec stored with a checkpoint, its model with the checkpoint's weights, and the checkpoint."""
    from ..compiler import compile_graph
    from ..runtime.train import CheckpointCorrupt, CheckpointMismatch, load_checkpoint

    path = _checkpoint_folder(checkpoint)
    spec_file = path / "spec.yaml"
    analysis = analyse_doc(load_text(read_text(spec_file, str(spec_file)), str(spec_file), set_))
    model = compile_graph(analysis.graph)
    try:
        load_checkpoint(path, model, spec_hash=None if set_ else model.spec_hash)
    except CheckpointMismatch as e:
        raise SpecError(Loc(str(path)), str(e), "evaluate a checkpoint with the spec it was written with") from None
    except (CheckpointCorrupt, FileNotFoundError) as e:
        raise SpecError(Loc(str(path)), f"the checkpoint cannot be read: {e}",
                        "it is damaged or incomplete; use another step-* folder of the run") from None
    return analysis, model, path


def eval_command(
    checkpoint: str = typer.Argument(..., help="A run directory (its newest checkpoint) or a step-* checkpoint folder."),
    data: str = typer.Option("synthetic", "--data", help="`synthetic` or a manifest; the held-out (val) split is used."),
    batches: int = typer.Option(8, "--batches", min=1, max=limits.MAX_EVAL_BATCHES, help="Evaluation batches."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=limits.MAX_BATCH),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Evaluate a checkpoint on held-out data: retrieval R@1/5/10 and median rank for contrastive
    pairs, accuracy/mAP for classifiers, reconstruction error, caption loss, every loss term."""
    from rich.table import Table

    from ..runtime.train import evaluate

    analysis, model, path = _load_run(checkpoint, [])
    _fits(analysis, batch_size)
    stored = analysis.spec.train
    val_size = min(max(batches * batch_size, stored.get("val_size", 0)), limits.MAX_SYNTHETIC_CLIPS)
    _, val_set = _datasets(model, data, 0, val_size, stored.get("seed", 0), False)
    metrics = evaluate(model, val_set, batches, batch_size)
    if as_json:
        print(json.dumps({"checkpoint": str(path), **metrics}, indent=2))
        return
    table = Table(title=escape(f"{analysis.spec.name} @ {path}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    out.print(table)


def export_command(
    checkpoint: str = typer.Argument(..., help="A run directory or a step-* checkpoint folder."),
    format: ExportFormat = typer.Option(ExportFormat.torch_export, "--format", help="torch-export (.pt2), onnx (needs `pip install avdsl[onnx]`), or safetensors (the weights alone in one file, also from a sharded fsdp checkpoint)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output file (default: model.pt2 / model.onnx / model.safetensors in the checkpoint folder)."),
    batch: int = typer.Option(2, "--batch", min=1, max=limits.MAX_BATCH, help="Example batch size used for tracing."),
) -> None:
    """Write a deployable model from a checkpoint and check it against eager outputs, or (safetensors)
    its weights in one file."""
    import torch

    from ..runtime.train import ExportError, export
    from ..runtime.trial import random_batch

    analysis, model, path = _load_run(checkpoint, [])
    _fits(analysis, batch)
    model.eval()
    example = random_batch(model.inputs, batch)
    names = {ExportFormat.torch_export: "model.pt2", ExportFormat.onnx: "model.onnx", ExportFormat.safetensors: "model.safetensors"}
    target = Path(output) if output else path / names[format]
    try:
        written = export(model, example, target, format.value)
    except ExportError as e:
        raise CommandError(str(e), "see `avdsl export --help`", EXIT_FINDINGS) from None
    with torch.no_grad():
        _ = model(**example)
    out.print(f"wrote {escape(str(written))}")
