"""EDSR (Lim et al. 2017) as a familiar reference model, with the published EDSR-PyTorch state-dict keys.

Configurations (see template.py): baseline n_resblocks 16, n_feats 64, res_scale 1; paper n_resblocks 32,
n_feats 256, res_scale 0.1. EDSR's released weights expect --rgb_range 255.

`attention` adds a non-local attention (HSPA, or softmax non-local attention) after every `attention_every`
residual blocks, under the keys attention.<i>.*; 'none' (the default) is the published network with its
published keys.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import attention as attn
from nlsr.model import common
from nlsr.model.contract import SRNetwork

ATTENTION_FLAGS = ('attention_every', 'reduction', 'topk', 'hspa_impl', 'hspa_block')  # read only with an attention
FLAGS = ('n_resblocks', 'n_feats', 'res_scale', 'attention', *ATTENTION_FLAGS)
ATTENTIONS = ('none', 'hspa', 'softmax')
ATTENTION_EVERY = 8  # default residual blocks per attention


def make_model(args: argparse.Namespace) -> SRNetwork:
    """EDSR from the flags; --attention (None: none, the published network) hspa|softmax adds an attention
    after every --attention_every residual blocks (None: 8)."""
    attention = args.attention or 'none'
    every = args.attention_every
    if attention == 'none':
        unused = [f for f in ATTENTION_FLAGS if f in args.cli_flags]
        if unused:
            raise ValueError(f'--{unused[0]} {getattr(args, unused[0])} is not used by --model EDSR without '
                             '--attention hspa or softmax')
    every = ATTENTION_EVERY if every is None else every
    if attention != 'none' and not 1 <= every <= args.n_resblocks:
        raise ValueError(f'--attention_every {every}: expected 1 to --n_resblocks ({args.n_resblocks})')
    return EDSR(
        scale=args.scale[0],
        n_colors=args.n_colors,
        n_feats=args.n_feats,
        n_resblocks=args.n_resblocks,
        res_scale=args.res_scale,
        rgb_range=args.rgb_range,
        attention=attention,
        attention_every=every,
        reduction=args.reduction,
        topk=args.topk,
        hspa_impl=args.hspa_impl,
        hspa_block=args.hspa_block,
    )


class EDSR(SRNetwork):
    """sub_mean -> conv -> n_resblocks ResBlocks + conv (global residual) -> upsampler + conv -> add_mean.

    With attention 'hspa' or 'softmax', attention.<i> (HSPA, or NonLocalAttention; embeddings reduced by
    `reduction`, residual scaled by res_scale) follows residual block (i + 1) * attention_every; topk,
    hspa_impl (None: HSPA's default) and hspa_block are HSPA's topk, impl and block_size.
    """

    def __init__(
        self,
        scale: int = 2,
        n_colors: int = 3,
        n_feats: int = 64,
        n_resblocks: int = 16,
        res_scale: float = 1,
        rgb_range: float = 255,
        rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN,
        attention: str = 'none',
        attention_every: int = ATTENTION_EVERY,
        reduction: int = 2,
        topk: int = 128,
        hspa_impl: str | None = None,
        hspa_block: int = 0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'none', 'hspa' or 'softmax', got {attention!r}")
        if attention != 'none' and not 1 <= attention_every <= n_resblocks:
            raise ValueError(f'attention_every must be 1 to n_resblocks ({n_resblocks}), got {attention_every}')
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resblocks=n_resblocks,
                           res_scale=res_scale, rgb_range=rgb_range, attention=attention)
        if attention != 'none':
            self.config.update(attention_every=attention_every, reduction=reduction)
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
        self.attention_every = attention_every
        self.attention: nn.ModuleList | None = None
        if attention != 'none':  # registered last: the published keys keep their names and order
            impl = {} if hspa_impl is None else {'impl': hspa_impl}

            def make() -> nn.Module:
                if attention == 'hspa':
                    return attn.HSPA(n_feats, reduction, res_scale, conv, topk=topk, block_size=hspa_block, **impl)
                return attn.NonLocalAttention(n_feats, reduction, res_scale, conv)
            self.attention = nn.ModuleList([make() for _ in range(n_resblocks // attention_every)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        if self.attention is None:
            res = self.body(x) + x
        else:
            res = x
            for i, block in enumerate(self.body[:-1]):
                res = block(res)
                if (i + 1) % self.attention_every == 0:
                    res = self.attention[(i + 1) // self.attention_every - 1](res)
            res = self.body[-1](res) + x
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
        cfg['attention'] = 'hspa/softmax' if any(k.startswith('attention.') for k in state) else 'none'
        return cfg
