"""Training across processes: data parallel (DDP) or fully sharded (FSDP2), started by torch's launcher.

Two ways to start N processes, both ending in the same ``setup_distributed()``:

* ``avdsl train spec.yaml --nproc N`` calls :func:`launch`, which starts N local processes through
  torch's elastic launcher (what ``torchrun --standalone`` runs; its c10d store picks the port);
* torchrun itself, on one or several machines:
  ``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m avdsl train spec.yaml``;
  torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which ``setup_distributed()`` reads.

The backend is nccl when CUDA is available (one GPU per local rank) and gloo on CPU. The training loop
asks :func:`current` who it is and :func:`wrap` prepares the model for the chosen strategy:

* ``ddp``: every process holds the whole model; gradients are averaged (DistributedDataParallel);
* ``fsdp``: parameters, gradients and optimizer state are sharded across processes with torch's
  ``fully_shard`` (FSDP2): each transformer layer and then the whole model is one unit that is gathered
  for its forward and backward and sharded again afterwards.

Checkpoints (see ``checkpoint``): one process, and ``ddp``, write one ``model.safetensors`` from rank 0.
``fsdp`` with several processes writes the sharded form: every process saves the shards it holds
of the weights and of the optimizer state with ``torch.distributed.checkpoint`` into the checkpoint's
``sharded/`` folder, so nothing is gathered onto one process (see ``sharded``). Either form loads
into however many processes the resumed run has (DCP reshards; a ``model.safetensors`` is scattered
with :func:`load_full_weights`), so a run saved with N processes resumes with M, or in one process
without a process group; ``avdsl eval``, ``export`` and ``train --init`` read both forms, and
``avdsl export --format safetensors`` turns a sharded checkpoint into one ``model.safetensors``.
"""
from __future__ import annotations

import os
import signal
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True for the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def backend() -> str:
    """nccl with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Without WORLD_SIZE (or with WORLD_SIZE=1) this is a single process and nothing is initialised.
    With CUDA, the process binds to GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend(), init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def current() -> DistInfo:
    """The DistInfo of the running process group (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))
    return DistInfo()


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _in_group(fn: Callable, *args: Any) -> Any:
    """Entry point of one launched process: join the group the launcher described, run ``fn``."""
    setup_distributed()
    try:
        return fn(*args)
    finally:
        cleanup_distributed()


def launch(nproc: int, fn: Callable, *args: Any) -> Any:
    """Run ``fn(*args)`` in ``nproc`` local processes forming one process group; return rank 0's result.

    Uses torch's elastic launcher (the API behind ``torchrun --standalone``): the rendezvous store binds
    a port the OS chooses, so there is no port search that could race. ``fn`` and ``args`` must be
    picklable (a module-level function). With ``nproc == 1`` ``fn`` runs in this process, without a
    process group. Raises if any process fails (torch's ``ChildFailedError`` names the rank and error).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if nproc == 1:
        return fn(*args)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"avdsl-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn",
    )
    # the launcher installs its own handlers for termination signals in this process and leaves them:
    # put back what the caller had
    signals = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    previous = {s: signal.getsignal(s) for s in signals}
    try:
        results = elastic_launch(config, _in_group)(fn, *args)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return results[0]


def wrap(model: torch.nn.Module, strategy: str, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: ``model`` itself for one process, a DDP wrapper for
    ``ddp``, and for ``fsdp`` ``model`` sharded in place (each transformer layer, then the whole).
    Call before creating the optimizer: with ``fsdp`` the parameters become sharded DTensors."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..encoder import Block

    mesh = init_device_mesh(device.type, (info.world_size,))
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` (or a part of it) was sharded with ``fully_shard`` (``fsdp``)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def load_full_weights(model: torch.nn.Module, weights: dict) -> None:
    """Scatter un-sharded weights onto this process's part of ``model`` (every process passes all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an un-sharded optimizer state keyed by parameter name into ``optimizer``,
    sharding it as the parameters are sharded. Not strict: a parameter that never had a gradient
    (unused by the losses) has no state to load; the weights themselves are checked strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def grad_norm_value(norm: torch.Tensor) -> float:
    """The float of ``clip_grad_norm_``'s result (a replicated DTensor when parameters are sharded)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small CPU tensor across processes (identity for a single process)."""
    if not info.distributed:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    reduced = values.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every process (``value`` itself for a single process); a collective.
    For small values the processes agree on (a path, an error message): it travels pickled."""
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for a single process)."""
    if info.distributed:
        dist.barrier()
