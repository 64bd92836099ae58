"""Colour conversions: BT.601 luma (MATLAB's rgb2ycbcr Y, what the papers score and what --n_colors 1
trains on) and full-range gray."""

from __future__ import annotations

import numpy as np


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """HxWx3 RGB on 0..255 -> float64 HxW BT.601 luma (16..235), MATLAB's rgb2ycbcr Y without rounding."""
    x = np.asarray(img, dtype=np.float64)
    return 16.0 + (x @ np.array([65.481, 128.553, 24.966])) / 255.0


def rgb_to_gray(img: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxWx1 uint8 full-range BT.601 luma (0.299 R + 0.587 G + 0.114 B), rounded.

    A grayscale ground truth is compared on its single channel; a network's RGB output for it is reduced
    to that channel this way (for equal channels it is the channel itself).
    """
    x = np.asarray(img, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(x), 0, 255).astype(np.uint8)[..., None]
