"""Seeding: one seed per process, so a run and its resumed twin draw the same numbers; one seed per test image,
so a network with random draws gives an image the same output whatever ran before it."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

# Per-rank seeds: rank r adds r * RANK_SEED_STRIDE, so rank 0 draws exactly what a single process draws.
RANK_SEED_STRIDE = 1_000_003


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank` (rank 0 keeps `seed`, so it draws what a single process draws)."""
    return seed + RANK_SEED_STRIDE * rank


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run and its resumed twin draw the same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def image_seed(seed: int, name: str) -> int:
    """The seed of the evaluation draws for the image `name` (its file name without suffix) under --seed:
    a stable hash (BLAKE2b) of both, 63 bits, the same on every machine, process and run."""
    digest = hashlib.blake2b(f'{seed}/{name}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & (2**63 - 1)
