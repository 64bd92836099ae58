"""MSNLAN (multi-scale non-local attention network; the published code calls it MSDSN/MSDN).

Same modules, state-dict keys and arithmetic as kbzhang0505/MSNLAN (model/msdsn.py, model/common.py):
residual multi-branch attention blocks (RMAB) in residual groups, one multi-scale non-local attention block
(MSNLAB) in the middle, and dense skip fusions. The x3 upsampler uses groups=1, which is what the
published x3 weights mean (the published helper passes `bias` into the groups slot).

On large maps the MSNLAB's attention runs over tiles of query positions (model.cross_scale): the same
outputs in bounded memory, so whole benchmark images evaluate without the chop. attention='hspa'
(--attention hspa) normalises its scores by soft thresholding instead of the published softmax.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.model import common
from nlsr.model.attention import check_normalizer
from nlsr.model.blocks.cross_scale import cross_scale_attention
from nlsr.model.contract import ChopRule, SRNetwork, exporting
from nlsr.model.hspa import soft_threshold
from nlsr.model.hspa.dispatch import ALIASES, CROSS_SCALE_IMPLS, canonical_impl, plan_cross_scale
from nlsr.model.hspa.export import TOPK, sparsemax_graph

MSNLAN_MEAN = (0.4025, 0.4482, 0.4264)
FLAGS = ('n_resgroups', 'n_resblocks', 'n_feats', 'res_scale', 'attention', 'topk', 'hspa_impl', 'hspa_block')
CCA_REDUCTION = 16  # channel reduction of the contrast channel attention in every RMAB
ATTENTIONS = ('softmax', 'hspa')


def make_model(args: argparse.Namespace) -> SRNetwork:
    """MSNLAN from the flags; --attention (None: softmax, the published model) picks the normaliser of
    the multi-scale attention: softmax or hspa (soft thresholding of the same scores); --hspa_impl and
    --hspa_block choose how its attention is computed (model.hspa.dispatch.plan_cross_scale, block_size)."""
    if args.n_resgroups < 2 or args.n_resgroups % 2:
        raise ValueError(f'--n_resgroups {args.n_resgroups}: MSNLAN needs an even number of groups, at least 2 '
                         '(half before its attention block, half after)')
    if args.n_feats < CCA_REDUCTION:
        raise ValueError(f'--n_feats {args.n_feats}: MSNLAN needs at least {CCA_REDUCTION} (its channel '
                         f'attention reduces the features {CCA_REDUCTION}-fold)')
    attention = args.attention or 'softmax'
    if attention not in ATTENTIONS:
        raise ValueError(f'--attention {attention}: MSNLAN supports softmax (published) or hspa (soft '
                         'thresholding inside its multi-scale attention)')
    if ALIASES.get(args.hspa_impl, args.hspa_impl) not in CROSS_SCALE_IMPLS:
        raise ValueError(f'--hspa_impl {args.hspa_impl}: MSNLAN computes its attention with '
                         f'{", ".join(CROSS_SCALE_IMPLS)} (no Triton kernel)')
    return MSNLAN(
        scale=args.scale[0],
        n_colors=args.n_colors,
        n_feats=args.n_feats,
        n_resgroups=args.n_resgroups,
        n_resblocks=args.n_resblocks,
        res_scale=args.res_scale,
        rgb_range=args.rgb_range,
        attention=attention,
        topk=args.topk,
        msnlab_impl=args.hspa_impl,
        msnlab_block=args.hspa_block,
    )


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.sum(3, keepdim=True).sum(2, keepdim=True) / (x.size(2) * x.size(3))


def _contrast(x: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviation over space (the 'contrast' of IMDN's CCA layer)."""
    return _spatial_mean((x - _spatial_mean(x)).pow(2)).pow(0.5)


class ChannelAttention(nn.Module):
    """Squeeze-excitation channel attention; contrast=True adds the spatial std to the average (CCA)."""

    def __init__(self, channel: int, reduction: int = 16, contrast: bool = False) -> None:
        super().__init__()
        self.contrast = contrast
        self.conv_du = common.squeeze_excitation(channel, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(x, 1)
        if self.contrast:
            y = _contrast(x) + y
        return x * self.conv_du(y)


class RMAB(nn.Module):
    """Residual multi-branch attention block: three serial 3x3 conv+GELU, concatenated, 1x1 fusion, CCA."""

    def __init__(self, conv: common.ConvFactory, n_feats: int) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(conv(n_feats, n_feats, 3), nn.GELU())
        self.branch2 = nn.Sequential(conv(n_feats, n_feats, 3), nn.GELU())
        self.branch3 = nn.Sequential(conv(n_feats, n_feats, 3), nn.GELU())
        self.fusion = conv(n_feats * 3, n_feats, 1)
        self.CCA = ChannelAttention(n_feats, reduction=CCA_REDUCTION, contrast=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch1(x)
        x2 = self.branch2(x1)
        x3 = self.branch3(x2)
        return x + self.CCA(self.fusion(torch.cat([x1, x2, x3], dim=1)))


class ResidualGroup(nn.Module):
    """n RMABs and a 3x3 conv, with a skip connection."""

    def __init__(self, conv: common.ConvFactory, n_feats: int, n_resblocks: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*[RMAB(conv, n_feats) for _ in range(n_resblocks)], conv(n_feats, n_feats, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def _same_pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero padding that keeps the size for a stride-1 k x k window (TensorFlow 'SAME')."""
    top = (k - 1) // 2
    return F.pad(x, (top, k - 1 - top, top, k - 1 - top))


def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """All k x k patches of x (N, C, H, W) around each position: (N, H*W, C, k, k)."""
    n, c = x.shape[:2]
    cols = F.unfold(_same_pad(x, k), kernel_size=k)  # (N, C*k*k, L)
    return cols.view(n, c, k, k, -1).permute(0, 4, 1, 2, 3)


class CrossScaleAttention(nn.Module):
    """Patch-wise non-local attention: the k x k patches of `x_s` (normalised match embeddings) are
    correlated with `x_l`, normalised over all patches (softmax of 10 x scores as published, or soft
    thresholding of the same scores), and their assembly embeddings pasted back with a transposed
    convolution; plus res_scale * x_l.

    impl ('auto', 'dense' or 'blocked', the names of --hspa_impl): each forward runs the path that
    ``model.hspa.dispatch.plan_cross_scale`` returns. Path 'dense' is the published arithmetic: a full
    (positions x patches) score map per image. Path 'blocked' computes the same attention over tiles of
    `block_size` query positions (model.cross_scale; 0: from a memory budget), in O(tile x patches) extra
    memory; in float32 it rounds differently from the published kernels (it is as close to the float64
    result as they are, or closer).
    """

    def __init__(self, channel: int, res_scale: float, ksize: int, padding: int, reduction: int = 2,
                 softmax_scale: float = 10, conv: common.ConvFactory = common.default_conv,
                 normalizer: str = 'softmax', topk: int | None = None, impl: str = 'auto',
                 block_size: int = 0) -> None:
        super().__init__()
        check_normalizer(normalizer)
        impl = canonical_impl(impl, CROSS_SCALE_IMPLS, 'impl')
        if impl != 'dense' and (ksize % 2 != 1 or padding != ksize // 2):
            raise ValueError(f'impl {impl} needs an odd ksize and padding ksize // 2, got {ksize}, {padding}')
        self.ksize = ksize
        self.padding = padding
        self.softmax_scale = softmax_scale
        self.res_scale = res_scale
        self.normalizer = normalizer
        self.topk = topk
        self.impl = impl
        self.block_size = block_size
        self.register_buffer('escape_NaN', torch.tensor([1e-4]))
        self.conv_match_1 = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_match_2 = common.BasicBlock(conv, channel, channel // reduction, 1, act=nn.PReLU())
        self.conv_assembly = common.BasicBlock(conv, channel, channel, 1, act=nn.PReLU())

    def forward(self, x_l: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
        match, key, value = self.conv_match_1(x_l), self.conv_match_2(x_s), self.conv_assembly(x_s)
        scores = x_l.shape[2] * x_l.shape[3] * x_s.shape[2] * x_s.shape[3]
        if exporting():  # a traced graph (ONNX): one batched computation, no per-image loop
            return self._batched(match, key, value) + x_l * self.res_scale
        if plan_cross_scale(self.impl, x_l.device, scores, self.block_size).path == 'blocked':
            out = [cross_scale_attention(mi, ki, vi, self.ksize, self.softmax_scale, self.escape_NaN,
                                         self.normalizer, self.topk, self.block_size)[None]
                   for mi, ki, vi in zip(match, key, value, strict=True)]
        else:
            out = self._dense(match, key, value)
        return torch.cat(out, dim=0) + x_l * self.res_scale

    def _dense(self, match: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        k = self.ksize
        raw_w = _patches(value, k)  # (N, L, C, k, k): reconstruction kernels
        w = _patches(key, k)  # (N, L, C/2, k, k): matching kernels
        out = []
        for xi, wi, raw_wi in zip(match, w, raw_w, strict=True):  # one image at a time, as published
            norm = wi.pow(2).sum(3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True).sqrt()
            wi = wi / torch.maximum(norm, self.escape_NaN.to(wi.dtype))
            yi = F.conv2d(_same_pad(xi[None], k), wi) * self.softmax_scale  # (1, L, H, W): every patch
            if self.normalizer == 'softmax':
                yi = F.softmax(yi, dim=1)
            else:
                yi = soft_threshold(yi, dim=1, topk=self.topk)
            out.append(F.conv_transpose2d(yi, raw_wi, stride=1, padding=self.padding))
        return out

    def _batched(self, match: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The dense attention of all images at once, as matrix products of unfolded patches (the traced
        form: shapes follow the input, the soft threshold is model.hspa.export's exact sparsemax)."""
        k = self.ksize
        keys = F.unfold(_same_pad(key, k), kernel_size=k)  # (N, C/2 k k, Ls)
        keys = keys / torch.maximum(keys.pow(2).sum(1, keepdim=True).sqrt(), self.escape_NaN.to(keys.dtype))
        queries = F.unfold(_same_pad(match, k), kernel_size=k)  # (N, C/2 k k, L)
        scores = torch.matmul(queries.transpose(1, 2), keys) * self.softmax_scale  # (N, L, Ls)
        if self.normalizer == 'softmax':
            weights = F.softmax(scores, dim=-1)
        else:
            weights = sparsemax_graph(scores, self.topk or TOPK)
        cols = torch.matmul(F.unfold(_same_pad(value, k), kernel_size=k), weights.transpose(1, 2))  # (N, C k k, L)
        # conv_transpose2d with each patch as a kernel = the weighted patches folded back (overlaps summed):
        # F.fold, written as a grouped transposed convolution with 0/1 kernels (col2im takes no traced size).
        c = self.conv_assembly[0].out_channels  # a constant of the graph (the kernel's shape must be known)
        unit = torch.eye(k * k, dtype=cols.dtype, device=cols.device).view(k * k, 1, k, k).repeat(c, 1, 1, 1)
        return F.conv_transpose2d(cols.unflatten(2, match.shape[2:]), unit, padding=self.padding, groups=c)

    def extra_repr(self) -> str:
        return f'ksize={self.ksize}, normalizer={self.normalizer}, impl={self.impl}, block_size={self.block_size}'


class MultiScaleAttention(nn.Module):
    """x + res_scale * CrossScaleAttention(x, PReLU(conv3x3(x))) for one patch size."""

    def __init__(self, channel: int, res_scale: float, ksize: int, padding: int, normalizer: str = 'softmax',
                 topk: int | None = None, impl: str = 'auto', block_size: int = 0) -> None:
        super().__init__()
        self.res_scale = res_scale
        # padding ksize // 2 on a 3x3 conv grows the map for ksize 5 and 7, as published.
        self.down_sample = nn.Sequential(nn.Conv2d(channel, channel, 3, stride=1, padding=ksize // 2), nn.PReLU())
        self.stoL = CrossScaleAttention(channel, res_scale, ksize, padding, normalizer=normalizer, topk=topk,
                                        impl=impl, block_size=block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stoL(x, self.down_sample(x)).mul(self.res_scale)


class MSNLAB(nn.Module):
    """Multi-scale non-local attention block: patch sizes 3, 5, 7, 1x1 fusion, channel attention.

    normalizer, topk, impl and block_size are those of every CrossScaleAttention.
    """

    def __init__(self, n_feats: int, res_scale: float, patch_sizes: tuple[int, ...] = (3, 5, 7),
                 normalizer: str = 'softmax', topk: int | None = None, impl: str = 'auto',
                 block_size: int = 0) -> None:
        super().__init__()
        for i, k in enumerate(patch_sizes, start=1):
            self.add_module(f'atten{i}', MultiScaleAttention(n_feats, res_scale, k, k // 2, normalizer=normalizer,
                                                             topk=topk, impl=impl, block_size=block_size))
        self.n_branches = len(patch_sizes)
        self.fusion = common.default_conv(n_feats * len(patch_sizes), n_feats, 1)
        self.CA = ChannelAttention(n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [getattr(self, f'atten{i}')(x) for i in range(1, self.n_branches + 1)]
        return x + self.CA(self.fusion(torch.cat(branches, dim=1)))


class MSNLAN(SRNetwork):
    """head -> G/2 residual groups (outputs fused 1x1) -> MSNLAB -> G/2 residual groups, each after the first
    fed with a 1x1 fusion of the previous output and the MSNLAB output -> conv, global skip -> upsampler.

    attention 'softmax' is the published network; 'hspa' normalises the MSNLAB's scores by soft
    thresholding (exact sparsemax; `topk` sets where its threshold search starts), with the same keys.
    msnlab_impl / msnlab_block: impl and block_size of CrossScaleAttention ('auto': the published
    arithmetic on small maps, the blocked one with O(tile x patches) extra memory on large ones).
    """

    def __init__(
        self,
        scale: int = 4,
        n_colors: int = 3,
        n_feats: int = 64,
        n_resgroups: int = 8,
        n_resblocks: int = 9,
        res_scale: float = 0.1,
        rgb_range: float = 255,
        rgb_mean: tuple[float, float, float] = MSNLAN_MEAN,
        attention: str = 'softmax',
        topk: int = 128,
        msnlab_impl: str = 'auto',
        msnlab_block: int = 0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'softmax' or 'hspa', got {attention!r}")
        self.config = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_resgroups=n_resgroups,
                           n_resblocks=n_resblocks, res_scale=res_scale, rgb_range=rgb_range, attention=attention)
        conv = common.default_conv
        half = n_resgroups // 2
        self.half = half
        self.scale = scale
        # Registration order fixes the state-dict order:
        # sub_mean, fusion, add_mean, head, body, tail, fusion_list.
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.fusion = nn.Conv2d(n_feats * half, n_feats, 1, padding=0, bias=True)
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        body: list[nn.Module] = [ResidualGroup(conv, n_feats, n_resblocks) for _ in range(half)]
        body.append(MSNLAB(n_feats, res_scale, normalizer='softmax' if attention == 'softmax' else 'soft_threshold',
                           topk=topk, impl=msnlab_impl, block_size=msnlab_block))
        body.extend(ResidualGroup(conv, n_feats, n_resblocks) for _ in range(half))
        body.append(conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(
            common.Upsampler(conv, scale, n_feats, act=False),
            nn.Conv2d(n_feats, n_colors, 3, padding=1),
        )
        self.fusion_list = nn.Sequential(
            *[nn.Conv2d(n_feats * 2, n_feats, 1, padding=0, bias=True) for _ in range(max(half - 1, 0))]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        head = x
        first_half = []
        for i in range(self.half):
            x = self.body[i](x)
            first_half.append(x)
        nla = self.body[self.half](self.fusion(torch.cat(first_half, dim=1)))
        y = nla
        for j in range(self.half):
            if j > 0:  # dense skip: every later group also sees the attention output
                y = self.fusion_list[j - 1](torch.cat((y, nla), dim=1))
            y = self.body[self.half + 1 + j](y)
        y = self.body[2 * self.half + 1](y)
        return self.add_mean(self.tail(head + y))

    def chop_rule(self, scale: int) -> ChopRule:
        """The published MSNLAN forward_chop: quarters rounded up to a multiple of the scale, smaller
        quarters (its cross-scale attention is quadratic in the patch area)."""
        return ChopRule(shave=10, min_size=3600 if scale == 4 else 4000, h_mult=scale, w_mult=scale)

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when the keys are not an MSNLAN's: no RMAB branches)."""
        if not common.count_indices(state, r'body\.(\d+)\.body\.\d+\.branch1\.'):
            return {}
        cfg: dict[str, object] = dict(common.infer_head(state))
        cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
        cfg['n_resgroups'] = common.count_indices(state, r'body\.(\d+)\.body\.\d+\.branch1\.')
        cfg['n_resblocks'] = common.count_indices(state, r'body\.0\.body\.(\d+)\.branch1\.')
        return cfg
