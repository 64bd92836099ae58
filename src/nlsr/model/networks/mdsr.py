"""MDSR (Lim et al. 2017, the multi-scale model of EDSR): one network for every --scale it was built with.

Same modules, state-dict keys and arithmetic as the copy in laoyangui/HSPAN (src/model/mdsr.py), so its
checkpoints load strictly. Each scale has its own pre-processing (two 5x5 residual blocks) and upsampler;
the head, body and tail are shared. The released MDSR weights are built with --scale 2+3+4 (branch i serves
the i-th scale, in that order), --n_resblocks 80, --n_feats 64 and expect --rgb_range 255.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.contract import ChopRule, SRNetwork
from nlsr.model.networks.hspan import HSPAN_CHOP

FLAGS = ('n_resblocks', 'n_feats')
PRE_KERNEL = 5  # the per-scale residual blocks


def make_model(args: argparse.Namespace) -> SRNetwork:
    for s in args.scale:
        if s != 3 and s & (s - 1):
            raise ValueError(f'--scale {s}: MDSR upsamples by powers of 2 or by 3')
    return MDSR(scales=args.scale, n_colors=args.n_colors, n_feats=args.n_feats, n_resblocks=args.n_resblocks,
                rgb_range=args.rgb_range)


class MDSR(SRNetwork):
    """sub_mean -> head conv -> pre_process[i] -> n_resblocks ResBlocks + conv (global residual) ->
    upsample[i] -> tail conv -> add_mean, for the scale index i chosen by set_scale."""

    multi_scale = True
    export_refusal = 'one model serves several scales, an ONNX graph one'

    def __init__(self, scales: Sequence[int] = (2, 3, 4), n_colors: int = 3, n_feats: int = 64,
                 n_resblocks: int = 80, rgb_range: float = 255,
                 rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN) -> None:
        super().__init__()
        scales = [int(s) for s in scales]
        # 'scale' is the list: the branches (and so the weights) depend on every scale and their order
        self.config = dict(scale=scales, n_colors=n_colors, n_feats=n_feats, n_resblocks=n_resblocks,
                           rgb_range=rgb_range)
        self.scale_idx = 0
        conv = common.default_conv
        act = nn.ReLU(True)
        # Registration order fixes the state-dict order: sub_mean, pre_process, upsample, add_mean, head,
        # body, tail (as published).
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.pre_process = nn.ModuleList([
            nn.Sequential(common.ResBlock(conv, n_feats, PRE_KERNEL, act=act),
                          common.ResBlock(conv, n_feats, PRE_KERNEL, act=act))
            for _ in scales
        ])
        self.upsample = nn.ModuleList([common.Upsampler(conv, s, n_feats, act=False) for s in scales])
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        body: list[nn.Module] = [common.ResBlock(conv, n_feats, 3, act=act) for _ in range(n_resblocks)]
        body.append(conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(conv(n_feats, n_colors, 3))

    def set_scale(self, idx_scale: int) -> None:
        if not 0 <= idx_scale < len(self.upsample):
            raise IndexError(f'MDSR: scale index {idx_scale} out of range for its scales {self.config["scale"]}')
        self.scale_idx = idx_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = self.pre_process[self.scale_idx](x)
        res = self.body(x) + x
        return self.add_mean(self.tail(self.upsample[self.scale_idx](res)))

    def chop_rule(self, scale: int) -> ChopRule:
        return HSPAN_CHOP  # the forward_chop of laoyangui/HSPAN, shared by all its models

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when it has no per-scale upsamplers); 'scale' as '2+3+4' (None where a branch cannot be told)."""
        n_branches = common.count_indices(state, r'upsample\.(\d+)\.')
        if not n_branches:
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        n_feats = int(cfg.get('n_feats', 0))
        scales = [common.infer_scale(state, n_feats, prefix=f'upsample.{i}.') for i in range(n_branches)]
        cfg['scale'] = '+'.join(str(s) for s in scales)
        cfg['n_resblocks'] = common.count_indices(state, r'body\.(\d+)\.body\.')
        return cfg

