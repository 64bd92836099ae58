"""CSNLN (Mei et al., "Image Super-Resolution with Cross-Scale Non-Local Attention and Exhaustive
Self-Exemplars Mining", CVPR 2020).

Same modules, state-dict keys and arithmetic as SHI-Labs/Cross-Scale-Non-Local-Attention (model/csnln.py,
model/attention.py), so its released checkpoints (n_feats 128, depth 12, rgb_range 1) load strictly. One
recurrent projection unit (the self-exemplar mining cell, SEM) is applied `depth` times with the same
weights; each pass yields an HR estimate, and a 3x3 conv over all of them gives the output (no upsampler).

Differences from the published code, none of which changes an output the published code produces:
- its attentions are built with channel=128 whatever --n_feats (it fails at any other width); here they
  follow n_feats;
- the attentions run in bounded memory (model.blocks.csnln_attention), and the tail convolution is summed
  over the HR estimates as they come instead of over their concatenation;
- the published network needs an LR height and width that are multiples of its attention's factor
  (2 at x2 and x4, 3 at x3; its forward_chop rounds quarters up to multiples of the scale); other sizes,
  which the published code refuses, are padded here by repeating the last row/column and the output cropped.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.model import common
from nlsr.model.blocks.csnln_attention import CrossScaleAttention, InScaleAttention
from nlsr.model.contract import ChopRule, SRNetwork

FLAGS = ('n_feats', 'depth')
SCALES = (2, 3, 4)
CSNLN_MEAN = common.DIV2K_MEAN
# Per scale: (kernel, stride, padding) of the projection unit's strided (de)convolutions and the factor of
# its cross-scale attention (x4 goes up twice by 2; its second stage uses 8/4/2 convolutions).
PROJECTION = {2: (6, 2, 2, 2), 3: (9, 3, 3, 3), 4: (6, 2, 2, 2)}
X4_SECOND_STAGE = (8, 4, 2)
# The published forward_chop (min_size 3600 at every scale; quarters rounded up to a multiple of the scale).
CHOP_SHAVE, CHOP_MIN_SIZE = 10, 3600


def make_model(args: argparse.Namespace) -> SRNetwork:
    scale = args.scale[0]
    if scale not in SCALES:
        raise ValueError(f'--scale {scale}: CSNLN is built for x2, x3 and x4')
    if args.n_feats < 2:
        raise ValueError(f'--n_feats {args.n_feats}: CSNLN needs at least 2 (its attention embeddings have '
                         'n_feats // 2 channels)')
    if args.depth < 1:
        raise ValueError(f'--depth {args.depth}: CSNLN needs at least 1 recurrent projection unit')
    return CSNLN(scale=scale, n_colors=args.n_colors, n_feats=args.n_feats, depth=args.depth,
                 rgb_range=args.rgb_range)


def _prelu_after(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer, nn.PReLU())


class MultisourceProjection(nn.Module):
    """x (C, H, W) -> (C, fH, fW): the in-scale attention upsampled by a deconvolution, corrected by a
    residual block of its difference to the cross-scale attention (factor f)."""

    def __init__(self, n_feats: int, scale: int, conv: common.ConvFactory = common.default_conv) -> None:
        super().__init__()
        ksize, stride, padding, factor = PROJECTION[scale]
        self.up_attention = CrossScaleAttention(n_feats, scale=factor)
        self.down_attention = InScaleAttention(n_feats)
        self.upsample = _prelu_after(nn.ConvTranspose2d(n_feats, n_feats, ksize, stride=stride, padding=padding))
        self.encoder = common.ResBlock(conv, n_feats, 3, act=nn.PReLU(), res_scale=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down_map = self.upsample(self.down_attention(x))
        return down_map + self.encoder(self.up_attention(x) - down_map)


class RecurrentProjection(nn.Module):
    """The self-exemplar mining cell: x (C, H, W) -> (LR features for the next pass, HR estimate (C, sH, sW)),
    by back-projection of the multi-source projection's error (twice by 2 at x4)."""

    def __init__(self, n_feats: int, scale: int, conv: common.ConvFactory = common.default_conv) -> None:
        super().__init__()
        self.scale = scale
        ksize, stride, padding, _ = PROJECTION[scale]
        # Registration order fixes the published state-dict order.
        self.multi_source_projection = MultisourceProjection(n_feats, scale, conv)
        self.down_sample_1 = _prelu_after(nn.Conv2d(n_feats, n_feats, ksize, stride=stride, padding=padding))
        if scale != 4:
            self.down_sample_2 = _prelu_after(nn.Conv2d(n_feats, n_feats, ksize, stride=stride, padding=padding))
        self.error_encode = _prelu_after(nn.ConvTranspose2d(n_feats, n_feats, ksize, stride=stride,
                                                            padding=padding))
        self.post_conv = common.BasicBlock(conv, n_feats, n_feats, 3, act=nn.PReLU())
        if scale == 4:
            k4, s4, p4 = X4_SECOND_STAGE
            self.multi_source_projection_2 = MultisourceProjection(n_feats, scale, conv)
            self.down_sample_3 = _prelu_after(nn.Conv2d(n_feats, n_feats, k4, stride=s4, padding=p4))
            self.down_sample_4 = _prelu_after(nn.Conv2d(n_feats, n_feats, k4, stride=s4, padding=p4))
            self.error_encode_2 = _prelu_after(nn.ConvTranspose2d(n_feats, n_feats, k4, stride=s4, padding=p4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_up = self.multi_source_projection(x)
        h_estimate = x_up + self.error_encode(x - self.down_sample_1(x_up))
        if self.scale == 4:
            x_up = self.multi_source_projection_2(h_estimate)
            h_estimate = x_up + self.error_encode_2(x - self.down_sample_3(x_up))
            return self.post_conv(self.down_sample_4(h_estimate)), h_estimate
        return self.post_conv(self.down_sample_2(h_estimate)), h_estimate


class CSNLN(SRNetwork):
    """sub_mean -> head (two 3x3 conv + PReLU) -> SEM applied `depth` times -> 3x3 conv over the `depth`
    HR estimates -> add_mean."""

    export_refusal = 'its attention loops over tiles of the image, which a trace would fix to one size'

    def __init__(self, scale: int = 2, n_colors: int = 3, n_feats: int = 128, depth: int = 12,
                 rgb_range: float = 1, rgb_mean: tuple[float, float, float] = CSNLN_MEAN) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f'scale must be one of {SCALES}, got {scale}')
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, depth=depth, rgb_range=rgb_range)
        conv = common.default_conv
        self.scale = scale
        self.depth = depth
        # The LR sides the network takes as they are: multiples of its first cross-scale attention's factor.
        self.size_multiple = PROJECTION[scale][3]
        # Registration order fixes the state-dict order: sub_mean, SEM, add_mean, head, tail.
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.SEM = RecurrentProjection(n_feats, scale, conv)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(
            common.BasicBlock(conv, n_colors, n_feats, 3, act=nn.PReLU()),
            common.BasicBlock(conv, n_feats, n_feats, 3, act=nn.PReLU()),
        )
        self.tail = nn.Sequential(nn.Conv2d(n_feats * depth, n_colors, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        pad_h, pad_w = -h % self.size_multiple, -w % self.size_multiple
        if pad_h or pad_w:  # sizes the published network refuses (see the module docstring)
            x = F.pad(x, (0, pad_w, 0, pad_h), mode='replicate')
        x = self.head(self.sub_mean(x))
        # tail(cat(estimates)) as a sum over the estimates: one HR feature map alive instead of 2 * depth.
        tail = self.tail[0]
        n_feats = tail.in_channels // self.depth
        out = None
        for i in range(self.depth):
            x, h_estimate = self.SEM(x)
            part = F.conv2d(h_estimate, tail.weight[:, i * n_feats:(i + 1) * n_feats], padding=1)
            out = part if out is None else out + part
        out = out + tail.bias.view(1, -1, 1, 1)
        out = self.add_mean(out)
        return out[:, :, :self.scale * h, :self.scale * w] if pad_h or pad_w else out

    def chop_rule(self, scale: int) -> ChopRule:
        """The published forward_chop: overlap 10, quarters of at least 3600 pixels split further, each
        side rounded up to the next multiple of the scale (always adding at least 1)."""
        return ChopRule(shave=CHOP_SHAVE, min_size=CHOP_MIN_SIZE, h_mult=scale, w_mult=scale)

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when the keys are not a CSNLN's: no SEM)."""
        up = state.get('SEM.multi_source_projection.upsample.0.weight')
        if up is None or up.dim() != 4:
            return {}
        cfg: dict[str, object] = {'n_feats': int(up.shape[0])}
        first = state.get('head.0.0.weight')
        if first is not None and first.dim() == 4:
            cfg['n_colors'] = int(first.shape[1])
        if 'SEM.multi_source_projection_2.upsample.0.weight' in state:
            cfg['scale'] = 4
        else:
            cfg['scale'] = {6: 2, 9: 3}.get(int(up.shape[-1]))
        tail = state.get('tail.0.weight')
        if tail is not None and tail.dim() == 4 and cfg['n_feats']:
            cfg['depth'] = int(tail.shape[1]) // int(cfg['n_feats'])
        return cfg
