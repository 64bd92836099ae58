"""Exact HSPA as fused Triton kernels, in the flash-attention layout (optional: needs the triton package).

``hspa_triton(q, k, v)`` returns ``sparsemax(q @ k^T) @ v`` without forming the (L x L) scores. One
program owns a tile of query rows and streams the keys in tiles, recomputing the scores each pass:

1. the row maximum m;
2. Michelot's iteration from tau = m - 1: one pass sums the scores above tau and counts them, the new
   tau is m + (sum(s - m) - 1) / count, and a row stops when its support stops shrinking. The loop runs
   until every row of the tile has stopped, so the threshold is exact, not a fixed number of steps;
3. out = sum_j max(s_j - tau, 0) v_j.

Backward keeps tau per row and recomputes the scores: one kernel per query tile gets the mean of dP
over each row's support and then dQ; one kernel per key tile gets dK and dV. dS = dP - mean on the
support (the sparsemax Jacobian), 0 elsewhere.

Any L (masked tiles), query/key width Ck and value width C of any size (padded to powers of two inside),
no 1/sqrt(d) scaling, and float32 scores and thresholds whatever the input dtype (products in IEEE
float32, no TF32). Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (slowly; for tests).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ['available', 'hspa_triton']


@functools.cache
def available() -> bool:
    """True when triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels() -> ModuleType:
    from model.hspa.triton import kernels  # imports triton, so only when a kernel runs

    return kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def _sizes(kw: int, width: int) -> dict[str, int]:
    """Padded (power-of-two) widths of the query/key and value tiles."""
    return {'BLOCK_D': _pow2(kw), 'BLOCK_C': _pow2(width)}


class _HSPATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, block_m: int, block_n: int) -> Tensor:
        kern = _kernels()
        q, k, v = (t.contiguous() for t in (query, key, value))
        n, length, kw = q.shape
        width = v.shape[2]
        out = torch.empty(n, length, width, device=q.device, dtype=torch.float32)
        tau = torch.empty(n, length, device=q.device, dtype=torch.float32)
        grid = (_cdiv(length, block_m), n)
        kern.forward[grid](q, k, v, out, tau, length, kw, width, BLOCK_M=block_m, BLOCK_N=block_n,
                              **_sizes(kw, width))
        ctx.save_for_backward(q, k, v, tau)
        ctx.blocks = (block_m, block_n)
        return out.to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor):
        kern = _kernels()
        q, k, v, tau = ctx.saved_tensors
        block_m, block_n = ctx.blocks
        n, length, kw = q.shape
        width = v.shape[2]
        g = grad.contiguous()
        sizes = _sizes(kw, width)
        dq = torch.empty(n, length, kw, device=q.device, dtype=torch.float32)
        mean = torch.empty(n, length, device=q.device, dtype=torch.float32)
        kern.backward_rows[(_cdiv(length, block_m), n)](
            q, k, v, g, tau, dq, mean, length, kw, width, BLOCK_M=block_m, BLOCK_N=block_n, **sizes)
        dk = torch.empty_like(dq)
        dv = torch.empty(n, length, width, device=q.device, dtype=torch.float32)
        kern.backward_keys[(_cdiv(length, block_n), n)](
            q, k, v, g, tau, mean, dk, dv, length, kw, width, BLOCK_M=block_m, BLOCK_N=block_n, **sizes)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def hspa_triton(query: Tensor, key: Tensor, value: Tensor, block_m: int = 32, block_n: int = 64) -> Tensor:
    """Exact ``sparsemax(query @ key^T, dim=-1) @ value``; query, key (N, L, Ck), value (N, L, C).

    block_m query rows and block_n keys per tile (powers of two, at least 16)."""
    if not available():
        raise ValueError("HSPA impl 'triton' needs the triton package: pip install -r requirements-gpu.txt")
    if query.dim() != 3 or key.shape != query.shape or value.dim() != 3 or value.shape[:2] != query.shape[:2]:
        raise ValueError(f'hspa_triton expects query/key (N, L, Ck) and value (N, L, C); got '
                         f'{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}')
    for name, b in (('block_m', block_m), ('block_n', block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f'hspa_triton {name} must be a power of two >= 16, got {b}')
    with torch.autocast(device_type=query.device.type, enabled=False):
        return _HSPATriton.apply(query, key, value, block_m, block_n)
