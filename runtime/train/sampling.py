"""Deterministic, resumable batching: the items of step s depend only on (seed, s, rank).

Instead of a stateful sampler, each step's indices are a pure function of the seed and the step, so
a run resumed at step s sees exactly the batches the uninterrupted run saw from step s on, and every
process of a distributed run takes its own disjoint slice of the global batch (the same sharding a
DistributedSampler does, without its epoch bookkeeping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of all items for one pass over the data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(dataset_size, generator=generator)


def batch_indices(
    dataset_size: int, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Indices this process reads for ``step``.

    The global stream is the concatenation of per-epoch permutations; step s takes positions
    ``[s * G, (s + 1) * G)`` of it with ``G = batch_size * world_size`` (a batch may span two
    epochs), and rank r takes the r-th contiguous block of ``batch_size`` of those.
    """
    if dataset_size < 1:
        raise ValueError("cannot draw batches from an empty data set")
    start = (step * world_size + rank) * batch_size
    indices, cached_epoch, order = [], None, None
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, dataset_size)
        if epoch != cached_epoch:
            order, cached_epoch = epoch_permutation(dataset_size, seed, epoch), epoch
        indices.append(int(order[offset]))
    return indices


@dataclass
class StepBatchSampler(Sampler):
    """Yields :func:`batch_indices` for steps ``start_step .. stop_step - 1``."""

    dataset_size: int
    batch_size: int
    seed: int
    start_step: int
    stop_step: int
    rank: int = 0
    world_size: int = 1

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.stop_step):
            yield batch_indices(
                self.dataset_size, self.batch_size, self.seed, step, self.rank, self.world_size
            )

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)


@dataclass
class CountingCollate:
    """Collate the items that loaded and report how many came back as None (skipped files).

    Returns ``(batch, skipped)``; ``batch`` is None when every item of the batch was skipped.
    """

    inner: Callable = default_collate

    def __call__(self, items: list) -> tuple[dict | None, int]:
        present = [item for item in items if item is not None]
        skipped = len(items) - len(present)
        return (self.inner(present) if present else None), skipped


def make_step_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start_step: int,
    stop_step: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader yielding ``(batch, skipped)`` for each step from ``start_step`` on."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, stop_step, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=CountingCollate(collate_fn or default_collate),
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        persistent_workers=False,
        pin_memory=False,
    )
