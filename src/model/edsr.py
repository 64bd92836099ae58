"""EDSR (Lim et al. 2017) as a familiar reference model, with the published EDSR-PyTorch state-dict keys.

Configurations (see template.py): baseline n_resblocks 16, n_feats 64, res_scale 1; paper n_resblocks 32,
n_feats 256, res_scale 0.1. EDSR's released weights expect --rgb_range 255.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

import torch
from torch import nn

from model import common
from model.contract import SRNetwork

FLAGS = ('n_resblocks', 'n_feats', 'res_scale')


def make_model(args: argparse.Namespace) -> SRNetwork:
    return EDSR(
        scale=args.scale[0],
        n_colors=args.n_colors,
        n_feats=args.n_feats,
        n_resblocks=args.n_resblocks,
        res_scale=args.res_scale,
        rgb_range=args.rgb_range,
    )


class EDSR(SRNetwork):
    """sub_mean -> conv -> n_resblocks ResBlocks + conv (global residual) -> upsampler + conv -> add_mean."""

    def __init__(
        self,
        scale: int = 2,
        n_colors: int = 3,
        n_feats: int = 64,
        n_resblocks: int = 16,
        res_scale: float = 1,
        rgb_range: float = 255,
        rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN,
    ) -> None:
        super().__init__()
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resblocks=n_resblocks,
                           res_scale=res_scale, rgb_range=rgb_range)
        conv = common.default_conv
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        body: list[nn.Module] = [
            common.ResBlock(conv, n_feats, 3, act=nn.ReLU(True), res_scale=res_scale) for _ in range(n_resblocks)
        ]
        body.append(conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(
            common.Upsampler(conv, scale, n_feats, act=False),
            nn.Conv2d(n_feats, n_colors, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when the keys are not an EDSR's: residual blocks nested deeper or with other names)."""
        if any(re.match(r'body\.\d+\.body\.\d+\.(body|branch|conv_match)', k) for k in state):
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
        cfg['n_resblocks'] = common.count_indices(state, r'body\.(\d+)\.body\.')
        return cfg
