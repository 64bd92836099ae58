"""Exact, memory-bounded HSPA: ``sparsemax(q @ k^T) @ v`` without the (L x L) score matrix.

``hspa_attention(q, k, v, topk)`` has two back-ends:

* ``native`` (CPU; the C kernels of model/hspa/native/hspa_kernel.c): one fused kernel call per sample (per
  block of query rows with gradients): each thread scores a few query rows with its own micro-kernel, finds
  each row's exact threshold by Michelot's iteration on the few scores above a lower bound (no sort) and
  adds up sum_j p_j v_j over the support, O(|support| * C) instead of O(L * C), while the rows are in its
  cache. In float32 on CPUs with AVX512-BF16 a block is scored with bf16 products first, and the entries
  within their error bound of the threshold again in float32: exact too. With gradients the kernel also
  writes each row's support, kept for backward while the supports fit in ``memory_budget`` (blocks beyond
  it are recomputed). Backward applies the sparsemax Jacobian on the support only (dS = dP - mean over the
  support of dP) and gets dK and dV through a transpose of the block's supports.
* ``torch`` (any device): the block's weights from ``model.hspa.reference.soft_threshold`` and a dense
  weights @ V; backward recomputes each block and differentiates it with autograd. It is the fallback
  where the kernels cannot be compiled, and what CUDA uses without triton for score tensors too large to
  form whole.

Scores and thresholds are float32 (float64 when an input is float64) with autocast disabled inside, so
the result is exact under mixed precision too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model.hspa import native
from model.hspa.reference import soft_threshold

__all__ = ['DEFAULT_MEMORY_BUDGET', 'BLOCK_BYTES', 'choose_block_size', 'hspa_attention', 'resolve_backend']

# Block size when block_size is 0: query rows whose scores take about this much (the torch back-end forms
# them; the native kernel blocks by itself, and its blocks are the units of supports kept for backward).
# Large blocks mean few calls (a 16x48x48 training batch: one block per sample).
BLOCK_BYTES = 32 * 2**20
# Bytes of supports (start and count per row, column and weight per entry) kept from forward for backward.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def choose_block_size(length: int, element_size: int = 4, block_bytes: int = BLOCK_BYTES) -> int:
    """Query rows per block so that one (block x length) score buffer takes about ``block_bytes``
    (at least 32 rows, at most L)."""
    return int(max(1, min(length, max(32, block_bytes // max(1, length * element_size)))))


def support_bytes(support: tuple[Tensor, ...] | None) -> int:
    """Bytes held by one block's kept support (start, nnz, cols, p); 0 for None (a block recomputed in backward)."""
    return 0 if support is None else sum(t.numel() * t.element_size() for t in support)


class _Inputs:
    """One call's query, key and value in the compute dtype (as given: often strided views of the
    embeddings), with the block layout."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, block_size: int) -> None:
        dtype = torch.float64 if torch.float64 in (query.dtype, key.dtype, value.dtype) else torch.float32
        self.q, self.k, self.v = (t.to(dtype) for t in (query, key, value))
        self.n, self.length, self.kwidth = self.q.shape
        self.width = self.v.shape[2]
        elem = torch.finfo(dtype).bits // 8
        self.block = min(self.length, block_size if block_size > 0 else choose_block_size(self.length, elem))

    def blocks(self) -> list[tuple[int, int, int]]:
        """(sample, first row, end row) of every block."""
        return [(s, r0, min(r0 + self.block, self.length))
                for s in range(self.n) for r0 in range(0, self.length, self.block)]


class _Native:
    """The C kernels over one pass (forward, or backward with ``grad``) of one call's blocks;
    ``supports[i]`` is block i's (start, nnz, cols, p) or None (see ``run``)."""

    def __init__(self, x: _Inputs, lib: Any, grad: Tensor | None = None, entries: tuple | None = None,
                 tiles: native.Tiles | None = None) -> None:
        self.x, self.lib, self.grad = x, lib, grad
        self.tiles = tiles or native.tiles_for(lib, x.length, x.kwidth, x.q.dtype)
        self.threads = max(1, torch.get_num_threads())
        # (columns, weights) room for one block's support entries: the one given (a caller's, reused across
        # calls) or made on first use; it grows when a block needs more.
        self.entries = entries
        self._sample: tuple = (-1,)  # (s, q, packed k, v[, grad]) of the last sample made contiguous

    def _fn(self, name: str):
        return native.function(self.lib, name, self.x.q.dtype)

    def _contiguous(self, s: int) -> tuple[Tensor, ...]:
        """Sample s's q, keys packed for the kernel, v (and the pass's grad), contiguous: one sample at a
        time, so the copies stay small."""
        if self._sample[0] != s:
            x = self.x
            q, k, v = (t[s].to(x.q.dtype).contiguous() for t in (x.q, x.k, x.v))
            lanes = native.column_tile(self.lib, x.q.dtype)
            padded = -(-x.length // lanes) * lanes
            packed = torch.empty(padded * x.kwidth, dtype=x.q.dtype)
            self._fn('hspa_pack_keys')(native.ptr(k), x.length, x.kwidth, native.ptr(packed))
            screened = (None, None)
            if self.tiles.screen and x.q.dtype == torch.float32 and native.screens(self.lib):
                screened = (torch.empty(padded * -(-x.kwidth // 2), dtype=torch.int32), torch.empty(2))
                self.lib.hspa_pack_keys_bf16(native.ptr(k), x.length, x.kwidth, *map(native.ptr, screened))
            grad = () if self.grad is None else (self.grad[s].to(x.q.dtype).contiguous(),)
            self._sample = (s, q, k, packed, screened, v, *grad)
        return self._sample[1:]

    def run(self, s: int, r0: int, r1: int, out: Tensor | None, support: bool) -> tuple[Tensor, ...] | None:
        """Rows [r0, r1) of sample s through the fused kernel: their output into ``out`` (None: not wanted)
        and, with ``support``, their supports (start, nnz, cols, p): row i's columns and weights are
        entries start[i] .. start[i] + nnz[i] of cols and p, views of the pass's buffer ``entries`` until the
        next call."""
        x, p = self.x, native.ptr
        q, k, packed, (packed16, bounds), v = self._contiguous(s)[:5]
        rows, t = r1 - r0, self.tiles
        start = nnz = None
        total = torch.zeros(1, dtype=torch.int64)
        if support:
            start, nnz = (torch.empty(rows, dtype=torch.int64) for _ in range(2))
            if self._capacity() < rows:
                self._make_entries(rows * min(x.length, 128))
        while True:
            cols, vals = self.entries if support else (None, None)
            status = self._fn('hspa_attend')(
                p(q[r0:r1]), p(packed), rows, x.length, x.kwidth, p(v), x.width, p(out), t.block_rows,
                t.tile_rows, t.key_tile, t.screen, p(packed16), p(k), p(bounds), p(cols),
                p(vals), self._capacity() if support else 0, p(start), p(nnz), p(total), self.threads)
            if status == -2:
                raise ValueError(f'HSPA kernel: no tile configuration {t}')
            if status != 0:
                raise MemoryError('HSPA: out of memory for the kernel work space')
            needed = int(total)
            if not support:
                return None
            if needed <= self._capacity():
                return start, nnz, cols[:needed], vals[:needed]
            self._make_entries(needed + needed // 4)  # the block again, with room for all its entries

    def _capacity(self) -> int:
        """Support entries ``entries`` has room for (0: none yet, or not int32 columns and weights of this
        pass's dtype)."""
        if self.entries is None:
            return 0
        cols, vals = self.entries
        if cols.dtype != torch.int32 or vals.dtype != self.x.q.dtype:
            return 0
        return min(cols.numel(), vals.numel())

    def _make_entries(self, size: int) -> None:
        self.entries = (torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=self.x.q.dtype))

    def forward(self, keep_bytes: int) -> tuple[Tensor, list]:
        x = self.x
        out = torch.empty(x.n, x.length, x.width, dtype=x.q.dtype)
        if keep_bytes <= 0:
            for s in range(x.n):
                self.run(s, 0, x.length, out[s], support=False)
            return out, [None] * len(x.blocks())
        supports: list = []
        kept = 0
        for s, r0, r1 in x.blocks():
            part = self.run(s, r0, r1, out[s, r0:r1], support=True)
            size = support_bytes(part)
            if kept + size <= keep_bytes:
                supports.append(tuple(t.clone() for t in part))  # out of the reused buffer
                kept += size
            else:
                supports.append(None)  # recomputed in backward
        return out, supports

    def backward(self, supports: list, needs: tuple[bool, bool, bool]) -> tuple[Tensor, ...]:
        """Gradients of q, k and v (None where not needed) for the pass's ``grad``."""
        x, p = self.x, native.ptr
        dq, dk, dv = (torch.zeros(x.n, x.length, width, dtype=x.q.dtype) if need else None
                      for width, need in zip((x.kwidth, x.kwidth, x.width), needs, strict=True))
        for (s, r0, r1), saved in zip(x.blocks(), supports, strict=True):
            q, k, _, _, v, g = self._contiguous(s)
            start, nnz, cols, vals = saved if saved is not None else self.run(s, r0, r1, None, support=True)
            ds = torch.empty_like(vals)
            rows = r1 - r0
            self._fn('hspa_grad_rows')(p(start), p(nnz), p(cols), rows, p(g[r0:r1]), p(v), x.width, p(k),
                                       x.kwidth, p(ds), p(dq[s, r0:r1]) if dq is not None else None,
                                       self.threads)
            if dk is not None or dv is not None:
                status = self._fn('hspa_grad_keys')(
                    p(start), p(nnz), p(cols), p(vals), p(ds), rows, x.length, p(q[r0:r1]), x.kwidth,
                    p(g[r0:r1]), x.width, p(dk[s]) if dk is not None else None,
                    p(dv[s]) if dv is not None else None, self.threads)
                if status != 0:
                    raise MemoryError('HSPA backward: out of memory for a block transpose')
        return dq, dk, dv


def _torch_block(q: Tensor, k: Tensor, v: Tensor, r0: int, r1: int, topk: int) -> Tensor:
    """Output rows [r0, r1) of one sample."""
    return soft_threshold(q[r0:r1] @ k.transpose(0, 1), dim=-1, topk=topk) @ v


def _torch_forward(x: _Inputs, topk: int) -> Tensor:
    out = torch.empty(x.n, x.length, x.width, dtype=x.q.dtype, device=x.q.device)
    for s, r0, r1 in x.blocks():
        out[s, r0:r1] = _torch_block(x.q[s], x.k[s], x.v[s], r0, r1, topk)
    return out


def _torch_backward(x: _Inputs, topk: int, grad: Tensor, needs: tuple[bool, bool, bool]) -> tuple[Tensor, ...]:
    g = grad.to(x.q.dtype)
    dq, dk, dv = (torch.zeros_like(t) for t in (x.q, x.k, x.v))
    for s, r0, r1 in x.blocks():
        with torch.enable_grad():
            leaves = [t[s].detach().requires_grad_(True) for t in (x.q, x.k, x.v)]
            out = _torch_block(*leaves, r0, r1, topk)
            grads = torch.autograd.grad(out, leaves, g[s, r0:r1])
        for acc, part in zip((dq, dk, dv), grads, strict=True):
            acc[s].add_(part)
    return tuple(d if need else None for d, need in zip((dq, dk, dv), needs, strict=True))


class _HSPAFunction(torch.autograd.Function):
    """Keeps the inputs as given (views the autograd graph holds anyway) and the native supports; the
    contiguous compute-dtype copies of _Inputs live only while a pass runs."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int,
                memory_budget: int, backend: str, tiles: native.Tiles | None) -> Tensor:
        with torch.autocast(device_type=query.device.type, enabled=False):
            x = _Inputs(query, key, value, block_size)
            if backend == 'native':
                out, ctx.supports = _Native(x, native.load(), tiles=tiles).forward(
                    memory_budget if any(ctx.needs_input_grad[:3]) else 0)
            else:
                out = _torch_forward(x, topk)
        ctx.save_for_backward(query, key, value)
        ctx.topk, ctx.backend, ctx.block = topk, backend, x.block
        return out.to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor):
        needs = tuple(ctx.needs_input_grad[:3])
        query, key, value = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            x = _Inputs(query, key, value, ctx.block)
            if ctx.backend == 'native':
                grads = _Native(x, native.load(), grad).backward(ctx.supports, needs)
            else:
                grads = _torch_backward(x, ctx.topk, grad, needs)
        dtypes = (query.dtype, key.dtype, value.dtype)
        grads = tuple(None if d is None else d.to(dtype) for d, dtype in zip(grads, dtypes, strict=True))
        return (*grads, None, None, None, None, None)


def hspa_attention(query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int = 0,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str | None = None,
                   tiles: native.Tiles | None = None) -> Tensor:
    """Exact ``sparsemax(query @ key^T, dim=-1) @ value`` over blocks of query rows.

    query, key: (N, L, Ck); value: (N, L, C). ``topk`` is where the torch back-end's threshold search
    starts (the native one needs none; neither result depends on it). ``block_size``: query rows per
    block (0: about BLOCK_BYTES of scores). ``memory_budget``: bytes of supports kept for backward.
    ``backend``: 'native' or 'torch'; None takes 'native' on the CPU when the kernels compile. ``tiles``:
    the native inference kernel's blocking (None: ``native.tiles_for`` this machine).
    """
    if query.dim() != 3 or key.shape != query.shape or value.dim() != 3 or value.shape[:2] != query.shape[:2]:
        raise ValueError(f'hspa_attention expects query/key (N, L, Ck) and value (N, L, C); got '
                         f'{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}')
    if topk < 1 or block_size < 0:
        raise ValueError(f'hspa_attention needs topk >= 1 and block_size >= 0; got {topk}, {block_size}')
    backend = resolve_backend(backend, query.device)
    return _HSPAFunction.apply(query, key, value, topk, block_size, memory_budget, backend, tiles)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """'native' or 'torch' for tensors on ``device``: None takes 'native' on the CPU where the kernels
    compile; an explicit 'native' that cannot run raises ValueError (never another back-end in its name)."""
    if backend is None:
        return 'native' if device.type == 'cpu' and native.load() is not None else 'torch'
    if backend not in ('native', 'torch'):
        raise ValueError(f"HSPA backend must be 'native' or 'torch', got {backend!r}")
    if backend == 'native' and (device.type != 'cpu' or native.load() is None):
        raise ValueError(f'the native HSPA kernel needs CPU tensors and a C compiler '
                         f'({native.unavailable_reason() or "tensors are on " + str(device)})')
    return backend
