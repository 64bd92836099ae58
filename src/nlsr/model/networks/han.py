"""HAN (Niu et al., "Single Image Super-Resolution via a Holistic Attention Network", ECCV 2020).

The modules, state-dict keys and arithmetic of the published wwlCape/HAN code (src/model/han.py), so its
released checkpoints load strictly: RCAN's residual groups, then a layer attention over the outputs of
every body module (keys la.*, last_conv.*) beside a channel-spatial attention (a 3-D convolution, csa.*)
on the last one, fused by a convolution (last.*).

The published last_conv takes 11 feature maps (n_resgroups 10 plus the body's last convolution) whatever
n_resgroups is, so only n_resgroups 10 runs there; here it takes n_resgroups + 1, the same at 10.

Published configuration (template HAN): 10 residual groups of 20 blocks, 64 features, reduction 16,
--rgb_range 255, --chop with EDSR's forward_chop (overlap 10, min_size 160000).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.blocks.rcab import infer_residual_groups, residual_groups
from nlsr.model.contract import EDSR_CHOP, ChopRule, SRNetwork

FLAGS = ('n_resgroups', 'n_resblocks', 'n_feats', 'reduction')
# The forward_chop of wwlCape/HAN is EDSR-PyTorch's: overlap 10, min_size 160000.
HAN_CHOP = EDSR_CHOP


def make_model(args: argparse.Namespace) -> SRNetwork:
    return HAN(scale=args.scale[0], n_colors=args.n_colors, n_feats=args.n_feats, n_resgroups=args.n_resgroups,
               n_resblocks=args.n_resblocks, reduction=args.reduction, rgb_range=args.rgb_range)


class LayerAttention(nn.Module):
    """Layer attention (published LAM_Module): N stacked feature maps (B, N, C, H, W) attend to each other
    with weights softmax(max(E) - E), E the (N, N) inner products of the flattened maps; returns
    gamma * attended + x, reshaped to (B, N * C, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c, h, w = x.shape
        flat = x.view(b, n, -1)
        energy = torch.bmm(flat, flat.permute(0, 2, 1))
        energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        out = torch.bmm(torch.softmax(energy, dim=-1), flat).view(b, n, c, h, w)
        return (self.gamma * out + x).view(b, -1, h, w)


class ChannelSpatialAttention(nn.Module):
    """Channel-spatial attention (published CSAM_Module): x + x * gamma * sigmoid(conv3d(x)), the 3x3x3
    convolution running over (channel, height, width) of the map as one 3-D volume."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.conv = nn.Conv3d(1, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight = (self.gamma * torch.sigmoid(self.conv(x.unsqueeze(1)))).view(b, -1, h, w)
        return x * weight + x


class HAN(SRNetwork):
    """sub_mean -> head conv -> residual groups + conv; last(cat(csa(last body output), last_conv(la(every
    body output, newest first)))) + head output -> upsampler + conv -> add_mean."""

    def __init__(
        self,
        scale: int = 4,
        n_colors: int = 3,
        n_feats: int = 64,
        n_resgroups: int = 10,
        n_resblocks: int = 20,
        reduction: int = 16,
        rgb_range: float = 255,
        rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN,
    ) -> None:
        super().__init__()
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resgroups=n_resgroups,
                           n_resblocks=n_resblocks, reduction=reduction, rgb_range=rgb_range)
        conv = common.default_conv
        # Registration order fixes the state-dict order: sub_mean, add_mean, head, body, csa, la,
        # last_conv, last, tail.
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        self.body = residual_groups(n_feats, n_resgroups, n_resblocks, reduction)
        self.csa = ChannelSpatialAttention()
        self.la = LayerAttention()
        self.last_conv = nn.Conv2d(n_feats * (n_resgroups + 1), n_feats, 3, 1, 1)
        self.last = nn.Conv2d(n_feats * 2, n_feats, 3, 1, 1)
        self.tail = nn.Sequential(common.Upsampler(conv, scale, n_feats, act=False), conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        res = x
        layers = []
        for module in self.body:
            res = module(res)
            layers.append(res.unsqueeze(1))
        # the published code prepends each output: the stack runs from the body's last output to its first
        layered = self.last_conv(self.la(torch.cat(layers[::-1], 1)))
        res = self.last(torch.cat([self.csa(res), layered], 1)) + x
        return self.add_mean(self.tail(res))

    def chop_rule(self, scale: int) -> ChopRule:
        return HAN_CHOP

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell ({} when
        the keys are not a HAN's: no layer attention or no residual channel attention blocks)."""
        if 'la.gamma' not in state:
            return {}
        return infer_residual_groups(state)
