"""NLSN's non-local sparse attention (Mei et al., CVPR 2021): attention within buckets of spherical LSH.

Same modules, state-dict keys and arithmetic as the attention of HarukiYqM/Non-Local-Sparse-Attention. Per
image with L positions and match embeddings x (L, C/4) and assembly embeddings y (L, C):

1. hash: each of n_hashes rounds draws a random rotation R (C/4, b/2), with b = min(L // chunk + parity, 128)
   buckets; a position's bucket is argmax([xR, -xR]);
2. sort the positions of every round by bucket (one sort over all rounds, as published: its order within a
   bucket decides the chunks), cut the sorted sequence into chunks of `chunk_size` (the last one filled up
   with the last positions again);
3. every position attends to the L2-normalised match embeddings of its own chunk and of the chunks before
   and after it (cyclically): raw scores, normalised by softmax (published) or by soft thresholding
   (exact sparsemax, attention='hspa');
4. the rounds are combined with weights softmax over rounds of each position's logsumexp of raw scores,
   and the result is added to the input times res_scale.

The rounds and groups of chunks are computed one after another, so the extra memory is
O(n_hashes L C) plus one group's scores (`group_scores` entries) instead of all rounds' scores at once;
the arithmetic of each chunk is the published one.

Random rotations come from `generator` when it is set (the test-time forwards give one per image, see
model.contract), from torch's global generator otherwise; each forward draws one (1, C/4, n_hashes, b/2)
float32 tensor by torch.randn, the published draw, so a generator seeded s draws what the published code
draws after torch.manual_seed(s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.model import common
from nlsr.model.attention import check_normalizer
from nlsr.model.hspa import soft_threshold

# Scores (query x key entries) computed at once; larger maps are done in groups of chunks.
GROUP_SCORES = 2**22
MAX_BUCKETS = 128
NORMALIZE_EPS = 5e-5


def n_buckets(length: int, chunk_size: int) -> int:
    """Hash buckets of a map of `length` positions, as published: L // chunk rounded up to even, at most 128
    (0 when the map is smaller than one chunk)."""
    chunks = length // chunk_size
    return min(chunks + chunks % 2, MAX_BUCKETS)


class NonLocalSparseAttention(nn.Module):
    """x + res_scale * (LSH-bucketed attention of x); see the module docstring.

    channels: input and output channels (the match embeddings have channels // reduction); k_size: kernel of
    the match convolution; normalizer: 'softmax' (published) or 'soft_threshold'; group_scores: the most scores
    held at once. A map smaller than one chunk (where the published code fails: no buckets) is one chunk of
    all its positions, attending to itself as its own neighbours.
    """

    def __init__(self, channels: int = 64, n_hashes: int = 4, chunk_size: int = 144, reduction: int = 4,
                 k_size: int = 3, res_scale: float = 1.0, normalizer: str = 'softmax',
                 conv: common.ConvFactory = common.default_conv, group_scores: int = GROUP_SCORES) -> None:
        super().__init__()
        check_normalizer(normalizer)
        if channels % reduction or channels < reduction:
            raise ValueError(f'channels ({channels}) must be a positive multiple of reduction ({reduction})')
        self.chunk_size = chunk_size
        self.n_hashes = n_hashes
        self.reduction = reduction
        self.res_scale = res_scale
        self.normalizer = normalizer
        self.group_scores = group_scores
        self.generator: torch.Generator | None = None  # set by the network around test-time forwards
        self.conv_match = common.BasicBlock(conv, channels, channels // reduction, k_size, act=None)
        self.conv_assembly = common.BasicBlock(conv, channels, channels, 1, act=None)

    def hash_codes(self, match: torch.Tensor, buckets: int) -> torch.Tensor:
        """Bucket of every position in every round, offset by round * buckets: (N, n_hashes * L) (one bucket
        per round when `buckets` is 0).

        The rotations are drawn in float32 and applied in float32 or float64 (16-bit inputs promoted,
        autocast off): bucket choices are argmaxes, which 16-bit rounding would change.
        """
        n, length, c = match.shape
        if buckets == 0:
            codes = torch.zeros(n, self.n_hashes, length, dtype=torch.long, device=match.device)
        else:
            shape = (1, c, self.n_hashes, buckets // 2)
            with torch.autocast(match.device.type, enabled=False):
                rotations = torch.randn(shape, generator=self.generator, dtype=torch.float32, device=match.device)
                if match.dtype != torch.float64:
                    match = match.float()
                rotations = rotations.to(match.dtype).expand(n, -1, -1, -1)
                rotated = torch.einsum('btf,bfhi->bhti', match, rotations)
                codes = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # (N, n_hashes, L)
        offsets = torch.arange(self.n_hashes, device=match.device).view(1, -1, 1) * max(buckets, 1)
        return (codes + offsets).reshape(n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        length = h * w
        match = self.conv_match(x).flatten(2).transpose(1, 2)  # (N, L, C/4)
        assembly = self.conv_assembly(x).flatten(2).transpose(1, 2)  # (N, L, C)
        codes = self.hash_codes(match, n_buckets(length, self.chunk_size))
        # One sort over all rounds, as published: rounds occupy disjoint code ranges, so round r is block r of
        # the sorted order; the order within a bucket (the CPU sort's, not stable) is the published one.
        order = codes.sort(dim=-1).indices
        chunk = min(self.chunk_size, length)
        rets, lses = [], []
        for r in range(self.n_hashes):
            idx = order[:, r * length:(r + 1) * length] - r * length  # (N, L): positions in bucket order
            ret, lse = self._round(match, assembly, idx, chunk)
            undo = torch.empty_like(idx).scatter_(1, idx, torch.arange(length, device=idx.device).expand(n, -1))
            rets.append(ret.gather(1, undo[..., None].expand_as(ret)))
            lses.append(lse.gather(1, undo))
        probs = F.softmax(torch.stack(lses, dim=1), dim=1)  # (N, n_hashes, L): the rounds' weights
        out = rets[0] * probs[:, 0, :, None]
        for r in range(1, self.n_hashes):
            out = out + rets[r] * probs[:, r, :, None]
        return out.transpose(1, 2).reshape(n, -1, h, w) * self.res_scale + x

    def _round(self, match: torch.Tensor, assembly: torch.Tensor, idx: torch.Tensor,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One hash round: outputs (N, L, C) and logsumexps (N, L) of the positions in sorted order `idx`."""
        n, length = idx.shape
        xs = match.gather(1, idx[..., None].expand(-1, -1, match.shape[-1]))
        ys = assembly.gather(1, idx[..., None].expand(-1, -1, assembly.shape[-1]))
        pad = -length % chunk
        if pad:  # the last chunk filled up with the last `pad` sorted positions again
            xs = torch.cat([xs, xs[:, -pad:]], dim=1)
            ys = torch.cat([ys, ys[:, -pad:]], dim=1)
        n_chunks = xs.shape[1] // chunk
        queries = xs.view(n, n_chunks, chunk, -1)
        keys = F.normalize(queries, p=2, dim=-1, eps=NORMALIZE_EPS)
        values = ys.view(n, n_chunks, chunk, -1)
        group = max(1, self.group_scores // max(1, n * chunk * 3 * chunk))
        rets, lses = [], []
        for start in range(0, n_chunks, group):
            sel = torch.arange(start, min(start + group, n_chunks), device=idx.device)
            # keys and values of each chunk: its own, the previous and the next chunk (cyclic), in that order
            near = (sel, (sel - 1) % n_chunks, (sel + 1) % n_chunks)
            k = torch.cat([keys[:, i] for i in near], dim=2)  # (N, g, 3 chunk, C/4)
            v = torch.cat([values[:, i] for i in near], dim=2)  # (N, g, 3 chunk, C)
            raw = torch.matmul(queries[:, sel], k.transpose(-1, -2))  # (N, g, chunk, 3 chunk)
            lse = torch.logsumexp(raw, dim=-1, keepdim=True)
            if self.normalizer == 'softmax':
                weights = torch.exp(raw - lse)
            else:
                weights = soft_threshold(raw, dim=-1)
            rets.append(torch.matmul(weights, v).flatten(1, 2))
            lses.append(lse.flatten(1))
        ret = torch.cat(rets, dim=1)[:, :length]
        return ret, torch.cat(lses, dim=1)[:, :length]

    def extra_repr(self) -> str:
        return (f'chunk_size={self.chunk_size}, n_hashes={self.n_hashes}, normalizer={self.normalizer}, '
                f'res_scale={self.res_scale}')
