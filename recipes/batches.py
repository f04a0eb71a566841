"""Batches that depend only on (seed, epoch): the same global batches on 1 or 8 ranks,
and after a resume, from any batch of the epoch on.

Each epoch draws one permutation of the training set from (seed, epoch); global batch b is
its slice [b*B, (b+1)*B), and rank r of W takes the r-th of W equal parts of it. The last
partial batch is dropped in training (equal steps on every rank). Augmentation is seeded
per sample by `data.Augmented`, so the images are identical too.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rmn_fx.errors import OptionError

from .distributed import Group


class EpochBatches(Sampler[list[int]]):
    """This rank's part of each global training batch of one epoch, from batch `start` on."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, group: Group, start: int = 0) -> None:
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.group, self.start = group, start

    def __len__(self) -> int:
        return max(0, self.size // self.batch_size - self.start)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        share = self.batch_size // self.group.world
        for b in range(self.start, self.size // self.batch_size):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.group.rank * share : (self.group.rank + 1) * share].tolist()


class ShardBatches(Sampler[list[int]]):
    """Every sample once, in order, rank r taking samples r, r+W, ... (evaluation, keys)."""

    def __init__(self, size: int, batch_size: int, group: Group) -> None:
        self.indices = list(range(group.rank, size, group.world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size]


def check_batch_size(batch_size: int, size: int, group: Group) -> None:
    if batch_size % group.world:
        raise OptionError(f"batch size {batch_size} does not split over {group.world} processes; use a multiple of {group.world}")
    if size < batch_size:
        raise OptionError(f"the training set has {size} samples, fewer than one batch of {batch_size}; use a smaller --batch-size")


def loader(dataset: Dataset, sampler: Sampler, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda")


def training_batches(dataset, batch_size: int, seed: int, epoch: int, group: Group, workers: int, device, start: int = 0) -> DataLoader:
    dataset.epoch = epoch  # read by data.Augmented to seed each sample's augmentation
    return loader(dataset, EpochBatches(len(dataset), batch_size, seed, epoch, group, start), workers, device)


def evaluation_batches(dataset, batch_size: int, group: Group, workers: int, device) -> DataLoader:
    return loader(dataset, ShardBatches(len(dataset), batch_size, group), workers, device)
