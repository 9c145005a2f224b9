"""DataLoaders for avdsl data sets: seeded order, skip-None batching, persistent workers."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate


def collate_skip_none(items: list) -> dict | None:
    """Stack a batch of ``{name: tensor}`` items, leaving out the None a bad media file gives.

    Returns None when every item of the batch was bad; a training loop skips such a batch. How many
    items were dropped is counted by the data set itself (``MediaDataset.skipped``), not here.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return default_collate(kept)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with :func:`collate_skip_none` whose shuffling and worker seeds follow ``seed``.

    Workers (``workers > 0``) stay alive between epochs, so per-worker setup is paid once; torch
    gives each worker one thread and a global RNG seeded from the loader's generator, which makes
    random augmentations in the data set reproducible for a given seed.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
        drop_last=drop_last,
    )


class Materialized(Dataset):
    """A data set rendered once into memory. The embedded synthetic data is generated on the fly;
    a short CPU run renders each clip many times otherwise, which costs more than the model."""

    def __init__(self, dataset: Dataset, progress=None):
        self.items = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # clips are small: one thread renders 2-3x faster than two contending
        try:
            for i in range(len(dataset)):
                self.items.append(dataset[i])
                if progress is not None:
                    progress(i + 1, len(dataset))
        finally:
            torch.set_num_threads(threads)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]
