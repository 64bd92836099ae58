"""Seeding: one seed per process, so a run and its resumed twin draw the same numbers."""

from __future__ import annotations

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
