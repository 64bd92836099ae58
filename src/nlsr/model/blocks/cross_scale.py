"""Patch-wise non-local attention (MSNLAN's cross-scale attention, PA-EDSR's pyramid attention), computed
over tiles of query positions (bounded memory).

The published blocks correlate every k x k patch of the match map x (C', H, W) with every normalised
k x k patch of the key maps m (C', Hs, Ws) (MSNLAN: one map; PA-EDSR: one per pyramid level), normalise
the scores of each query over all keys of all maps, and paste the k x k value patches back with a
transposed convolution. Written per pixel for one key map, with p = k // 2 and all maps zero outside
their extent, that is

    S[q, l] = scale / max(|patch_l|, eps) * sum_f D[q + f, l + f],   D[a, b] = <x[:, a], m[:, b]>
    out[:, o] = sum_m value[:, m] * G[o, m],                        G[o, m] = sum_f P[o + f, m + f]

with P = normalize(S) along the keys and f running over the (2p + 1)^2 offsets. Both sums are box
filters along the diagonals of a (query, key) matrix, so each query tile needs only a halo of p pixels:
the tile's pixel products D (depth C'), its scores, its attention weights and its share of G are the
only tensors of size (queries x keys). Extra memory is O(tile x keys) instead of O(H W x keys), and the
work per (query, key) pair is C' + C multiply-adds plus 4 (2p + 1) additions instead of (C' + C) k^2.

With several key maps, a tile's scores of every map form one row per query (normalised together), and
each map's weights are spread back on their own.

Without autograd, a tile's tensors live in four reused buffers (a fifth holds the weights of several
maps), each separable half of a diagonal box sum is one reduction over an overlapping strided view, and G
is the diagonal sum of the zero-padded weights.
Under autograd the same sums are written with slices and additions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nlsr.model.attention import check_normalizer
from nlsr.model.hspa import soft_threshold

# With block_size 0, tiles hold at most this many (query, key) scores (256 MiB in float32); the four
# buffers of a tile hold up to about 1.6 times this many entries each (halo and padding; with several key
# maps a fifth holds the weights, and the padded per-map buffers are smaller). Smaller tiles
# redo more of the halo: at 192 x 192 positions and ksize 7, half this budget took about 1.3x the time.
BLOCK_SCORES = 2**26


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
    allocate (and page-fault) fresh score-sized tensors."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like = like
        self.store: dict[str, torch.Tensor] = {}

    def empty(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < n:
            self.store.pop(name, None)
            buf = self.store[name] = self.like.new_empty(n)
        return buf[:n].view(shape)

    def padded(self, name: str, x: torch.Tensor, dims: tuple[int, int], pad: int) -> torch.Tensor:
        """x with `pad` zeros before and after along the two `dims`, in buffer `name`."""
        shape = list(x.shape)
        for dim in dims:
            shape[dim] += 2 * pad
        out = self.empty(name, *shape).zero_()
        inner = out
        for dim in dims:
            inner = inner.narrow(dim, pad, x.shape[dim])
        inner.copy_(x)
        return out


def _shifted_sum(x: torch.Tensor, p: int, dims: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """y[..] = sum over a in [0, 2p] of x shifted by a along both `dims` at once (a diagonal box sum):
    dims (1, 3): y[i, j, u, v] = sum_a x[i, j + a, u, v + a]; dims (0, 2): sum_a x[i + a, j, u + a, v].

    x (4-d, contiguous) -> y, 2p shorter along `dims`. One reduction over an overlapping strided view.
    """
    if not x.is_contiguous():
        raise ValueError('x must be contiguous')
    size = list(x.shape)
    for dim in dims:
        size[dim] -= 2 * p
    step = x.stride(dims[0]) + x.stride(dims[1])
    view = x.as_strided([2 * p + 1, *size], [step, *x.stride()], x.storage_offset())
    return torch.sum(view, 0, out=out)


def _diagonal_sum(d: torch.Tensor, p: int) -> torch.Tensor:
    """s[i, j, u, v] = sum over a, b in [0, 2p] of d[i + a, j + b, u + a, v + b], with slices only
    (differentiable): d (rows + 2p, cols + 2p, hs + 2p, ws + 2p) -> s (rows, cols, hs, ws)."""
    rows, cols, hs, ws = (n - 2 * p for n in d.shape)
    t = d[:, 0:cols, :, 0:ws].clone()
    for i in range(1, 2 * p + 1):
        t = t + d[:, i:i + cols, :, i:i + ws]
    s = t[0:rows, :, 0:hs]
    for i in range(1, 2 * p + 1):
        s = s + t[i:i + rows, :, i:i + hs]
    return s


def _diagonal_spread(w: torch.Tensor, p: int) -> torch.Tensor:
    """The adjoint of _diagonal_sum: g[i + a, j + b, u + a, v + b] += w[i, j, u, v] for a, b in [0, 2p]
    (differentiable): w (rows, cols, hs, ws) -> g (rows + 2p, cols + 2p, hs + 2p, ws + 2p)."""
    rows, cols, hs, ws = w.shape
    u = w.new_zeros(rows, cols + 2 * p, hs, ws + 2 * p)
    for i in range(2 * p + 1):
        u[:, i:i + cols, :, i:i + ws] += w
    g = w.new_zeros(rows + 2 * p, cols + 2 * p, hs + 2 * p, ws + 2 * p)
    for i in range(2 * p + 1):
        g[i:i + rows, :, i:i + hs] += u
    return g


def _scores_autograd(d: torch.Tensor, p: int, key_scale: torch.Tensor) -> torch.Tensor:
    """Tile scores (queries, keys) of one key map, with ops autograd can differentiate."""
    s = _diagonal_sum(d, p) * key_scale
    rows, cols, hs, ws = s.shape
    return s.reshape(rows * cols, hs * ws)


def _scores_inference(d: torch.Tensor, p: int, key_scale: torch.Tensor, out: torch.Tensor,
                      bufs: _Buffers) -> None:
    """The same as _scores_autograd into `out` (rows, cols, hs, ws; a view into the tile's score matrix),
    the diagonal sums as strided reductions in reused buffers."""
    rows, cols, hs, ws = out.shape
    t = _shifted_sum(d, p, (1, 3), out=bufs.empty('b', rows + 2 * p, cols, hs + 2 * p, ws))
    _shifted_sum(t, p, (0, 2), out=out)
    out.mul_(key_scale)


def _spread_inference(w: torch.Tensor, p: int, bufs: _Buffers) -> torch.Tensor:
    """_diagonal_spread in reused buffers: the diagonal sum of the zero-padded weights
    (g[I, J, U, V] = sum_ab w[I - a, J - b, U - a, V - b])."""
    rows, cols, hs, ws = w.shape
    w = bufs.padded('a', w, (1, 3), 2 * p)
    u = _shifted_sum(w, p, (1, 3), out=bufs.empty('b', rows, cols + 2 * p, hs, ws + 2 * p))
    u = bufs.padded('c', u, (0, 2), 2 * p)
    return _shifted_sum(u, p, (0, 2), out=bufs.empty('d', rows + 2 * p, cols + 2 * p, hs + 2 * p, ws + 2 * p))


def _normalize(s: torch.Tensor, normalizer: str, topk: int | None, out: torch.Tensor | None) -> torch.Tensor:
    """Weights from the scores of each query (row): softmax, or soft thresholding (exact sparsemax)."""
    if normalizer == 'soft_threshold':
        return soft_threshold(s, dim=-1, topk=topk)
    if out is None:
        return F.softmax(s, dim=-1)
    return torch.ops.aten._softmax.out(s, -1, False, out=out)  # torch.softmax's kernel, into a reused buffer


class _KeyMap:
    """One key map of the attention, laid out for the tile loop: zero-padded keys (C', Lp) and values
    (C, Lp), Lp = (Hs + 2p)(Ws + 2p), and the factor scale / max(|patch|, eps) of each key patch (Hs, Ws)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, ksize: int, scale: float,
                 escape: torch.Tensor) -> None:
        p = ksize // 2
        pad = (p, p, p, p)
        self.hs, self.ws = key.shape[1:]
        # |patch_l|^2: a k x k box sum of the per-pixel squared norms (zero outside the key map).
        sq = F.pad(key.pow(2).sum(0)[None, None], pad)
        norm = F.conv2d(sq, sq.new_ones(1, 1, ksize, ksize))[0, 0].sqrt()
        self.key_scale = scale / torch.maximum(norm, escape.to(norm.dtype))
        self.keys = F.pad(key, pad).reshape(key.shape[0], -1)
        self.values = F.pad(value, pad).reshape(value.shape[0], -1)  # zero on the border

    @property
    def count(self) -> int:
        return self.hs * self.ws


def patch_attention(
    match: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    ksize: int,
    scale: float,
    escape: torch.Tensor,
    normalizer: str = 'softmax',
    topk: int | None = None,
    block_size: int = 0,
) -> torch.Tensor:
    """The published patch attention of one image over one or more key maps: match (C', H, W), keys[i]
    (C', Hs_i, Ws_i), values[i] (C, Hs_i, Ws_i) -> (C, H, W), the transposed-convolution output (the sum
    over all maps) before any residual.

    The scores of each query are normalised jointly over the k x k patches of all key maps (MSNLAN's
    cross-scale attention has one map; PA-EDSR's pyramid attention one per pyramid level), as the published
    code does by concatenating the patches of every map into one convolution kernel. `normalizer` turns
    them into weights: 'softmax' (published) or 'soft_threshold' (exact sparsemax, model.hspa.soft_threshold
    with `topk`). `block_size` is the number of query positions per tile (0: chosen from BLOCK_SCORES).
    `ksize` must be odd (the published padding keeps the size only then).
    """
    if ksize % 2 != 1:
        raise ValueError(f'ksize must be odd, got {ksize}')
    check_normalizer(normalizer)
    if not keys or len(keys) != len(values):
        raise ValueError(f'expected as many key maps as value maps (at least one), got {len(keys)} and {len(values)}')
    p = ksize // 2
    c_match, h, w = match.shape
    c_value = values[0].shape[0]
    for key, value in zip(keys, values, strict=True):
        if key.shape != (c_match, *value.shape[1:]) or value.shape[0] != c_value:
            raise ValueError(f'key {tuple(key.shape)} and value {tuple(value.shape)} do not match '
                             f'({c_match} and {c_value} channels, the same size)')
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (match, *keys, *values))
    maps = [_KeyMap(key, value, ksize, scale, escape) for key, value in zip(keys, values, strict=True)]
    n_keys = sum(m.count for m in maps)
    queries = F.pad(match, (p, p, p, p))  # (C', H + 2p, W + 2p)
    rows, cols = tile_shape(block_size or auto_block_size(sum(m.keys.shape[1] for m in maps)), h, w)
    bufs = _Buffers(match)
    # With one map the weights may share the spread's last buffer (read before it is written); with
    # several they must outlive the spreads of all maps.
    weights_buffer = 'd' if len(maps) == 1 else 'w'
    out = match.new_zeros(c_value, h + 2 * p, w + 2 * p)
    for y0 in range(0, h, rows):
        for x0 in range(0, w, cols):
            nr, nc = min(rows, h - y0), min(cols, w - x0)
            q = queries[:, y0:y0 + nr + 2 * p, x0:x0 + nc + 2 * p].reshape(c_match, -1).t()
            if grad:
                s = [_scores_autograd(torch.mm(q, m.keys).view(nr + 2 * p, nc + 2 * p, m.hs + 2 * p, m.ws + 2 * p),
                                      p, m.key_scale) for m in maps]
                wts = _normalize(s[0] if len(s) == 1 else torch.cat(s, dim=1), normalizer, topk, None)
            else:
                s_all = bufs.empty('c', nr * nc, n_keys)
                start = 0
                for m in maps:
                    d = torch.mm(q, m.keys, out=bufs.empty('a', q.shape[0], m.keys.shape[1]))
                    d = d.view(nr + 2 * p, nc + 2 * p, m.hs + 2 * p, m.ws + 2 * p)
                    _scores_inference(d, p, m.key_scale, s_all[:, start:start + m.count].view(nr, nc, m.hs, m.ws),
                                      bufs)
                    start += m.count
                wts = _normalize(s_all, normalizer, topk, bufs.empty(weights_buffer, nr * nc, n_keys))
            contrib = None
            start = 0
            for m in maps:
                w_m = wts[:, start:start + m.count].reshape(nr, nc, m.hs, m.ws)
                start += m.count
                g = _diagonal_spread(w_m, p) if grad else _spread_inference(w_m, p, bufs)
                c = torch.mm(m.values, g.reshape((nr + 2 * p) * (nc + 2 * p), -1).t())
                contrib = c if contrib is None else contrib + c
            out[:, y0:y0 + nr + 2 * p, x0:x0 + nc + 2 * p] += contrib.view(c_value, nr + 2 * p, nc + 2 * p)
    return out[:, p:p + h, p:p + w]


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
    """The published patch attention of one image with one key map (MSNLAN): match (C', H, W), key
    (C', Hs, Ws), value (C, Hs, Ws) -> (C, H, W); patch_attention with [key] and [value]."""
    return patch_attention(match, [key], [value], ksize, scale, escape, normalizer, topk, block_size)
