"""HSPAN (Su et al., "High-Similarity-Pass Attention for Single Image Super-Resolution", IEEE TIP).

Same modules, state-dict keys and arithmetic as the published laoyangui/HSPAN code, so its released
checkpoints load strictly. `attention` swaps the attention slot of every HSPAM for the paper's ablation:
'softmax' (standard non-local attention; same keys as 'hspa') or 'none' (no attention; the other keys keep
their names). Published checkpoints are trained for 'hspa' only.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import attention as attn
from nlsr.model import common
from nlsr.model.contract import ChopRule, SRNetwork

FLAGS = ('n_resgroups', 'n_resblocks', 'n_feats', 'res_scale', 'reduction', 'topk', 'attention', 'hspa_impl',
         'hspa_block')
# The published HSPAN forward_chop: overlap 10 LR pixels, split further while a quarter has >= 120000
# pixels, quarter height/width rounded up to the next multiple of 4 / 8 (always adding at least 1).
HSPAN_CHOP = ChopRule(shave=10, min_size=120000, h_mult=4, w_mult=8)


def make_model(args: argparse.Namespace) -> SRNetwork:
    if args.attention != 'none' and args.n_feats // args.reduction < 1:
        raise ValueError(f'--reduction {args.reduction} with --n_feats {args.n_feats}: the attention embeddings '
                         f'would have n_feats // reduction = 0 channels')
    return HSPAN(
        scale=args.scale[0],
        n_colors=args.n_colors,
        n_feats=args.n_feats,
        n_resgroups=args.n_resgroups,
        n_resblocks=args.n_resblocks,
        reduction=args.reduction,
        topk=args.topk,
        res_scale=args.res_scale,
        rgb_range=args.rgb_range,
        attention=args.attention or 'hspa',  # None: the published attention
        hspa_impl=args.hspa_impl,
        hspa_block=args.hspa_block,
    )


class LEB(nn.Module):
    """Locality Exploration Block: x + conv(relu(conv(x))) (the published block ignores res_scale)."""

    def __init__(self, conv: common.ConvFactory, n_feats: int, kernel_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(n_feats, n_feats, kernel_size, bias=True),
            nn.ReLU(True),
            conv(n_feats, n_feats, kernel_size, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class HSPAM(nn.Module):
    """High-Similarity-Pass Attention Module: x + res_scale * conv(attention(LEB^n(x)))."""

    def __init__(
        self,
        conv: common.ConvFactory,
        n_feats: int,
        kernel_size: int,
        reduction: int,
        res_scale: float,
        n_resblocks: int,
        topk: int,
        attention: str = 'hspa',
        hspa_impl: str = 'auto',
        hspa_block: int = 0,
    ) -> None:
        super().__init__()
        body: list[nn.Module] = [LEB(conv, n_feats, kernel_size) for _ in range(n_resblocks)]
        if attention == 'hspa':
            body.append(attn.HSPA(channel=n_feats, reduction=reduction, res_scale=res_scale,
                                  conv=common.default_conv, topk=topk, impl=hspa_impl, block_size=hspa_block))
        elif attention == 'softmax':
            body.append(attn.NonLocalAttention(channel=n_feats, reduction=reduction, res_scale=res_scale,
                                               conv=common.default_conv))
        elif attention == 'none':
            body.append(nn.Identity())  # keeps the index of the conv after it, hence its key
        else:
            raise ValueError(f"attention must be 'hspa', 'softmax' or 'none', got {attention!r}")
        body.append(conv(n_feats, n_feats, kernel_size))
        self.body = nn.Sequential(*body)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


class HSPAN(SRNetwork):
    """sub_mean -> head conv -> n_resgroups HSPAMs + conv (global residual) -> upsampler + conv -> add_mean."""

    def __init__(
        self,
        scale: int = 4,
        n_colors: int = 3,
        n_feats: int = 192,
        n_resgroups: int = 10,
        n_resblocks: int = 4,
        reduction: int = 2,
        topk: int = 128,
        res_scale: float = 0.1,
        rgb_range: float = 1,
        attention: str = 'hspa',
        hspa_impl: str = 'auto',
        hspa_block: int = 0,
        rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN,
    ) -> None:
        super().__init__()
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resgroups=n_resgroups,
                           n_resblocks=n_resblocks, reduction=reduction, topk=topk, res_scale=res_scale,
                           rgb_range=rgb_range, attention=attention)  # hspa_impl/hspa_block: how, not what
        conv = common.default_conv
        kernel_size = 3
        # Registration order fixes the state-dict order: a, sub_mean, add_mean, head, body, tail.
        # `a` is unused by forward but part of every released checkpoint. Frozen (published: trainable but
        # never given a gradient) so that DistributedDataParallel does not wait for its gradient.
        self.a = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, kernel_size))
        body: list[nn.Module] = [
            HSPAM(conv, n_feats, kernel_size, reduction, res_scale, n_resblocks, topk,
                  attention=attention, hspa_impl=hspa_impl, hspa_block=hspa_block)
            for _ in range(n_resgroups)
        ]
        body.append(conv(n_feats, n_feats, kernel_size))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(
            common.Upsampler(conv, scale, n_feats, act=False),
            conv(n_feats, n_colors, kernel_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))

    def chop_rule(self, scale: int) -> ChopRule:
        return HSPAN_CHOP

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when the keys are not an HSPAN's: no LEB convolutions)."""
        if not common.count_indices(state, r'body\.\d+\.body\.(\d+)\.body\.0\.weight$'):
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
        cfg['n_resgroups'] = common.count_indices(state, r'body\.(\d+)\.body\.')
        cfg['n_resblocks'] = common.count_indices(state, r'body\.0\.body\.(\d+)\.body\.')
        match = [v for k, v in state.items() if k.endswith('.conv_match1.0.weight')]
        if match and cfg.get('n_feats'):
            cfg['reduction'] = int(cfg['n_feats']) // int(match[0].shape[0])
        cfg['attention'] = 'hspa/softmax' if match else 'none'
        return cfg
