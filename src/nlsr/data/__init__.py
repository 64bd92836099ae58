"""Datasets by name and the DataLoaders built from them: `Data(args).loader_train / .loader_test`.

Registry (names are case-insensitive): `DIV2K` (div2k.py) and `Demo` (demo.py, test only); any other
name is a folder of images under --dir_data: `Benchmark` for --data_test (benchmark.py), `Folder` for
--data_train (folder.py). `--data_train T91+BSD200` concatenates sets as published.

Multi-scale training (`--scale 2+3+4`): per-batch scale choice by a batch sampler. `PatchBatchSampler`
yields, for each batch, a list of `(index, scale_index, seed)` keys that share one randomly drawn scale
index; the dataset cuts the patch for that scale with a generator seeded by `seed`, and the default
collate turns the scale indices into the LongTensor `idx_scale` of the batch `(lr, hr, idx_scale)`.
Because all randomness (order, scale, patch position, flips) comes from keys drawn in the main process
from `--seed` and the epoch, patches are the same with `--n_threads 0` or any number of workers, and
differ between workers and samples. Nothing random lives in worker processes or module state.

Epoch: exactly `--test_every` batches of `--batch_size` patches. Each training set repeats its images
as published (about batch_size * test_every / number of sets items each), the sampler walks shuffled
passes over the concatenation and stops after batch_size * test_every keys.

Distributed training: `Data(args, rank, world_size)`. With world_size > 1 every rank draws the same
global batches (same seed) and takes its own contiguous slice of batch_size / world_size keys, so all
ranks train on one scale per step; test sets are split by rank (ShardSampler: each image to one rank,
balanced by pixel count, no padding), and the caller gathers the per-image scores.

Workers: `min(--n_threads, os.cpu_count())` processes (0 = load in the main process); datasets hold only
paths and numbers, so they pickle for the `spawn` start method. A UserError raised inside a worker
(e.g. an image whose pixel data is corrupt) comes out of the loader as the same one-line UserError.
"""

from __future__ import annotations

import bisect
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nlsr.data.common import TrainItem
from nlsr.errors import UserError

# name (lower case) -> (module, class); anything else is a folder of images.
REGISTRY = {
    'div2k': ('nlsr.data.div2k', 'DIV2K'),
    'demo': ('nlsr.data.demo', 'Demo'),
}
FOLDER_TRAIN = ('nlsr.data.folder', 'Folder')
FOLDER_TEST = ('nlsr.data.benchmark', 'Benchmark')


def make_dataset(name: str, args: Any, train: bool, log: Callable[[str], None] = print) -> Dataset:
    """Build the dataset registered under `name` (or a folder dataset) for training or testing."""
    module_name, class_name = REGISTRY.get(name.lower(), FOLDER_TRAIN if train else FOLDER_TEST)
    if train and class_name == 'Demo':
        raise UserError('--data_train Demo: Demo images have no ground truth; use it with --data_test')
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(args, name=name, train=train, log=log)


class TrainSet(Dataset):
    """Concatenated training sets addressed by (index, scale_index, seed) keys."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()
        self.train = True

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: int | tuple[int, int, int]) -> TrainItem:
        i, si, seed = key if isinstance(key, tuple) else (key, 0, None)
        d = bisect.bisect_right(self.offsets, i) - 1
        return self.datasets[d][(i - self.offsets[d], si, seed)]

    def set_scale(self, idx_scale: int) -> None:  # published API; the sampler's keys take precedence
        for d in self.datasets:
            d.set_scale(idx_scale)


class PatchBatchSampler(Sampler):
    """Batches of (index, scale_index, seed) keys: one random scale per batch, test_every batches per epoch.

    `set_epoch(e)` fixes the epoch (as DistributedSampler); otherwise each new iteration is the next epoch.
    """

    def __init__(self, n_items: int, batch_size: int, n_batches: int, n_scales: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise UserError(f'--batch_size {batch_size} cannot be split evenly across {world_size} processes')
        self.n_items, self.batch_size, self.n_batches = n_items, batch_size, n_batches
        self.n_scales, self.seed = n_scales, seed
        self.rank, self.world_size = rank, world_size
        self.local = batch_size // world_size
        self.epoch = 0
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        self.epoch = self._next_epoch
        self._next_epoch += 1
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.batch_size * self.n_batches
        passes = -(-total // self.n_items)
        order = np.concatenate([rng.permutation(self.n_items) for _ in range(passes)])[:total]
        scales = rng.integers(0, self.n_scales, size=self.n_batches)
        seeds = rng.integers(0, 2 ** 63 - 1, size=total, dtype=np.int64)
        lo = self.rank * self.local
        for b in range(self.n_batches):
            start = b * self.batch_size + lo
            yield [(int(order[k]), int(scales[b]), int(seeds[k])) for k in range(start, start + self.local)]


class ShardSampler(Sampler):
    """This process's share of a test set: each image goes to exactly one process (no padding).

    With `costs` (e.g. pixel counts, the same on every process), the largest images are dealt first, each
    to the process with the least work so far (longest-processing-time rule), so one large image does not
    keep the other processes waiting; without, image i goes to process i mod world_size.
    """

    def __init__(self, n_items: int, rank: int, world_size: int, costs: Sequence[float] | None = None) -> None:
        if costs is None:
            self.indices = list(range(rank, n_items, world_size))
            return
        if len(costs) != n_items:
            raise ValueError(f'ShardSampler: {len(costs)} costs for {n_items} items')
        load = [0.0] * world_size
        owner = [0] * n_items
        for i in sorted(range(n_items), key=lambda i: (-costs[i], i)):
            owner[i] = min(range(world_size), key=lambda r: (load[r], r))
            load[owner[i]] += costs[i]
        self.indices = [i for i in range(n_items) if owner[i] == rank]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def _worker_message(exc: UserError) -> str:
    """The original one-line message of a UserError re-raised by a DataLoader worker wrapper."""
    text = str(exc)
    if 'DataLoader worker' not in text:
        return text
    for line in reversed(text.strip().splitlines()):
        if 'UserError: ' in line:
            return line.split('UserError: ', 1)[1]
    return text.strip().splitlines()[-1]


class SRLoader(DataLoader):
    """A DataLoader whose worker errors keep the one-line UserError message."""

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except UserError as exc:
            raise UserError(_worker_message(exc)) from None


class Data:
    """`loader_train` (None with --test_only) and `loader_test` (one loader per --data_test name)."""

    def __init__(self, args: Any, rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print) -> None:
        workers = min(int(args.n_threads), os.cpu_count() or 1)
        pin = not args.cpu and torch.cuda.is_available()
        self.loader_train: DataLoader | None = None
        if not args.test_only:
            if not args.data_train:
                raise UserError('--data_train: expected at least one dataset name')
            train = TrainSet([make_dataset(name, args, train=True, log=log) for name in args.data_train])
            sampler = PatchBatchSampler(len(train), args.batch_size, args.test_every, len(args.scale),
                                        args.seed, rank, world_size)
            self.loader_train = SRLoader(train, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                                         persistent_workers=workers > 0)

        self.loader_test: list[DataLoader] = []
        for name in args.data_test:
            testset = make_dataset(name, args, train=False, log=log)
            sizes = getattr(testset, 'hr_sizes', None)
            costs = [h * w for h, w in sizes] if sizes is not None and len(sizes) == len(testset) else None
            sampler = ShardSampler(len(testset), rank, world_size, costs) if world_size > 1 else None
            # No persistent workers: set_scale() changes the dataset between evaluations.
            self.loader_test.append(SRLoader(testset, batch_size=1, shuffle=False, sampler=sampler,
                                             num_workers=workers, pin_memory=pin))
