"""The records of an evaluation: per-image scores, per-epoch history entries, results.json rows.

Plain frozen dataclasses, shared by evaluate.py (which makes them) and training_state.py (which stores the
history), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageScore:
    """One test image's scores (None without ground truth)."""

    stem: str
    psnr: float | None
    ssim: float | None


@dataclass(frozen=True)
class HistoryEntry:
    """The mean scores of one test set at one scale after one epoch: best tracking, plots, psnr_log.pt."""

    epoch: int
    dataset: str
    scale: int
    psnr: float | None
    ssim: float | None


@dataclass(frozen=True)
class SetResult:
    """One row of results.json: a test set at one scale in the latest evaluation."""

    dataset: str
    scale: int
    psnr: float | None
    ssim: float | None
    images: int
    seconds: float
    epoch: int
