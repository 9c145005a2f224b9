"""Atomic, self-describing training checkpoints.

A checkpoint is a directory ``run_dir/step-000123/`` holding

* ``model.safetensors`` - the model weights (tensors shared between parameters are stored once),
* ``state.pt``          - optimizer, scheduler and RNG states, step, config and counters, saved with
                          ``torch.save`` and read with ``torch.load(weights_only=True)``, so it holds
                          only plain containers, numbers, strings and tensors,
* ``spec.yaml``         - the resolved spec text the model was built from,
* ``meta.json``         - spec hash, step, wall-clock time, the latest metrics and the form.

A run of several processes with ``fsdp`` writes the *sharded* form instead (``"form": "sharded"`` in
meta.json): ``sharded/`` in place of ``model.safetensors``, holding each process's shards of the
weights and of the optimizer's tensors, written by all processes at once with
``torch.distributed.checkpoint`` (see ``sharded``); ``state.pt`` keeps everything else (the optimizer's
``param_groups`` keyed by parameter name) and meta.json lists the shard files. Nothing is gathered
into one process. :func:`load_checkpoint` reads either form into a model sharded over any number of
processes or into a plain one (``avdsl eval``, ``export``, ``train --init``); ``avdsl export --format
safetensors`` turns a sharded checkpoint into one ``model.safetensors``.

Writing is atomic: everything goes into a temporary directory inside ``run_dir``, each file is
fsynced, and the directory is renamed to its final name with ``os.replace``; only then is the
``latest`` pointer file rewritten (again via a temporary file and ``os.replace``). A crash at any
moment therefore leaves either the old set of checkpoints or the old set plus one complete new one,
never a half-written ``step-*`` directory. A single process (rank 0) creates, renames and prunes; in
the sharded form every process writes its shards into rank 0's temporary directory first.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_model

from . import distributed, sharded

CHECKPOINT_FILES = ("model.safetensors", "state.pt", "spec.yaml", "meta.json")
FORMS = ("safetensors", "sharded")  # what holds the weights: model.safetensors, or the folder sharded/
SHARDED_DIR = "sharded"  # the sharded form's folder, in place of model.safetensors
SHARDED_FILES = ("state.pt", "spec.yaml", "meta.json")  # the sharded form's files besides it
LATEST_POINTER = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"


class CheckpointMismatch(RuntimeError):
    """The checkpoint does not fit the model (other spec, other parameter names or shapes)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


class CheckpointCorrupt(RuntimeError):
    """A checkpoint's files cannot be read back (truncated, tampered with, not what they claim)."""


# what writing a checkpoint raises on a full or failing disk: OSError from Python's own writes,
# RuntimeError from torch.save ("PytorchStreamWriter failed writing file") and from the shards
# (sharded.ShardError), SafetensorError from save_model
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the weights and optimizer/scheduler states."""

    path: Path
    step: int
    config: dict
    rng: dict
    counters: dict = field(default_factory=dict)  # e.g. skipped_files, skipped_steps
    baseline: dict = field(default_factory=dict)  # metrics measured before training
    meta: dict = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    """``step-000123`` for step 123 (zero padded so that names sort by step)."""
    return f"step-{step:06d}"


# ---------------------------------------------------------------- RNG state as plain containers


def capture_rng_state() -> dict:
    """The RNG states of torch (CPU and every CUDA device), numpy and python, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the RNG states returned by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    """Flush a written file's contents to stable storage."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _write_files(folder: Path, model: torch.nn.Module | None, state: dict, spec_text: str, meta: dict) -> None:
    """Write the checkpoint files into ``folder`` and fsync each of them (the weights file only with
    ``model``: the sharded form's weights are already in ``folder/sharded``)."""
    if model is not None:
        save_model(model, str(folder / "model.safetensors"))
    torch.save(state, folder / "state.pt")
    _write_text(folder / "spec.yaml", spec_text)
    _write_text(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for name in CHECKPOINT_FILES if model is not None else SHARDED_FILES:
        _fsync_file(folder / name)


def _update_latest_pointer(run_dir: Path, name: str) -> None:
    """Atomically point ``run_dir/latest`` at checkpoint directory ``name``."""
    temp = run_dir / f"{_TEMP_PREFIX}{LATEST_POINTER}-{os.getpid()}"
    _write_text(temp, name + "\n")
    _fsync_file(temp)
    os.replace(temp, run_dir / LATEST_POINTER)
    _fsync_dir(run_dir)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    config: dict,
    spec_text: str,
    spec_hash: str,
    metrics: dict | None = None,
    counters: dict | None = None,
    baseline: dict | None = None,
    keep: int | None = None,
    form: str | None = None,
) -> Path:
    """Write checkpoint ``run_dir/step-{step:06d}`` atomically and return its path.

    ``model`` must be the plain module (not a DDP or torch.compile wrapper). The RNG states are
    captured here. ``keep`` (if given) prunes all but the newest ``keep`` complete checkpoints.
    Raises :class:`CheckpointWriteError` when the disk is full (or any OS error hits the write); the
    partial temporary directory is removed and earlier checkpoints stay as they were.
    ``form`` (one of FORMS) is by default "sharded" for a model sharded over several processes
    (``fsdp``) and "safetensors" otherwise. The sharded form is written by every process (a
    collective: all get the path, or the error); the other by rank 0 alone.
    """
    run_dir = Path(run_dir)
    name = step_dir_name(step)
    if form is None:
        form = "sharded" if distributed.is_sharded(model) and distributed.current().distributed else "safetensors"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    in_shards = form == "sharded"
    state = {
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None and not in_shards else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "config": dict(config),
        "counters": dict(counters or {}),
        "baseline": dict(baseline or {}),
    }
    meta = {
        "spec_hash": spec_hash,
        "step": int(step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unix_time": time.time(),
        "metrics": dict(metrics or {}),
        "form": "safetensors",
    }
    if in_shards:
        return _save_sharded(run_dir, name, model, optimizer, state, spec_text, meta, keep)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = find_latest(run_dir)
    temp = run_dir / f"{_TEMP_PREFIX}{name}-{os.getpid()}"
    try:
        _fresh_dir(temp)
        _write_files(temp, model, state, spec_text, meta)
        _publish(temp, run_dir, name)
    except _WRITE_ERRORS as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise _write_error(error, run_dir, name, previous) from error
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return run_dir / name


def _save_sharded(run_dir: Path, name: str, model, optimizer, state: dict, spec_text: str, meta: dict,
                  keep: int | None) -> Path:
    """The sharded form (see the module doc), written by every process: rank 0 makes the temporary
    directory, every process writes its shards into it, rank 0 adds the other files and renames it.
    Each step's outcome is shared, so that all processes return the path or all raise."""
    info = distributed.current()
    temp = run_dir / f"{_TEMP_PREFIX}{name}-{os.getpid()}"  # rank 0's process id names it
    previous, failure = None, None
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            previous = find_latest(run_dir)
            _fresh_dir(temp)
        except _WRITE_ERRORS as error:
            failure = _write_error(error, run_dir, name, previous)
    temp, message = distributed.broadcast_object((str(temp), failure and str(failure)), info)
    temp = Path(temp)
    if message is None:
        try:  # a collective: a failure on any process raises on every process
            groups = sharded.save(temp / SHARDED_DIR, model, optimizer)
        except _WRITE_ERRORS as error:
            failure = _write_error(error, run_dir, name, previous) if info.is_main else None
            message = str(error)
    if message is None and info.is_main:
        state["optimizer"] = None if groups is None else {"param_groups": groups}
        meta.update(form="sharded", shards=sharded.files(temp / SHARDED_DIR), processes=info.world_size)
        try:
            _write_files(temp, None, state, spec_text, meta)
            _publish(temp, run_dir, name)
        except _WRITE_ERRORS as error:
            failure = _write_error(error, run_dir, name, previous)
    if info.is_main and failure is not None:
        shutil.rmtree(temp, ignore_errors=True)
    message = distributed.broadcast_object(failure and str(failure), info)  # rank 0's outcome
    if message is not None:
        if failure is not None:
            raise failure from failure.__cause__
        raise CheckpointWriteError(message)
    if info.is_main and keep is not None:
        prune_checkpoints(run_dir, keep)
    return run_dir / name


def _fresh_dir(path: Path) -> None:
    """An empty directory at ``path`` (a leftover of an earlier attempt is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()


def _publish(temp: Path, run_dir: Path, name: str) -> None:
    """Rename the written directory ``temp`` to ``run_dir/name`` and point ``latest`` at it."""
    _fsync_dir(temp)
    final = run_dir / name
    if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out first
        stale = run_dir / f"{_TEMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(temp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temp, final)
    _fsync_dir(run_dir)
    _update_latest_pointer(run_dir, name)


def _write_error(error: BaseException, run_dir: Path, name: str, previous: Path | None) -> CheckpointWriteError:
    """The error to raise for a failed write of checkpoint ``name`` (out of disk space or another)."""
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or _disk_full(run_dir):
        failure = CheckpointWriteError(
            f"out of disk space while writing checkpoint {name} in {run_dir}; {kept}. "
            "Free some space (or lower keep_checkpoints) and resume."
        )
    else:
        failure = CheckpointWriteError(f"could not write checkpoint {name} in {run_dir} ({error}); {kept}.")
    failure.__cause__ = error
    return failure


def _disk_full(folder: Path) -> bool:
    """True when the file system holding ``folder`` has (almost) no space left."""
    try:
        return shutil.disk_usage(folder).free < 1024 * 1024
    except OSError:
        return False


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints, and leftover temporary entries.

    Leftover temporary entries come from a writer that died mid-write; since only one process
    writes to a run directory and this runs after that process finished its own write, any that
    remain are stale. Returns the removed checkpoint directories.
    """
    run_dir = Path(run_dir)
    complete = list_checkpoints(run_dir)
    removed = complete[: max(0, len(complete) - keep)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    for entry in run_dir.glob(f"{_TEMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------- finding


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a readable meta.json and all files of its form (the sharded form:
    every shard file meta.json lists)."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return False
    names = CHECKPOINT_FILES
    if is_sharded_form(meta):
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards or not all(sharded.valid_file_name(n) for n in shards):
            return False
        names = SHARDED_FILES + tuple(f"{SHARDED_DIR}/{n}" for n in shards)
    return all((path / name).is_file() for name in names)


def is_sharded_form(meta: dict) -> bool:
    """True for the meta.json of a checkpoint in the sharded form (older ones have no "form")."""
    return meta.get("form") == "sharded"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of ``run_dir``, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (highest step), or None.

    Temporary and partial directories are ignored. The directory scan decides rather than the
    ``latest`` pointer, so a crash between the rename and the pointer update still finds the newest.
    """
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


# ---------------------------------------------------------------- loading


def read_meta(path: str | os.PathLike) -> dict:
    """The meta.json of checkpoint ``path`` (a JSON object of at most MAX_JSON_BYTES)."""
    from avdsl.limits import MAX_JSON_BYTES
    from avdsl.loader import read_bounded

    meta = json.loads(read_bounded(Path(path) / "meta.json", MAX_JSON_BYTES, "meta.json").decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"meta.json holds {type(meta).__name__}, not an object")
    return meta


def _check_shapes(path: Path, stored: dict, expected: dict) -> None:
    """Refuse stored weights (name -> shape) whose shapes do not fit the model's (name -> shape)."""
    wrong = [
        f"{key}: checkpoint {list(shape)} vs model {list(expected[key])}"
        for key, shape in sorted(stored.items())
        if key in expected and expected[key] != shape
    ]
    if wrong:
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit the model; parameter shapes differ:\n  "
            + "\n  ".join(wrong)
        )


def _safetensors_shapes(path: Path) -> dict:
    """Name -> shape of the tensors in a checkpoint's model.safetensors (read from its header)."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _refuse_missing(path: Path, missing, unexpected) -> None:
    if missing or unexpected:
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit the model; "
            f"missing from checkpoint: {sorted(missing)}; not in model: {sorted(unexpected)}"
        )


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    spec_hash: str | None = None,
) -> LoadedCheckpoint:
    """Load weights (and optimizer/scheduler states when given) from checkpoint ``path``.

    Refuses with :class:`CheckpointMismatch` a checkpoint written for another spec (when
    ``spec_hash`` is given), or whose parameter names or shapes differ from ``model``'s. RNG states
    are returned, not applied: call :func:`restore_rng_state` with ``loaded.rng`` to continue a run.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (missing files)")
    try:
        return _load(path, model, optimizer, scheduler, spec_hash)
    except (CheckpointMismatch, FileNotFoundError):
        raise
    except Exception as error:  # any failure to read untrusted files means the checkpoint is damaged
        raise CheckpointCorrupt(f"{path}: {type(error).__name__}: {str(error)[:300]}") from error


def _load(path: Path, model, optimizer, scheduler, spec_hash) -> LoadedCheckpoint:
    meta = read_meta(path)
    stored_hash = meta.get("spec_hash")
    if spec_hash is not None and stored_hash != spec_hash:
        raise CheckpointMismatch(
            f"checkpoint {path} was written for spec hash {stored_hash}, but this model was built "
            f"from spec hash {spec_hash}. Use the spec saved with the checkpoint "
            f"({path / 'spec.yaml'}) to continue it, or start a fresh run directory "
            "(without resume) to train the changed spec."
        )
    if is_sharded_form(meta):
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        _load_sharded(path, model, optimizer, state)
    else:
        state = _load_safetensors_form(path, model, optimizer)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return LoadedCheckpoint(
        path=path,
        step=int(state["step"]),
        config=state.get("config", {}),
        rng=state["rng"],
        counters=state.get("counters", {}),
        baseline=state.get("baseline", {}),
        meta=meta,
    )


def _load_safetensors_form(path: Path, model, optimizer) -> dict:
    """Load model.safetensors and the optimizer state in state.pt; return state.pt's contents."""
    _check_shapes(path, _safetensors_shapes(path), {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if distributed.is_sharded(model):
        weights = load_file(str(path / "model.safetensors"))
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if not (missing or unexpected):
            distributed.load_full_weights(model, weights)
    else:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    _refuse_missing(path, missing, unexpected)
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    stored = state.get("optimizer")
    if optimizer is not None and stored is not None:
        if any(isinstance(key, str) for key in stored.get("state", {})) or any(
            isinstance(p, str) for g in stored.get("param_groups", []) for p in g.get("params", [])
        ):  # keyed by parameter name: written by a run of any number of processes
            distributed.load_full_optimizer_state(model, optimizer, stored)
        else:
            optimizer.load_state_dict(stored)
    return state


def _load_sharded(path: Path, model, optimizer, state: dict) -> None:
    """Load the sharded form's weights (and optimizer state, with the ``param_groups`` in ``state``,
    state.pt's contents) into ``model``, sharded or not. Every process of a sharded model calls it
    (a collective); a plain model reads in each process alone."""
    folder = path / SHARDED_DIR
    stored, expected = sharded.weight_shapes(folder), sharded.model_shapes(model)
    _check_shapes(path, stored, expected)
    _refuse_missing(path, set(expected) - set(stored), set(stored) - set(expected))
    sharded.load_weights(folder, model)
    if optimizer is not None:
        groups = (state.get("optimizer") or {}).get("param_groups")
        if groups is not None:
            sharded.load_optimizer(folder, model, optimizer, groups)
