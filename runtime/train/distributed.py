"""Data-parallel training across processes (DistributedDataParallel).

Two ways to start N processes, both ending in the same ``setup_distributed()``:

* ``avdsl train spec.yaml --nproc N`` calls :func:`launch`, which spawns N local processes on
  127.0.0.1 with a free port;
* the equivalent torchrun line is
  ``torchrun --nproc_per_node N -m avdsl train spec.yaml ...``; torchrun sets RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which ``setup_distributed()`` reads.

The backend is nccl when CUDA is available (one GPU per local rank) and gloo on CPU. The training
loop asks :func:`current` who it is: it wraps the model in DDP when the world size is above 1,
reads its own shard of every global batch, and only rank 0 writes checkpoints, logs and bars.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, nproc: int, port: int, fn: Callable, args: tuple) -> None:
    """Entry point of one spawned process: set torchrun's variables, join, run ``fn``."""
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    setup_distributed()
    try:
        fn(*args)
    finally:
        cleanup_distributed()


def launch(nproc: int, fn: Callable, *args: Any) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes forming one process group.

    ``fn`` and ``args`` must be picklable (a module-level function). With ``nproc == 1`` ``fn`` runs
    in this process, without a process group. Raises if any process fails.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if nproc == 1:
        fn(*args)
        return
    mp.spawn(_worker, args=(nproc, free_port(), fn, args), nprocs=nproc, join=True)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small CPU tensor across processes (identity for a single process)."""
    if not info.distributed:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    reduced = values.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for a single process)."""
    if info.distributed:
        dist.barrier()
