"""Image-quality metrics as pure functions of two images (MATLAB conventions, BasicSR style).

Conventions, all parameters rather than hidden state:
- images are uint8 HxWxC arrays (C = 1 or 3), as saved to disk; `tensor_to_image` quantizes a network
  output exactly as EDSR does before scoring (x * 255 / rgb_range, clamp to 0..255, round);
- `y_channel=True`: RGB images are compared on BT.601 luma, 16 + (65.481 R + 128.553 G + 24.966 B) / 255
  on 0..255 values, kept in float64 (no rounding); single-channel images are compared on that channel;
- `crop_border` pixels are shaved from every side (SR papers use the scale);
- PSNR with peak 255; identical images give `inf` (the MSE is exactly 0);
- SSIM as MATLAB's `ssim_index` / BasicSR: 11x11 Gaussian window, sigma 1.5, 'valid' filtering,
  K1 = 0.01, K2 = 0.03, L = 255, the mean of the SSIM map; several channels: mean of per-channel SSIM.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from nlsr.imageops.color import rgb_to_y

__all__ = ['tensor_to_image', 'psnr', 'ssim']


def tensor_to_image(t: torch.Tensor, rgb_range: float) -> np.ndarray:
    """(C,H,W) (or (1,C,H,W)) tensor with values in [0, rgb_range] -> uint8 HxWxC, quantized like EDSR."""
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f'tensor_to_image: expected a (C,H,W) tensor, got shape {tuple(t.shape)}')
    x = t.detach().to('cpu', torch.float32).mul(255 / rgb_range).clamp(0, 255).round()
    return x.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _prepare(img: np.ndarray, crop_border: int, y_channel: bool) -> np.ndarray:
    """-> float64 HxWxC' (C' = 1 for luma or single-channel input), border shaved."""
    x = np.asarray(img)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] not in (1, 3):
        raise ValueError(f'metrics: expected an HxW, HxWx1 or HxWx3 image, got shape {x.shape}')
    if x.shape[2] == 3 and y_channel:
        x = rgb_to_y(x)[..., None]
    else:
        x = x.astype(np.float64)
    if crop_border > 0:
        x = x[crop_border:-crop_border, crop_border:-crop_border]
    return x


def _pair(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    if np.shape(sr) != np.shape(hr):
        raise ValueError(f'metrics: image shapes differ: {np.shape(sr)} vs {np.shape(hr)}')
    a, b = _prepare(sr, crop_border, y_channel), _prepare(hr, crop_border, y_channel)
    if a.size == 0:
        raise ValueError(f'metrics: nothing left of a {np.shape(sr)} image after shaving {crop_border} pixels')
    return a, b


def psnr(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """PSNR in dB (peak 255) between two uint8 images; inf when they are identical."""
    a, b = _pair(sr, hr, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()  # the 2-D window outer(g, g) then also sums to 1, as fspecial('gaussian')


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    # Separable 'valid' correlation with the Gaussian (symmetric, so convolution alike).
    x = sliding_window_view(x, g.size, axis=0) @ g
    return sliding_window_view(x, g.size, axis=1) @ g


def _ssim_2d(a: np.ndarray, b: np.ndarray) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    g = _gaussian_window()
    if min(a.shape) < g.size:
        raise ValueError(f'ssim: image {a.shape} is smaller than the {g.size}x{g.size} window')
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a ** 2
    var_b = _filter_valid(b * b, g) - mu_b ** 2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """SSIM (MATLAB settings) between two uint8 images; 1.0 when they are identical."""
    a, b = _pair(sr, hr, crop_border, y_channel)
    return float(np.mean([_ssim_2d(a[..., c], b[..., c]) for c in range(a.shape[2])]))
