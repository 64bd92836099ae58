"""Soft thresholding (exact sparsemax) and the non-local attentions of HSPAN.

`soft_threshold` is the operator of the HSPAN paper: per score row p = max(s - tau, 0) with tau such that
p sums to 1 (sparsemax, Martins & Astudillo 2016). The dense `HSPA` here is the plain, obviously correct
implementation: it stays the oracle for the memory-bounded one in model/hspa_fast.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from model import common

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _tau_rows(rows: torch.Tensor, topk: int | None) -> torch.Tensor:
    """Threshold tau (R, 1) of each row of `rows` (R, n), whose maximum is already 0.

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
            out = torch.clamp(rows - _tau_rows(rows, topk), min=0).reshape(s.shape)
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


class _Embeddings(nn.Module):
    """The three 1x1 embeddings of the published non-local attentions (names fixed by released weights)."""

    def __init__(self, channel: int, reduction: int, res_scale: float, conv: common.ConvFactory) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.conv_match1 = common.BasicBlock(conv, channel, channel // reduction, 1, bn=False, act=nn.PReLU())
        self.conv_match2 = common.BasicBlock(conv, channel, channel // reduction, 1, bn=False, act=nn.PReLU())
        self.conv_assembly = common.BasicBlock(conv, channel, channel, 1, bn=False, act=nn.PReLU())

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query (N, L, C/r), key (N, L, C/r), value (N, L, C) with L = H * W in row-major order."""
        q = self.conv_match1(x).flatten(2).transpose(1, 2)
        k = self.conv_match2(x).flatten(2).transpose(1, 2)
        v = self.conv_assembly(x).flatten(2).transpose(1, 2)
        return q, k, v

    def combine(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """res_scale * attended (N, L, C) back in NCHW, plus the input."""
        return self.res_scale * attended.transpose(1, 2).reshape(x.shape) + x


# With impl='fast' and an automatic block size, batches whose whole score tensor has at most this many
# entries (32 MiB in float32) use the dense operator: a few large operations beat the blocked algorithm's
# many small ones on small maps (e.g. training patches), and the result is the same.
DENSE_MAX_SCORES = 8 * 2**20


class HSPA(_Embeddings):
    """High-Similarity-Pass Attention: x + res_scale * sparsemax(q k^T) v over all H*W positions.

    impl='dense' forms the (L, L) scores (published arithmetic); impl='fast' calls
    model.hspa_fast.hspa_attention, the same result with bounded memory (small maps with block_size 0
    take the dense operator, see DENSE_MAX_SCORES).
    """

    def __init__(
        self,
        channel: int = 256,
        reduction: int = 2,
        res_scale: float = 1,
        conv: common.ConvFactory = common.default_conv,
        topk: int = 128,
        impl: str = 'dense',
        block_size: int = 0,
    ) -> None:
        super().__init__(channel, reduction, res_scale, conv)
        if impl not in ('dense', 'fast'):
            raise ValueError(f"HSPA impl must be 'dense' or 'fast', got {impl!r}")
        self.topk = topk
        self.impl = impl
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.embed(x)
        n, length = q.shape[:2]
        if self.impl == 'fast' and (self.block_size or n * length * length > DENSE_MAX_SCORES):
            try:
                from model.hspa_fast import hspa_attention
            except ModuleNotFoundError as e:  # pragma: no cover - only while the fast path is absent
                raise RuntimeError("HSPA impl 'fast' needs src/model/hspa_fast.py; use --hspa_impl dense") from e
            attended = hspa_attention(q, k, v, self.topk, self.block_size)
        else:
            scores = torch.matmul(q, k.transpose(1, 2))
            attended = torch.matmul(soft_threshold(scores, dim=-1, topk=self.topk), v)
        return self.combine(attended, x)

    def extra_repr(self) -> str:
        return f'topk={self.topk}, impl={self.impl}, block_size={self.block_size}'


class NonLocalAttention(_Embeddings):
    """Standard non-local attention: x + res_scale * softmax(q k^T) v (the paper's ablation)."""

    def __init__(
        self,
        channel: int = 256,
        reduction: int = 2,
        res_scale: float = 1,
        conv: common.ConvFactory = common.default_conv,
    ) -> None:
        super().__init__(channel, reduction, res_scale, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.embed(x)
        weights = F.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)
        return self.combine(torch.matmul(weights, v), x)
