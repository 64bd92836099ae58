"""NLSN (Mei et al., "Image Super-Resolution with Non-Local Sparse Attention", CVPR 2021).

Same modules, state-dict keys and arithmetic as HarukiYqM/Non-Local-Sparse-Attention (src/model/nlsn.py and
its attention.py), so its released checkpoints load strictly: EDSR's residual body with a non-local sparse
attention (model.blocks.sparse_attention) before the first residual block and after every eighth.

The attention hashes with random rotations drawn in every forward; the network declares it (random_draws)
and draws them, inside `drawing_from(generator)`, from that generator (see model.contract). Its rounds and
chunks are computed in bounded groups, so whole images evaluate without the chop. attention='hspa'
(--attention hspa) normalises the scores within each chunk by soft thresholding instead of softmax.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.blocks.sparse_attention import NonLocalSparseAttention
from nlsr.model.contract import ChopRule, SRNetwork

FLAGS = ('n_resblocks', 'n_feats', 'res_scale', 'chunk_size', 'n_hashes', 'attention')
ATTENTIONS = ('softmax', 'hspa')
REDUCTION = 4  # match embeddings have n_feats // 4 channels
ATTENTION_EVERY = 8  # an attention after every eighth residual block (and one before the first)
# The published NLSN forward_chop (HSPAN's is a copy): overlap 10 LR pixels, split further while a quarter
# has >= 120000 pixels, quarter height/width rounded up to the next multiple of 4 / 8 (adding at least 1).
NLSN_CHOP = ChopRule(shave=10, min_size=120000, h_mult=4, w_mult=8)


def make_model(args: argparse.Namespace) -> SRNetwork:
    """NLSN from the flags; --attention (None: softmax, the published model) picks the normaliser within the
    hash chunks: softmax or hspa (soft thresholding of the same scores)."""
    if args.n_feats < REDUCTION or args.n_feats % REDUCTION:
        raise ValueError(f'--n_feats {args.n_feats}: NLSN needs a positive multiple of {REDUCTION} (its attention '
                         f'matches on n_feats / {REDUCTION} channels)')
    if args.chunk_size < 1:
        raise ValueError(f'--chunk_size {args.chunk_size}: must be at least 1')
    if args.n_hashes < 1:
        raise ValueError(f'--n_hashes {args.n_hashes}: must be at least 1')
    attention = args.attention or 'softmax'
    if attention not in ATTENTIONS:
        raise ValueError(f'--attention {attention}: NLSN supports softmax (published) or hspa (soft thresholding '
                         'within its hash chunks)')
    return NLSN(scale=args.scale[0], n_colors=args.n_colors, n_feats=args.n_feats, n_resblocks=args.n_resblocks,
                res_scale=args.res_scale, chunk_size=args.chunk_size, n_hashes=args.n_hashes,
                rgb_range=args.rgb_range, attention=attention)


class NLSN(SRNetwork):
    """sub_mean -> head conv -> [attention, (8 residual blocks, attention) ...] + conv (global residual) ->
    upsampler + conv -> add_mean."""

    random_draws = True
    export_refusal = 'its hash rotations are random draws and its chunks follow the image size'

    def __init__(self, scale: int = 2, n_colors: int = 3, n_feats: int = 256, n_resblocks: int = 32,
                 res_scale: float = 0.1, chunk_size: int = 144, n_hashes: int = 4, rgb_range: float = 1,
                 attention: str = 'softmax') -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'softmax' or 'hspa', got {attention!r}")
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resblocks=n_resblocks,
                           res_scale=res_scale, chunk_size=chunk_size, n_hashes=n_hashes, rgb_range=rgb_range,
                           attention=attention)
        conv = common.default_conv
        normalizer = 'softmax' if attention == 'softmax' else 'soft_threshold'

        def sparse_attention() -> NonLocalSparseAttention:
            return NonLocalSparseAttention(channels=n_feats, n_hashes=n_hashes, chunk_size=chunk_size,
                                           reduction=REDUCTION, res_scale=res_scale, normalizer=normalizer)

        # Registration order fixes the state-dict order: sub_mean, add_mean, head, body, tail.
        self.sub_mean = common.MeanShift(rgb_range, common.DIV2K_MEAN, sign=-1, n_colors=n_colors)
        self.add_mean = common.MeanShift(rgb_range, common.DIV2K_MEAN, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        body: list[nn.Module] = [sparse_attention()]
        act = nn.ReLU(True)
        for i in range(n_resblocks):
            body.append(common.ResBlock(conv, n_feats, 3, act=act, res_scale=res_scale))
            if (i + 1) % ATTENTION_EVERY == 0:
                body.append(sparse_attention())
        body.append(conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(common.Upsampler(conv, scale, n_feats, act=False), conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))

    @contextlib.contextmanager
    def drawing_from(self, generator: torch.Generator | None) -> Iterator[None]:
        """Within the block, every attention draws its rotations from `generator`, in forward order."""
        blocks = [m for m in self.modules() if isinstance(m, NonLocalSparseAttention)]
        before = [m.generator for m in blocks]
        for m in blocks:
            m.generator = generator
        try:
            yield
        finally:
            for m, g in zip(blocks, before, strict=True):
                m.generator = g

    def chop_rule(self, scale: int) -> ChopRule:
        return NLSN_CHOP

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell ({} when
        the keys are not an NLSN's: no sparse attention at body.0); chunk_size and n_hashes hold no weights."""
        if 'body.0.conv_match.0.weight' not in state:
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
        cfg['n_resblocks'] = common.count_indices(state, r'body\.(\d+)\.body\.0\.weight$')
        return cfg
