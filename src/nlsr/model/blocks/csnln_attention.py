"""CSNLN's two attentions (Mei et al., "Image Super-Resolution with Cross-Scale Non-Local Attention and
Exhaustive Self-Exemplars Mining", CVPR 2020), in bounded memory.

Same modules, state-dict keys and arithmetic as SHI-Labs/Cross-Scale-Non-Local-Attention (model/attention.py):

- `InScaleAttention` (published: NonLocalAttention): softmax(q k^T) v over all positions of the map, with
  no 1/sqrt(d) factor. Computed by scaled_dot_product_attention, whose CPU kernel never holds the
  (positions x positions) score matrix.
- `CrossScaleAttention`: every position of the map x (C', H, W) is matched against the normalised 3 x 3
  patches of x downscaled s times (bilinear), and the matching s-times larger (3s x 3s) patches of the
  assembly embedding are pasted at stride s into an s-times larger map, divided by 6. Written per pixel
  (see model.blocks.cross_scale), the stride-s paste of 3s x 3s patches is, for each of the s^2 output
  phases, a stride-1 paste of 3 x 3 patches taken from that phase of the embedding: so the attention is
  cross_scale_attention(match, key, pixel_unshuffle(assembly, s)) followed by pixel_shuffle, computed over
  tiles of query positions in O(tile x keys) extra memory.

Both need the map's height and width to be multiples of s (published: the patch grid of the embedding and
the downscaled map then have the same size; the published chop rounds its quarters to such sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.model import common
from nlsr.model.attention import softmax_attention
from nlsr.model.blocks.cross_scale import auto_block_size, cross_scale_attention

# Query tiles of the cross-scale attention hold at most this many (query, key) scores (64 MiB in float32):
# its four tile buffers then take about 0.4 GiB (cross_scale.BLOCK_SCORES would take 1.6 GiB).
CSNLN_BLOCK_SCORES = 2**24
# The published division of the pasted patches (overlapping 3s x 3s patches at stride s: 9 cover a pixel).
PASTE_DIVISOR = 6.0


class InScaleAttention(nn.Module):
    """The published NonLocalAttention: softmax over all positions of 1x1-conv embeddings (each conv
    followed by a PReLU), no residual."""

    def __init__(self, channel: int = 128, reduction: int = 2, conv: common.ConvFactory = common.default_conv) -> None:
        super().__init__()
        self.conv_match1 = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_match2 = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_assembly = common.BasicBlock(conv, channel, channel, 1, act=nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = self.conv_match1(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        k = self.conv_match2(x).flatten(2).transpose(1, 2)
        v = self.conv_assembly(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        return softmax_attention(q, k, v).transpose(1, 2).reshape(n, -1, h, w)


class CrossScaleAttention(nn.Module):
    """The published CrossScaleAttention (ksize 3, stride 1, softmax_scale 10, average=True): x (N, C, H, W)
    -> (N, C, sH, sW), H and W multiples of `scale`.

    `block_size`: query positions per tile (0: from CSNLN_BLOCK_SCORES).
    """

    def __init__(self, channel: int = 128, reduction: int = 2, scale: int = 2, ksize: int = 3,
                 softmax_scale: float = 10, conv: common.ConvFactory = common.default_conv,
                 block_size: int = 0) -> None:
        super().__init__()
        self.scale = scale
        self.ksize = ksize
        self.softmax_scale = softmax_scale
        self.block_size = block_size
        # Registered before the convolutions, as published (state-dict order).
        self.register_buffer('escape_NaN', torch.tensor([1e-4]))
        self.conv_match_1 = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_match_2 = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_assembly = common.BasicBlock(conv, channel, channel, 1, act=nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        h, w = x.shape[2:]
        if h % s or w % s:
            raise ValueError(f'CrossScaleAttention x{s}: the map is {h}x{w}, its sides must be multiples of {s}')
        value = F.pixel_unshuffle(self.conv_assembly(x), s)  # (N, C s^2, H/s, W/s): the s^2 phases
        match = self.conv_match_1(x)
        # The published downscaling: bilinear by the factor 1/s (not a size), before the embedding.
        key = self.conv_match_2(F.interpolate(x, scale_factor=1.0 / s, mode='bilinear'))
        keys = (key.shape[2] + 2 * (self.ksize // 2)) * (key.shape[3] + 2 * (self.ksize // 2))
        block = self.block_size or auto_block_size(keys, CSNLN_BLOCK_SCORES)
        out = [cross_scale_attention(mi, ki, vi, self.ksize, self.softmax_scale, self.escape_NaN, block_size=block)
               for mi, ki, vi in zip(match, key, value, strict=True)]
        return F.pixel_shuffle(torch.stack(out), s) / PASTE_DIVISOR

    def extra_repr(self) -> str:
        return f'scale={self.scale}, ksize={self.ksize}, block_size={self.block_size}'
