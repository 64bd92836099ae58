"""Test-time forwards that cut the input: the published forward_chop, tiles, and the x8 self-ensemble.

Pure functions of the input and of a `run` callable (one network call), so the Model wrapper keeps only
the choice among them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nlsr.model.contract import ChopRule

Forward = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with overlaps of at least `overlap`,
    spread evenly (first at 0, last flush with the end)."""
    if length <= tile:
        return [0]
    count = -(-(length - overlap) // (tile - overlap))
    span = length - tile
    return [(i * span + (count - 1) // 2) // (count - 1) for i in range(count)]


def tile_weights(starts: list[int], length: int, tile: int, overlap: int, scale: int) -> list[torch.Tensor]:
    """Blending weights (HR pixels, float64) of each tile along one axis.

    Between two neighbours the weight ramps linearly over a band of overlap/2 LR pixels centred in their
    overlap (a hard cut for overlap < 4), and the weights of the two sum to one. A tile therefore never
    contributes within overlap/4 LR pixels of its inner edges, so a network whose receptive-field radius
    is at most overlap/4 LR pixels gives exactly its untiled output.
    """
    size = min(tile, length)
    # Half-width of the band: overlap/4 LR pixels, less if neighbouring cuts are closer than a band.
    min_step = min((b - a for a, b in zip(starts, starts[1:], strict=False)), default=size)
    band = scale * min(overlap // 4, min_step // 2)
    out = []
    for i, a in enumerate(starts):
        centre = torch.arange(scale * a, scale * (a + size), dtype=torch.float64) + 0.5
        w = torch.ones_like(centre)
        if i > 0:
            cut = scale * (a + starts[i - 1] + size) / 2
            w *= ((centre - cut + band) / (2 * band)).clamp(0, 1) if band else (centre >= cut).double()
        if i + 1 < len(starts):
            cut = scale * (starts[i + 1] + a + size) / 2
            w *= ((cut + band - centre) / (2 * band)).clamp(0, 1) if band else (centre < cut).double()
        out.append(w)
    return out


def chop(x: torch.Tensor, scale: int, rule: ChopRule, run: Forward, per_call: int = 1) -> torch.Tensor:
    """The published forward_chop: four overlapping quarters, recursively until a quarter is smaller than
    rule.min_size pixels; each output quarter is cut from the matching SR quarter. `per_call` quarters go
    through one call of `run` (one per GPU with DataParallel, as published)."""
    b, _, h, w = x.shape
    h_half, w_half = h // 2, w // 2
    h_size, w_size = h_half + rule.shave, w_half + rule.shave
    if rule.h_mult:
        h_size += h_size % rule.h_mult if rule.add_remainder else rule.h_mult - h_size % rule.h_mult
    if rule.w_mult:
        w_size += w_size % rule.w_mult if rule.add_remainder else rule.w_mult - w_size % rule.w_mult
    if h_size > h or w_size > w or (h_size == h and w_size == w and h_size * w_size >= rule.min_size):
        # Too small to split, or splitting would not shrink it: the published code fails on such inputs
        # (bad slices, endless recursion); a plain forward is what it means.
        return run(x)
    lr_list = [
        x[:, :, 0:h_size, 0:w_size],
        x[:, :, 0:h_size, (w - w_size):w],
        x[:, :, (h - h_size):h, 0:w_size],
        x[:, :, (h - h_size):h, (w - w_size):w],
    ]
    if w_size * h_size < rule.min_size:
        n = min(per_call, 4)
        sr_list: list[torch.Tensor] = []
        for i in range(0, 4, n):
            sr_list.extend(run(torch.cat(lr_list[i:i + n], dim=0)).chunk(n, dim=0))
    else:
        sr_list = [chop(p, scale, rule, run, per_call) for p in lr_list]

    h, w = scale * h, scale * w
    h_half, w_half = scale * h_half, scale * w_half
    h_size, w_size = scale * h_size, scale * w_size
    out = sr_list[0].new_empty(b, sr_list[0].shape[1], h, w)
    out[:, :, 0:h_half, 0:w_half] = sr_list[0][:, :, 0:h_half, 0:w_half]
    out[:, :, 0:h_half, w_half:w] = sr_list[1][:, :, 0:h_half, (w_size - w + w_half):w_size]
    out[:, :, h_half:h, 0:w_half] = sr_list[2][:, :, (h_size - h + h_half):h_size, 0:w_half]
    out[:, :, h_half:h, w_half:w] = sr_list[3][:, :, (h_size - h + h_half):h_size, (w_size - w + w_half):w_size]
    return out


def tiled(x: torch.Tensor, scale: int, tile: int, overlap: int, run: Forward) -> torch.Tensor:
    """Whole-image inference on tile x tile LR tiles overlapping by at least `overlap`, one tile at a time,
    blended with tile_weights (memory: the output plus one tile)."""
    b, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy, wx = tile_weights(ys, h, tile, overlap, scale), tile_weights(xs, w, tile, overlap, scale)
    th, tw = min(tile, h), min(tile, w)
    out: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            sr = run(x[:, :, y0:y0 + th, x0:x0 + tw])
            if out is None or norm is None:
                out = sr.new_zeros(b, sr.shape[1], scale * h, scale * w)
                norm = sr.new_zeros(1, 1, scale * h, scale * w)
            weight = (wy[i][:, None] * wx[j][None, :]).to(sr)
            region = (slice(None), slice(None),
                      slice(scale * y0, scale * (y0 + th)), slice(scale * x0, scale * (x0 + tw)))
            out[region] += sr * weight
            norm[region] += weight
    assert out is not None and norm is not None
    return out / norm.clamp_min(1e-12)


def forward_x8(x: torch.Tensor, forward: Forward) -> torch.Tensor:
    """Self-ensemble: the mean of forward over the 8 flips/transpositions, each mapped back.

    Order as published: bit 0 flips width, bit 1 flips height, bit 2 transposes (applied in that order).
    """
    outs = []
    for t in range(8):
        y = x
        if t & 1:
            y = y.flip(-1)
        if t & 2:
            y = y.flip(-2)
        if t & 4:
            y = y.transpose(-1, -2)
        sr = forward(y)
        if t & 4:
            sr = sr.transpose(-1, -2)
        if t & 2:
            sr = sr.flip(-2)
        if t & 1:
            sr = sr.flip(-1)
        outs.append(sr)
    return torch.stack(outs, dim=0).mean(dim=0)
