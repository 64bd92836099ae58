"""PA-EDSR (Mei et al. 2020, "Pyramid Attention Networks for Image Restoration"): EDSR with one pyramid
attention in the middle of its residual blocks.

Same modules, state-dict keys and arithmetic as SHI-Labs/Pyramid-Attention-Networks (SR/code/model/
paedsr.py, attention.py, common.py). Published configuration: n_resblocks 32, n_feats 256, res_scale 0.1,
rgb_range 1, scales 2, 3, 4 (one network each). What the published weights depend on:

- the attention is registered twice (as `msa` and inside `body`), so the released state dicts hold it
  twice: this network holds it once, in `body`, and names the `msa.*` copy in unused_keys();
- the published code writes the attention's width as 256, which is n_feats in every published
  configuration: here it is n_feats (the published code fails with any other width);
- its upsampler passes `bias` into the stride slot of the conv helper (stride=(True, True), which torch 2
  rejects): that means stride 1, with a bias, which is what common.Upsampler builds;
- the pyramid's interpolation factors and sampling grid: model.blocks.pyramid.

The attention runs over tiles of query positions, so whole images evaluate without the chop in bounded
memory. attention='hspa' (--attention hspa) normalises its scores by soft thresholding instead of the
published softmax.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.blocks.pyramid import REDUCTION, PyramidAttention
from nlsr.model.contract import ChopRule, SRNetwork

FLAGS = ('n_resblocks', 'n_feats', 'res_scale', 'attention', 'topk', 'hspa_block')
ATTENTIONS = {'softmax': 'softmax', 'hspa': 'soft_threshold'}  # --attention -> PyramidAttention normalizer


def make_model(args: argparse.Namespace) -> SRNetwork:
    """PA-EDSR from the flags; --attention (None: softmax, the published network) softmax or hspa (soft
    thresholding of the same scores, its search starting from --topk); --hspa_block: query positions per
    tile of the attention (0: automatic)."""
    if args.n_resblocks % 2:
        raise ValueError(f'--n_resblocks {args.n_resblocks}: PAEDSR needs an even number (half before its '
                         'attention, half after; the published code silently drops one)')
    if args.n_feats < REDUCTION:
        raise ValueError(f'--n_feats {args.n_feats}: PAEDSR needs at least {REDUCTION} (its attention reduces '
                         f'the features {REDUCTION}-fold)')
    attention = args.attention or 'softmax'
    if attention not in ATTENTIONS:
        raise ValueError(f'--attention {attention}: PAEDSR supports softmax (published) or hspa (soft '
                         'thresholding inside its pyramid attention)')
    return PAEDSR(
        scale=args.scale[0],
        n_colors=args.n_colors,
        n_feats=args.n_feats,
        n_resblocks=args.n_resblocks,
        res_scale=args.res_scale,
        rgb_range=args.rgb_range,
        attention=attention,
        topk=args.topk,
        block_size=args.hspa_block,
    )


class PAEDSR(SRNetwork):
    """sub_mean -> conv -> n_resblocks / 2 ResBlocks, PyramidAttention, n_resblocks / 2 ResBlocks, conv
    (global residual) -> upsampler + conv -> add_mean.

    attention 'softmax' is the published network; 'hspa' normalises the pyramid attention's scores by soft
    thresholding (exact sparsemax; `topk` sets where its threshold search starts), with the same keys.
    block_size: query positions per tile of the attention (0: from a memory budget).
    """

    export_refusal = 'its attention loops over tiles of the image, which a trace would fix to one size'

    def __init__(
        self,
        scale: int = 2,
        n_colors: int = 3,
        n_feats: int = 256,
        n_resblocks: int = 32,
        res_scale: float = 0.1,
        rgb_range: float = 1,
        rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN,
        attention: str = 'softmax',
        topk: int = 128,
        block_size: int = 0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'softmax' or 'hspa', got {attention!r}")
        if n_resblocks % 2:
            raise ValueError(f'n_resblocks must be even, got {n_resblocks}')
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resblocks=n_resblocks,
                           res_scale=res_scale, rgb_range=rgb_range, attention=attention)
        conv = common.default_conv
        half = n_resblocks // 2
        self.attention_index = half
        # Registration order fixes the state-dict order (the published one without `msa`):
        # sub_mean, add_mean, head, body, tail.
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        act = nn.ReLU(True)

        def blocks() -> list[nn.Module]:
            return [common.ResBlock(conv, n_feats, 3, act=act, res_scale=res_scale) for _ in range(half)]

        attend = PyramidAttention(n_feats, REDUCTION, res_scale, normalizer=ATTENTIONS[attention], topk=topk,
                                  block_size=block_size)
        self.body = nn.Sequential(*blocks(), attend, *blocks(), conv(n_feats, n_feats, 3))
        self.tail = nn.Sequential(
            common.Upsampler(conv, scale, n_feats, act=False),
            nn.Conv2d(n_feats, n_colors, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        return self.add_mean(self.tail(self.body(x) + x))

    def chop_rule(self, scale: int) -> ChopRule:
        """The published PA-EDSR forward_chop: min_size 6400, each quarter's size grown by its remainder
        modulo the scale (h_size += h_size % scale)."""
        return ChopRule(shave=10, min_size=6400, h_mult=scale, w_mult=scale, add_remainder=True)

    def unused_keys(self) -> frozenset[str]:
        """The published state dicts' second copy of the attention (`msa.*`, equal to body.<n/2>.*)."""
        return frozenset(f'msa.{k}' for k in self.body[self.attention_index].state_dict())

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when the keys are not a PA-EDSR's: no pyramid attention in the body)."""
        if not common.count_indices(state, r'body\.(\d+)\.conv_match_L_base\.'):
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
        cfg['n_resblocks'] = common.count_indices(state, r'body\.(\d+)\.body\.')
        return cfg
