"""Soft thresholding (exact sparsemax) along one dimension: the operator of the HSPAN paper.

Per row p = max(s - tau, 0) with tau such that p sums to 1 (sparsemax, Martins & Astudillo 2016).
`sparsemax_threshold` is the project's one torch threshold routine (the native CPU kernels of
model/hspa/native/hspa_kernel.c compute the same threshold by Michelot's iteration).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def sparsemax_threshold(rows: torch.Tensor, topk: int | None) -> torch.Tensor:
    """Sparsemax threshold tau (R, 1) of each row of `rows` (R, n), whose maximum is already 0.

    tau comes from the k largest scores; a row whose support reaches k may need more of them, so such rows
    are solved again with 2k (as published), until the support is smaller than k or k covers the row. The
    result is therefore exact sparsemax whatever topk is.
    """
    n_rows, n = rows.shape
    k = n if topk is None else max(1, min(int(topk), n))
    tau = rows.new_empty(n_rows, 1)
    todo = torch.arange(n_rows, device=rows.device)
    pending = rows
    while True:
        if k >= n:
            vals = pending.sort(dim=-1, descending=True).values
        else:
            vals = pending.topk(k, dim=-1).values
        csum = vals.cumsum(-1) - 1
        ranks = torch.arange(1, vals.shape[-1] + 1, device=rows.device, dtype=rows.dtype)
        # j is in the support iff 1 + j * z_j > sum_{i<=j} z_i (z sorted); tied values satisfy it together.
        size = (ranks * vals > csum).sum(-1, keepdim=True).clamp_min(1)
        t = csum.gather(-1, size - 1) / size.to(rows.dtype)
        if k >= n:
            tau[todo] = t
            return tau
        unsolved = size.squeeze(-1) == k
        k = min(2 * k, n)
        if bool(unsolved.all()):  # nothing solved yet: retry without copying the (large) pending rows
            continue
        tau[todo[~unsolved]] = t[~unsolved]
        if not bool(unsolved.any()):
            return tau
        todo, pending = todo[unsolved], pending[unsolved]


class SoftThreshold(torch.autograd.Function):
    """Sparsemax along `dim` with a hand-written backward (support-restricted centring of the gradient).

    Only the output is kept for backward: the support is where it is positive.
    """

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, dim: int = -1, topk: int | None = None) -> torch.Tensor:
        s = scores.movedim(dim, -1)
        if s.dtype in _LOW_PRECISION:
            s = s.float()  # ranks and cumulative sums are not exact in 16 bits
        n = s.shape[-1]
        if s.numel() == 0:
            out = s.clone()
        else:
            s = s - s.amax(dim=-1, keepdim=True)
            rows = s.reshape(-1, n)
            out = torch.clamp(rows - sparsemax_threshold(rows, topk), min=0).reshape(s.shape)
        out = out.to(scores.dtype).movedim(-1, dim)
        ctx.dim = dim
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (out,) = ctx.saved_tensors
        g = grad_output.movedim(ctx.dim, -1)
        o = out.movedim(ctx.dim, -1)
        if g.dtype in _LOW_PRECISION:
            g = g.float()
        support = o > 0
        g_on = torch.where(support, g, torch.zeros((), dtype=g.dtype, device=g.device))
        size = support.sum(-1, keepdim=True).clamp_min(1).to(g.dtype)
        v_hat = g_on.sum(-1, keepdim=True) / size
        # d p_i / d s_j = [i in S] (delta_ij - [j in S] / |S|): g - mean_S(g) on the support, 0 elsewhere.
        grad = torch.where(support, g - v_hat, torch.zeros((), dtype=g.dtype, device=g.device))
        return grad.to(grad_output.dtype).movedim(-1, ctx.dim), None, None


def soft_threshold(scores: torch.Tensor, dim: int = -1, topk: int | None = None) -> torch.Tensor:
    """Exact sparsemax of `scores` along `dim`; `topk` only sets where the threshold search starts."""
    if topk is not None and int(topk) < 1:
        raise ValueError(f'topk must be a positive integer or None, got {topk}')
    return SoftThreshold.apply(scores, dim, topk)


def check_attention_inputs(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk: int = 1,
                           block_size: int = 0) -> None:
    """ValueError naming ``name`` unless query, key are (N, L, Ck) and value (N, L, C), topk >= 1, block_size >= 0."""
    if query.dim() != 3 or key.shape != query.shape or value.dim() != 3 or value.shape[:2] != query.shape[:2]:
        raise ValueError(f'{name} expects query/key (N, L, Ck) and value (N, L, C); got {tuple(query.shape)}, '
                         f'{tuple(key.shape)}, {tuple(value.shape)}')
    if topk < 1 or block_size < 0:
        raise ValueError(f'{name} needs topk >= 1 and block_size >= 0; got {topk}, {block_size}')


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk: int | None) -> torch.Tensor:
    """The published HSPA algorithm: the whole (N, L, L) scores query @ key^T in float32 (autocast off,
    16-bit inputs promoted), soft thresholding, then @ value. query, key (N, L, Ck); value (N, L, C). The
    result has value's dtype, as the other paths' results do (16-bit weights: the next convolution's)."""
    dtype = value.dtype
    with torch.autocast(device_type=query.device.type, enabled=False):
        if query.dtype in _LOW_PRECISION or dtype in _LOW_PRECISION:
            query, key, value = query.float(), key.float(), value.float()
        scores = torch.matmul(query, key.transpose(1, 2))
        return torch.matmul(soft_threshold(scores, dim=-1, topk=topk), value).to(dtype)
