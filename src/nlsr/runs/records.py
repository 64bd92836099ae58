"""The records a run keeps of its evaluations: per-image scores, per-epoch history entries, results.json rows.

Plain frozen dataclasses: training/evaluate.py makes them, training/training_state.py stores the history,
watch.py plots it.
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
