"""MSNLAN's patch-wise cross-scale attention, computed over tiles of query positions (bounded memory).

The published block correlates every k x k patch of the match map x (C', H, W) with every normalised
k x k patch of the key map m (C', Hs, Ws), normalises the scores of each query over all keys, and pastes
the k x k value patches back with a transposed convolution. Written per pixel, with p = k // 2 and all
maps zero outside their extent, that is

    S[q, l] = scale / max(|patch_l|, eps) * sum_f D[q + f, l + f],   D[a, b] = <x[:, a], m[:, b]>
    out[:, o] = sum_m value[:, m] * G[o, m],                        G[o, m] = sum_f P[o + f, m + f]

with P = normalize(S) along the keys and f running over the (2p + 1)^2 offsets. Both sums are box
filters along the diagonals of a (query, key) matrix, so each query tile needs only a halo of p pixels:
the tile's pixel products D (depth C'), its scores, its attention weights and its share of G are the
only tensors of size (queries x keys). Extra memory is O(tile x keys) instead of O(H W x keys), and the
work per (query, key) pair is C' + C multiply-adds plus 4 (2p + 1) additions instead of (C' + C) k^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.attention import soft_threshold

# With block_size 0, tiles hold at most this many (query, key) scores (128 MiB in float32); a few tensors
# of this size are alive at once.
BLOCK_SCORES = 2**25


def tile_shape(block_size: int, height: int, width: int) -> tuple[int, int]:
    """Rows and columns of a query tile of at most `block_size` positions: square-ish, whole rows when
    the image is narrower than the square."""
    if block_size < 1:
        raise ValueError(f'block_size must be positive, got {block_size}')
    cols = min(width, max(1, math.isqrt(block_size)))
    rows = min(height, max(1, block_size // cols))
    return rows, cols


def auto_block_size(keys: int, budget: int = BLOCK_SCORES) -> int:
    """Queries per tile such that a tile's score tensor stays within `budget` entries."""
    return max(1, budget // max(1, keys))


class _Buffers:
    """Reusable flat buffers, one per name (grown when a larger tile needs more), so that tiles do not
    allocate (and page-fault) fresh score-sized tensors; disabled under autograd, where every tile's
    tensors are kept for backward anyway."""

    def __init__(self, like: torch.Tensor, enabled: bool) -> None:
        self.like = like
        self.enabled = enabled
        self.store: dict[str, torch.Tensor] = {}

    def empty(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if not self.enabled:
            return self.like.new_empty(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < n:
            self.store.pop(name, None)
            buf = self.store[name] = self.like.new_empty(n)
        return buf[:n].view(shape)

    def zeros(self, name: str, *shape: int) -> torch.Tensor:
        return self.empty(name, *shape).zero_()


def _diagonal_sum(d: torch.Tensor, p: int, rows: int, cols: int, hs: int, ws: int, bufs: _Buffers) -> torch.Tensor:
    """s[i, j, u, v] = sum over a, b in [0, 2p] of d[i + a, j + b, u + a, v + b].

    d (rows + 2p, cols + 2p, hs + 2p, ws + 2p) -> s (rows, cols, hs, ws); separable: x offsets, then y.
    """
    k = 2 * p + 1
    t = bufs.empty('t', rows + 2 * p, cols, hs + 2 * p, ws)
    t.copy_(d[:, 0:cols, :, 0:ws])
    for i in range(1, k):
        t += d[:, i:i + cols, :, i:i + ws]
    s = bufs.empty('s', rows, cols, hs, ws)
    s.copy_(t[0:rows, :, 0:hs])
    for i in range(1, k):
        s += t[i:i + rows, :, i:i + hs]
    return s


def _diagonal_spread(w: torch.Tensor, p: int, bufs: _Buffers) -> torch.Tensor:
    """The adjoint of _diagonal_sum: g[i + a, j + b, u + a, v + b] += w[i, j, u, v] for a, b in [0, 2p].

    w (rows, cols, hs, ws) -> g (rows + 2p, cols + 2p, hs + 2p, ws + 2p).
    """
    rows, cols, hs, ws = w.shape
    k = 2 * p + 1
    u = bufs.zeros('u', rows, cols + 2 * p, hs, ws + 2 * p)
    for i in range(k):
        u[:, i:i + cols, :, i:i + ws] += w
    g = bufs.zeros('g', rows + 2 * p, cols + 2 * p, hs + 2 * p, ws + 2 * p)
    for i in range(k):
        g[i:i + rows, :, i:i + hs] += u
    return g


def _normalize(s: torch.Tensor, normalizer: str, topk: int | None, bufs: _Buffers) -> torch.Tensor:
    """Attention weights of the score rows s (queries, keys): softmax or soft thresholding (sparsemax)."""
    if normalizer == 'soft_threshold':
        return soft_threshold(s, dim=-1, topk=topk)
    if not bufs.enabled:
        return F.softmax(s, dim=-1)
    # torch.softmax's kernel, written into a reused buffer.
    return torch.ops.aten._softmax.out(s, -1, False, out=bufs.empty('w', *s.shape))


def cross_scale_attention(
    match: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ksize: int,
    scale: float,
    escape: torch.Tensor,
    normalizer: str = 'softmax',
    topk: int | None = None,
    block_size: int = 0,
) -> torch.Tensor:
    """The published patch attention of one image: match (C', H, W), key (C', Hs, Ws), value (C, Hs, Ws)
    -> (C, H, W), the transposed-convolution output before the residual.

    `normalizer` turns the scores of each query into weights over the keys: 'softmax' (published) or
    'soft_threshold' (exact sparsemax, model.attention.soft_threshold with `topk`). `block_size` is the
    number of query positions per tile (0: chosen from BLOCK_SCORES). `ksize` must be odd (the published
    padding keeps the size only then).
    """
    if ksize % 2 != 1:
        raise ValueError(f'ksize must be odd, got {ksize}')
    if normalizer not in ('softmax', 'soft_threshold'):
        raise ValueError(f"normalizer must be 'softmax' or 'soft_threshold', got {normalizer!r}")
    p = ksize // 2
    c_match, h, w = match.shape
    c_value, hs, ws = value.shape
    if key.shape != (c_match, hs, ws):
        raise ValueError(f'key shape {tuple(key.shape)} does not match ({c_match}, {hs}, {ws})')
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (match, key, value))
    pad = (p, p, p, p)
    # |patch_l|^2: a k x k box sum of the per-pixel squared norms (zero outside the key map).
    sq = F.pad(key.pow(2).sum(0)[None, None], pad)
    norm = F.conv2d(sq, sq.new_ones(1, 1, ksize, ksize))[0, 0].sqrt()
    key_scale = scale / torch.maximum(norm, escape.to(norm.dtype))  # (Hs, Ws)
    keys = F.pad(key, pad).reshape(c_match, -1)  # (C', Lp), Lp = (Hs + 2p)(Ws + 2p)
    values = F.pad(value, pad).reshape(c_value, -1)  # (C, Lp), zero on the border
    queries = F.pad(match, pad)  # (C', H + 2p, W + 2p)
    rows, cols = tile_shape(block_size or auto_block_size(keys.shape[1]), h, w)
    bufs = _Buffers(match, enabled=not grad)
    out = match.new_zeros(c_value, h + 2 * p, w + 2 * p)
    for y0 in range(0, h, rows):
        for x0 in range(0, w, cols):
            nr, nc = min(rows, h - y0), min(cols, w - x0)
            q = queries[:, y0:y0 + nr + 2 * p, x0:x0 + nc + 2 * p].reshape(c_match, -1).t()
            if grad:
                d = torch.mm(q, keys)
            else:
                d = torch.mm(q, keys, out=bufs.empty('d', q.shape[0], keys.shape[1]))
            s = _diagonal_sum(d.view(nr + 2 * p, nc + 2 * p, hs + 2 * p, ws + 2 * p), p, nr, nc, hs, ws, bufs)
            s = s * key_scale if grad else s.mul_(key_scale)
            weights = _normalize(s.view(nr * nc, hs * ws), normalizer, topk, bufs)
            g = _diagonal_spread(weights.view(nr, nc, hs, ws), p, bufs)
            contrib = torch.mm(values, g.view((nr + 2 * p) * (nc + 2 * p), -1).t())
            out[:, y0:y0 + nr + 2 * p, x0:x0 + nc + 2 * p] += contrib.view(c_value, nr + 2 * p, nc + 2 * p)
    return out[:, p:p + h, p:p + w]
