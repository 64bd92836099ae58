"""RCAN (Zhang et al., "Image Super-Resolution Using Very Deep Residual Channel Attention Networks", ECCV 2018).

The modules, state-dict keys and arithmetic of the published yulunzhang/RCAN code
(RCAN_TestCode/code/model/rcan.py), so the released RCAN_BIX{2,3,4,8}.pt load strictly. The copy in
laoyangui/HSPAN adds a parameter `a` that its forward never reads: checkpoints trained there carry it and
load too (unused_keys), without the network holding a dead weight.

Published configuration (template RCAN): 10 residual groups of 20 blocks, 64 features, reduction 16,
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
# The forward_chop of yulunzhang/RCAN is EDSR-PyTorch's: overlap 10, min_size 160000.
RCAN_CHOP = EDSR_CHOP
# Entries of published checkpoints that RCAN does not hold: HSPAN's copy registers `a` and never uses it.
RCAN_UNUSED = frozenset({'a'})


def make_model(args: argparse.Namespace) -> SRNetwork:
    return RCAN(scale=args.scale[0], n_colors=args.n_colors, n_feats=args.n_feats, n_resgroups=args.n_resgroups,
                n_resblocks=args.n_resblocks, reduction=args.reduction, rgb_range=args.rgb_range)


class RCAN(SRNetwork):
    """sub_mean -> head conv -> n_resgroups residual groups + conv (global residual) -> upsampler + conv ->
    add_mean."""

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
        # Registration order fixes the state-dict order: sub_mean, add_mean, head, body, tail.
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        self.body = residual_groups(n_feats, n_resgroups, n_resblocks, reduction)
        self.tail = nn.Sequential(common.Upsampler(conv, scale, n_feats, act=False), conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))

    def chop_rule(self, scale: int) -> ChopRule:
        return RCAN_CHOP

    def unused_keys(self) -> frozenset[str]:
        return RCAN_UNUSED

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell ({} when
        the keys are not an RCAN's: no residual channel attention blocks, or HAN's layer attention)."""
        if 'la.gamma' in state:
            return {}
        return infer_residual_groups(state)
