"""PA-EDSR's pyramid attention (Mei et al. 2020), with the published state-dict keys and arithmetic.

Every 3 x 3 patch of the match embedding of x is compared with every normalised 3 x 3 patch of the key
embeddings of a pyramid of x (x itself and bicubic downscales by 0.9, 0.8, 0.7, 0.6); the scores of each
query, over the patches of all levels at once, are scaled by 10 and normalised (softmax as published, or
soft thresholding), and the value patches of all levels are pasted back with a transposed convolution,
divided by 4; plus res_scale * x.

The attention runs over tiles of query positions (model.blocks.cross_scale.patch_attention): the same
outputs in O(tile x patches) extra memory instead of the published (patches x H x W) score map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.model import common
from nlsr.model.attention import check_normalizer
from nlsr.model.blocks.cross_scale import patch_attention

# The published pyramid: `[1 - i / 10 for i in range(level)]` with level 5. A level's size is
# floor(size * factor) in double precision, so a 90-pixel map gives 62 pixels at 0.7, not 63.
PYRAMID_FACTORS = tuple(1 - i / 10 for i in range(5))
PATCH = 3  # the published transposed convolution's padding 1 fits this patch size only
SOFTMAX_SCALE = 10
PASTE_DIVISOR = 4  # the published pasted patches are divided by 4
REDUCTION = 8  # the published PA-EDSR's match embeddings: channel // 8


def level_sizes(height: int, width: int, factors: tuple[float, ...] = PYRAMID_FACTORS) -> list[tuple[int, int]]:
    """The size of each pyramid level: torch's F.interpolate(scale_factor=f) output size, floor(size * f)
    in double precision (as published)."""
    return [(math.floor(float(height) * f), math.floor(float(width) * f)) for f in factors]


def downscale(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A bicubic pyramid level of x, its sampling grid given by the sizes (in / out).

    PyTorch 1.1, which the published weights were trained with, passed only the output size of
    F.interpolate(scale_factor=f) to its kernel; PyTorch >= 1.6 maps coordinates by 1 / f instead (about
    5e-4 apart on the reference model). This keeps the PyTorch 1.1 grid.
    """
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode='bicubic', align_corners=False)


class PyramidAttention(nn.Module):
    """The published PyramidAttention (keys escape_NaN, conv_match_L_base, conv_match, conv_assembly).

    channel: width of x (PA-EDSR: its n_feats; the published code writes 256, its only width); match
    embeddings have channel // reduction channels. normalizer 'softmax' (published) or 'soft_threshold'
    (exact sparsemax of the same scaled scores; `topk` sets where its threshold search starts).
    block_size: query positions per tile (0: from a memory budget).
    """

    def __init__(self, channel: int, reduction: int = REDUCTION, res_scale: float = 1,
                 factors: tuple[float, ...] = PYRAMID_FACTORS, softmax_scale: float = SOFTMAX_SCALE,
                 normalizer: str = 'softmax', topk: int | None = None, block_size: int = 0,
                 conv: common.ConvFactory = common.default_conv) -> None:
        super().__init__()
        check_normalizer(normalizer)
        if channel // reduction < 1:
            raise ValueError(f'channel {channel} must be at least reduction {reduction}')
        self.res_scale = res_scale
        self.factors = tuple(factors)
        self.softmax_scale = softmax_scale
        self.normalizer = normalizer
        self.topk = topk
        self.block_size = block_size
        self.register_buffer('escape_NaN', torch.tensor([1e-4]))
        self.conv_match_L_base = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_match = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_assembly = common.BasicBlock(conv, channel, channel, 1, act=nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match = self.conv_match_L_base(x)
        keys, values = [], []
        for size in level_sizes(x.shape[2], x.shape[3], self.factors):
            level = downscale(x, size)
            values.append(self.conv_assembly(level))
            keys.append(self.conv_match(level))
        out = [patch_attention(match[i], [k[i] for k in keys], [v[i] for v in values], PATCH, self.softmax_scale,
                               self.escape_NaN, self.normalizer, self.topk, self.block_size)
               for i in range(x.shape[0])]
        return torch.stack(out) / PASTE_DIVISOR + x * self.res_scale

    def extra_repr(self) -> str:
        return f'factors={self.factors}, normalizer={self.normalizer}, block_size={self.block_size}'
