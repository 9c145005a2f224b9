"""The sharded part of a checkpoint of an ``fsdp`` run, written and read with ``torch.distributed.checkpoint``.

A sharded checkpoint folder (``step-*/sharded/``) holds two torch.distributed.checkpoint (DCP)
checkpoints in DCP's safetensors storage (``HuggingFaceStorageWriter`` with ``save_distributed``):

* ``model/``     - the weights, keyed by parameter name;
* ``optimizer/`` - the optimizer's tensors (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``), keyed
                   ``state.<parameter name>.<key>``; its non-tensor ``param_groups`` go to ``state.pt``.

Every process writes the shards it holds (``shard-0000<rank + 1>-model-00001-of-00001.safetensors``):
nothing is gathered. Where each shard sits in its tensor is stored in the safetensors header, so a
reader rebuilds the layout from the files alone, and DCP reshards on load: a checkpoint saved by N
processes loads into M, or into a plain model in one process without a process group. Safetensors
storage rather than DCP's default one because the default reads its index and any non-tensor value
with pickle, which would run code from a hostile checkpoint; safetensors holds only tensors.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
SUFFIX = ".safetensors"


class ShardError(RuntimeError):
    """torch.distributed.checkpoint failed to write or read the shards (on any process)."""


def _dcp_failure(error: BaseException) -> ShardError:
    """A plain error from DCP's ``CheckpointException`` (a BaseException listing each rank's failure)."""
    failures = getattr(error, "failures", None)
    if not failures:
        return ShardError(str(error)[:500])
    return ShardError("; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"[:300]
                                for rank, (exc, _) in sorted(failures.items())))


def _run(action, *args, **kwargs) -> None:
    """Call a DCP save or load, turning its BaseException into :class:`ShardError`. Without a process
    group DCP works in this process alone, as meant here: its warning saying so is not shown."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            action(*args, **kwargs)
    except CheckpointException as error:
        raise _dcp_failure(error) from None


def _optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    """``{"state.<name>.<key>": tensor}`` of a name-keyed optimizer state's per-parameter tensors."""
    return {f"state.{name}.{key}": value for name, per_param in state.items()
            for key, value in per_param.items() if isinstance(value, torch.Tensor)}


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[dict] | None:
    """Write this process's shards of ``model``'s weights and ``optimizer``'s tensors under ``folder``.

    A collective: every process calls it with the same ``folder``. Returns the optimizer's
    ``param_groups`` keyed by parameter name (to store with the rest of the state), None without
    an optimizer. Raises :class:`ShardError` (on every process) when any process fails to write."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    def write(state: dict, sub: str) -> None:
        writer = dcp.HuggingFaceStorageWriter(str(folder / sub), save_distributed=True)
        _run(dcp.save, state, storage_writer=writer)

    write(get_model_state_dict(model), MODEL_DIR)
    if optimizer is None:
        return None
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    write(_optimizer_tensors(optimizer_state["state"]), OPTIMIZER_DIR)
    return optimizer_state["param_groups"]


def files(folder: Path) -> list[str]:
    """The shard files under ``folder``, as ``model/...`` and ``optimizer/...`` paths, sorted."""
    return sorted(f"{sub}/{p.name}" for sub in (MODEL_DIR, OPTIMIZER_DIR) if (folder / sub).is_dir()
                  for p in (folder / sub).iterdir() if p.name.endswith(SUFFIX))


def valid_file_name(name: object) -> bool:
    """True for a shard path as :func:`files` lists it (no other folder, no way out of the checkpoint)."""
    if not isinstance(name, str) or name.count("/") != 1:
        return False
    sub, file = name.split("/")
    return sub in (MODEL_DIR, OPTIMIZER_DIR) and file.endswith(SUFFIX) and not file.startswith(".") \
        and all(c.isalnum() or c in "-_." for c in file)


def _layout(folder: Path) -> dict:
    """DCP's layout of the safetensors shards in ``folder``, read from their headers; raises
    ValueError when the shards do not cover a tensor (a shard file is missing)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    layout = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    for key, entry in layout.items():
        stored = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if stored != math.prod(entry.size):
            raise ValueError(f"the shards of {key!r} hold {stored} of its {math.prod(entry.size)} values "
                             "(a shard file is missing)")
    return layout


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every weight stored in sharded checkpoint folder ``folder``."""
    return {key: tuple(entry.size) for key, entry in _layout(folder / MODEL_DIR).items()}


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> full (un-sharded) shape of every tensor of ``model``'s state, as DCP names them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {key: tuple(value.shape) for key, value in get_model_state_dict(model).items()}


def _reader_options(model: torch.nn.Module) -> dict:
    """A sharded model loads collectively (every process its part); a plain one reads every tensor
    whole in each process on its own, with or without a process group."""
    from . import distributed

    return {"no_dist": not distributed.is_sharded(model)}


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """Load the weights in ``folder`` (checked to fit with :func:`weight_shapes`) into ``model``,
    plain or sharded over any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    reader = dcp.HuggingFaceStorageReader(str(folder / MODEL_DIR))
    _run(dcp.load, state, storage_reader=reader, **_reader_options(model))
    set_model_state_dict(model, state)


def load_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   param_groups: list[dict]) -> None:
    """Load the optimizer tensors in ``folder`` and ``param_groups`` (keyed by parameter name) into
    ``optimizer``, sharded as ``model`` is. A parameter without stored state (it never had a gradient)
    gets none, as in the run that saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    current = get_optimizer_state_dict(model, optimizer)  # allocates the state DCP loads into
    stored = set(_layout(folder / OPTIMIZER_DIR))
    state = {name: per_param for name, per_param in current["state"].items()
             if all(key in stored for key in _optimizer_tensors({name: per_param}))}
    reader = dcp.HuggingFaceStorageReader(str(folder / OPTIMIZER_DIR))
    _run(dcp.load, _optimizer_tensors(state), storage_reader=reader, **_reader_options(model))
    optimizer.state.clear()  # what was allocated for parameters without stored state goes
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": param_groups},
                             options=StateDictOptions(strict=False))
