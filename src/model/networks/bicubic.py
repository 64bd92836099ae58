"""Bicubic baseline: MATLAB-compatible bicubic upscaling as a parameter-free model.

It runs through the same loaders, quantisation and metrics as every network, so the first row of a
paper table comes from this pipeline rather than from somebody else's MATLAB.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from imageops.imresize import imresize
from model.contract import SRNetwork

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
