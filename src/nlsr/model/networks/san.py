"""SAN (Dai et al., "Second-order Attention Network for Single Image Super-Resolution", CVPR 2019).

Same modules, state-dict keys and arithmetic as the published daitao/SAN code (TestCode/code/model/san.py with
its MPNCOV layers), so its released checkpoints (SAN_BIX2/3/4/8.pt, --rgb_range 255, tested with --chop) load
strictly. Entries of those checkpoints that the published forward never reads are not built; `unused_keys`
names them. Second-order channel attention and the region non-local blocks run in memory linear in the image
(model/blocks/second_order.py), so a whole image evaluates without --chop.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.blocks.second_order import RegionNonLocal, SecondOrderChannelAttention
from nlsr.model.contract import EDSR_CHOP, ChopRule, SRNetwork

FLAGS = ('n_resgroups', 'n_resblocks', 'n_feats', 'reduction')
# The published region non-local block: embeddings of n_feats // 8 channels.
NON_LOCAL_REDUCTION = 8


def make_model(args: argparse.Namespace) -> SRNetwork:
    """SAN from --n_resgroups --n_resblocks --n_feats --reduction --scale --rgb_range --n_colors."""
    if args.n_feats < NON_LOCAL_REDUCTION:
        raise ValueError(f'--n_feats {args.n_feats}: SAN needs at least {NON_LOCAL_REDUCTION} (its non-local '
                         f'embeddings have n_feats // {NON_LOCAL_REDUCTION} channels)')
    if args.n_feats // args.reduction < 1:
        raise ValueError(f'--reduction {args.reduction} with --n_feats {args.n_feats}: the channel attention '
                         'would have n_feats // reduction = 0 channels')
    return SAN(scale=args.scale[0], n_colors=args.n_colors, n_feats=args.n_feats, n_resgroups=args.n_resgroups,
               n_resblocks=args.n_resblocks, reduction=args.reduction, rgb_range=args.rgb_range)


class RB(nn.Module):
    """Residual block: x + conv(relu(conv(x))) (keys conv_first.0.*, conv_first.2.*)."""

    def __init__(self, conv: common.ConvFactory, n_feats: int, kernel_size: int) -> None:
        super().__init__()
        self.conv_first = nn.Sequential(
            conv(n_feats, n_feats, kernel_size, bias=True),
            nn.ReLU(inplace=True),
            conv(n_feats, n_feats, kernel_size, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_first(x) + x


class LSRAG(nn.Module):
    """Local-source residual attention group: x + conv_last(SOCA(RB^n(x))). (The published group also holds
    a parameter `gamma` that its forward never reads: SAN.unused_keys names it.)"""

    def __init__(self, conv: common.ConvFactory, n_feats: int, kernel_size: int, reduction: int,
                 n_resblocks: int) -> None:
        super().__init__()
        self.rcab = nn.ModuleList([RB(conv, n_feats, kernel_size) for _ in range(n_resblocks)])
        self.soca = SecondOrderChannelAttention(n_feats, reduction=reduction)
        self.conv_last = conv(n_feats, n_feats, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for block in self.rcab:
            x = block(x)
        return self.conv_last(self.soca(x)) + residual


class SAN(SRNetwork):
    """sub_mean -> head conv -> region non-local -> n_resgroups LSRAGs, each output plus gamma times the
    non-local output (share-source skip) -> the same region non-local -> + head output -> upsampler + conv
    -> add_mean."""

    export_refusal = 'its region split and covariance crop follow the image size, which a trace would fix'

    def __init__(
        self,
        scale: int = 2,
        n_colors: int = 3,
        n_feats: int = 64,
        n_resgroups: int = 20,
        n_resblocks: int = 10,
        reduction: int = 16,
        rgb_range: float = 255,
        rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN,
    ) -> None:
        super().__init__()
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resgroups=n_resgroups,
                           n_resblocks=n_resblocks, reduction=reduction, rgb_range=rgb_range)
        conv = common.default_conv
        kernel_size = 3
        # Registration order fixes the state-dict order: gamma, sub_mean, RG, add_mean, non_local, head, tail
        # (the published conv_last, between RG and add_mean, is never used and not built).
        self.gamma = nn.Parameter(torch.zeros(1))
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.RG = nn.ModuleList([LSRAG(conv, n_feats, kernel_size, reduction, n_resblocks)
                                 for _ in range(n_resgroups)])
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.non_local = RegionNonLocal(in_feat=n_feats, inter_feat=n_feats // NON_LOCAL_REDUCTION)
        self.head = nn.Sequential(conv(n_colors, n_feats, kernel_size))
        self.tail = nn.Sequential(
            common.Upsampler(conv, scale, n_feats, act=False),
            conv(n_feats, n_colors, kernel_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        shared = self.non_local(x)
        y = shared
        for group in self.RG:
            y = group(y) + self.gamma * shared
        res = self.non_local(y) + x
        return self.add_mean(self.tail(res))

    def chop_rule(self, scale: int) -> ChopRule:
        """The published SAN forward_chop is EDSR's: overlap 10 LR pixels, quarters split further while
        they have at least 160000 pixels, no rounding."""
        return EDSR_CHOP

    def unused_keys(self) -> frozenset[str]:
        """The published checkpoint entries the published forward never reads: SAN.conv_last, every
        LSRAG's gamma, and the SOCA inside the region non-local module (conv_du.0 and conv_du.2)."""
        keys = {'conv_last.weight', 'conv_last.bias'}
        keys.update(f'RG.{i}.gamma' for i in range(len(self.RG)))
        keys.update(f'non_local.soca.conv_du.{j}.{p}' for j in (0, 2) for p in ('weight', 'bias'))
        return frozenset(keys)

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when the keys are not a SAN's: no RG.<i>.soca)."""
        if not common.count_indices(state, r'RG\.(\d+)\.soca\.conv_du\.0\.weight$'):
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
        cfg['n_resgroups'] = common.count_indices(state, r'RG\.(\d+)\.soca\.conv_du\.0\.weight$')
        cfg['n_resblocks'] = common.count_indices(state, r'RG\.0\.rcab\.(\d+)\.')
        squeeze = state.get('RG.0.soca.conv_du.0.weight')
        if squeeze is not None and cfg.get('n_feats') and squeeze.shape[0]:
            cfg['reduction'] = int(cfg['n_feats']) // int(squeeze.shape[0])
        return cfg
