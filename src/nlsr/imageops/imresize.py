"""MATLAB-compatible bicubic `imresize`, vectorised with NumPy.

What MATLAB's `imresize(A, scale)` does with the default bicubic method, and this module reproduces:
- the cubic convolution kernel of Keys with a = -0.5;
- when downscaling (scale < 1) the kernel is widened by 1/scale and scaled by `scale` (antialiasing);
  when upscaling the plain 4-tap kernel is used;
- output size ceil(scale * input size); output pixel x (1-based) samples input coordinate
  x/scale + 0.5 * (1 - 1/scale); weights normalised to sum to 1 per output pixel;
- out-of-range taps mirrored symmetrically (..., 2, 1, 1, 2, ... at the start);
- the two axes are resized one after the other, dimension 1 (the rows axis: the image's height) first,
  then dimension 2 (its width);
- for uint8 input each pass returns uint8: the sum is rounded half away from zero and saturated to
  0..255 before the next pass. That intermediate rounding is why a float-only port gets only about 85% of
  the LR pixels of the benchmark releases right; this module reproduces them bit-exactly.

Vectorisation: per axis, an (out, taps) table of weights and source indices; each tap is one gather of
whole rows (or columns) multiplied by a weight column and accumulated in tap order, which is the order
MATLAB's mex file sums in. No per-pixel Python loop; the loop over taps is at most ceil(4 s) + 2 long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ['imresize', 'contributions']


def _cubic(x: np.ndarray) -> np.ndarray:
    # Written as MATLAB's `cubic` so intermediate float values are the same.
    absx = np.abs(x)
    absx2 = absx ** 2
    absx3 = absx ** 3
    return ((1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
            + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2)))


def contributions(in_length: int, out_length: int, scale: float,
                  antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out_length, taps) float64 and 0-based source indices (out_length, taps) for one axis."""
    kernel_width = 4.0
    shrink = scale < 1 and antialiasing
    if shrink:
        kernel_width = kernel_width / scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, like MATLAB
    dist = u[:, None] - indices
    weights = scale * _cubic(scale * dist) if shrink else _cubic(dist)
    weights = weights / np.sum(weights, axis=1, keepdims=True)
    # Symmetric border: index sequence 1..n, n..1 repeated.
    aux = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    idx = aux[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    keep = np.any(weights != 0, axis=0)  # MATLAB drops all-zero tap columns
    return weights[:, keep], idx[:, keep]


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    # MATLAB's double -> uint8: round half away from zero, then saturate. Negative values saturate to 0
    # either way, so floor(x + 0.5) on the clipped value (truncation by astype) is the same rounding.
    return np.clip(x + 0.5, 0, 255.5).astype(np.uint8)


def _resize_axis(img: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    # A contiguous copy with the resized axis first makes every tap one fast gather of whole lines.
    src = np.ascontiguousarray(np.moveaxis(img, axis, 0))
    shape = (weights.shape[0],) + (1,) * (src.ndim - 1)
    out = np.zeros((weights.shape[0],) + src.shape[1:], dtype=np.float64)
    term = np.empty_like(out)
    for k in range(weights.shape[1]):  # taps, summed in MATLAB's order
        np.multiply(weights[:, k].reshape(shape), src[indices[:, k]], out=term)
        out += term
    return np.moveaxis(out, 0, axis)


def imresize(img: np.ndarray, scale: float | None = None,
             output_shape: Sequence[int] | None = None) -> np.ndarray:
    """Resize an HxW or HxWxC image like MATLAB's `imresize(img, scale)` / `imresize(img, [h w])` (bicubic).

    uint8 in -> uint8 out (rounded and saturated after each axis, as MATLAB); float in -> float out of the
    same dtype (no rounding or clipping). Give `scale` (the same factor for both axes) or `output_shape`
    (h, w); with both, `output_shape` sets the size and `scale` the kernel (what MATLAB does internally for
    `imresize(img, scale)`, whose size is ceil(scale * input size)).
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f'imresize: expected an HxW or HxWxC array, got shape {img.shape}')
    is_uint8 = img.dtype == np.uint8
    if not is_uint8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f'imresize: expected uint8 or floating-point pixels, got {img.dtype}')
    in_shape = img.shape[:2]
    if scale is None and output_shape is None:
        raise ValueError('imresize: give scale or output_shape')
    if output_shape is not None:
        out_shape = (int(output_shape[0]), int(output_shape[1]))
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1]) if scale is None else (scale, scale)
    else:
        scales = (float(scale), float(scale))
        out_shape = (math.ceil(scale * in_shape[0]), math.ceil(scale * in_shape[1]))
    if min(out_shape) < 1 or min(in_shape) < 1:
        raise ValueError(f'imresize: cannot resize {in_shape} to {out_shape}')

    # MATLAB resizes the dimension with the smallest scale first; ties keep the order rows, columns.
    order = sorted((0, 1), key=lambda a: scales[a])
    out = img
    for axis in order:
        weights, indices = contributions(in_shape[axis], out_shape[axis], scales[axis])
        out = _resize_axis(out, axis, weights, indices)
        out = _round_to_uint8(out) if is_uint8 else out
    return np.ascontiguousarray(out if is_uint8 else out.astype(img.dtype, copy=False))
