"""Bicubic baseline: MATLAB-compatible bicubic upscaling as a parameter-free model.

It runs through the same loaders, quantisation and metrics as every network, so the first row of a
paper table comes from this pipeline rather than from somebody else's MATLAB.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nlsr.imageops.imresize import contributions, imresize
from nlsr.model.contract import SRNetwork, exporting

FLAGS: tuple[str, ...] = ()


def make_model(args: argparse.Namespace) -> SRNetwork:
    return Bicubic(scales=args.scale, rgb_range=args.rgb_range)


class Bicubic(SRNetwork):
    """Upscale each image like MATLAB's imresize(uint8_lr, scale) (inputs are 8-bit images scaled to rgb_range)."""

    multi_scale = True

    def __init__(self, scales: list[int], rgb_range: float = 255) -> None:
        super().__init__()
        self.scales = list(scales)
        self.rgb_range = rgb_range
        self.idx_scale = 0

    def set_scale(self, idx_scale: int) -> None:
        self.idx_scale = idx_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return self._graph_forward(x)
        scale = self.scales[self.idx_scale]
        to_8bit = 255 / self.rgb_range
        out = []
        for img in x.detach().float().cpu():
            # The loaders give 8-bit values scaled to rgb_range: recover the exact uint8 image MATLAB sees.
            lr = (img.permute(1, 2, 0).numpy() * to_8bit).round().clip(0, 255).astype(np.uint8)
            sr = imresize(lr, scale=scale)
            if sr.ndim == 2:
                sr = sr[:, :, None]
            out.append(torch.from_numpy(sr.astype(np.float32) / to_8bit).permute(2, 0, 1))
        return torch.stack(out).to(device=x.device, dtype=x.dtype)

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same result in torch operations of fixed shape (a traced graph): the uint8 input, then each
        axis (height first) upscaled with imresize's weights, summed in its order in float64 and rounded."""
        to_8bit = 255 / self.rgb_range
        out = torch.round(x.double() * to_8bit).clamp(0, 255)
        for dim in (2, 3):
            out = _upscale_axis(out, dim, self.scales[self.idx_scale])
            out = torch.floor(torch.clamp(out + 0.5, 0, 255.5))  # imresize's rounding to uint8
        return (out / to_8bit).to(x.dtype)


def _upscale_axis(x: torch.Tensor, dim: int, scale: int) -> torch.Tensor:
    """imresize along `dim` by an integer `scale`: output pixel m * scale + r takes, for each phase r, the same
    weights at the same offsets from input pixel m (read from an interior row of imresize.contributions),
    with imresize's symmetric border (indices mirrored modulo 2n)."""
    probe = 64
    weights, indices = contributions(probe, probe * scale, float(scale))
    middle = probe // 2
    length = x.shape[dim]
    positions = torch.arange(length, device=x.device)
    phases = []
    for r in range(scale):
        acc = torch.zeros_like(x)
        for w, index in zip(weights[middle * scale + r], indices[middle * scale + r], strict=True):
            source = torch.remainder(positions + int(index - middle), 2 * length)
            source = torch.where(source < length, source, 2 * length - 1 - source)
            acc = acc + float(w) * x.index_select(dim, source)
        phases.append(acc)
    return torch.stack(phases, dim=dim + 1).flatten(dim, dim + 1)
