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
  weights @ V; backward recomputes each block and applies the sparsemax Jacobian by hand. It is the fallback
  where the kernels cannot be compiled, and what CUDA uses without triton for score tensors too large to
  form whole.

Scores and thresholds are float32 (float64 when an input is float64) with autocast disabled inside, so
the result is exact under mixed precision too. Both run as the registered operator nlsr::hspa_blocked
(backward nlsr::hspa_blocked_backward); the supports kept for backward are its extra outputs
(``pack_supports``), whose entry count the fake implementation leaves symbolic.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor

from nlsr.model.hspa import native
from nlsr.model.hspa.reference import check_attention_inputs, soft_threshold

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
            status = self._fn('hspa_attend')(ctypes.byref(native.AttendArgs(
                q=p(q[r0:r1]), kp=p(packed), rows=rows, length=x.length, kwidth=x.kwidth, v=p(v), width=x.width,
                out=p(out), block_rows=t.block_rows, tile_rows=t.tile_rows, key_tile=t.key_tile, screen=t.screen,
                kp16=p(packed16), keys=p(k), kbounds=p(bounds), sup_cols=p(cols), sup_vals=p(vals),
                capacity=self._capacity() if support else 0, start=p(start), nnz=p(nnz), total=p(total),
                n_threads=self.threads)))
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
            self._fn('hspa_grad_rows')(ctypes.byref(native.GradRowsArgs(
                start=p(start), nnz=p(nnz), cols=p(cols), rows=rows, g=p(g[r0:r1]), v=p(v), width=x.width, k=p(k),
                kwidth=x.kwidth, ds=p(ds), dq=p(dq[s, r0:r1]) if dq is not None else None,
                n_threads=self.threads)))
            if dk is not None or dv is not None:
                status = self._fn('hspa_grad_keys')(ctypes.byref(native.GradKeysArgs(
                    start=p(start), nnz=p(nnz), cols=p(cols), vals=p(vals), ds=p(ds), rows=rows, length=x.length,
                    q=p(q[r0:r1]), kwidth=x.kwidth, g=p(g[r0:r1]), width=x.width,
                    dk=p(dk[s]) if dk is not None else None, dv=p(dv[s]) if dv is not None else None,
                    n_threads=self.threads)))
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
    """Each block recomputed and differentiated by hand, as SoftThreshold's backward does (it runs inside
    a registered operator, below autograd): dS = dP - mean over the support of dP, 0 off the support."""
    g = grad.to(x.q.dtype)
    dq, dk, dv = (torch.zeros_like(t) for t in (x.q, x.k, x.v))
    for s, r0, r1 in x.blocks():
        q, k, v = x.q[s], x.k[s], x.v[s]
        p = soft_threshold(q[r0:r1] @ k.transpose(0, 1), dim=-1, topk=topk)
        gs = g[s, r0:r1]
        dv[s].addmm_(p.transpose(0, 1), gs)
        dp = gs @ v.transpose(0, 1)
        support = p > 0
        zero = torch.zeros((), dtype=dp.dtype, device=dp.device)
        mean = torch.where(support, dp, zero).sum(-1, keepdim=True) / support.sum(-1, keepdim=True).clamp_min(1)
        ds = torch.where(support, dp - mean, zero)
        dq[s, r0:r1] = ds @ k
        dk[s].addmm_(ds.transpose(0, 1), q[r0:r1])
    return tuple(d if need else None for d, need in zip((dq, dk, dv), needs, strict=True))


def pack_supports(supports: list, blocks: list[tuple[int, int, int]], n: int, length: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-block supports (``_Native.forward``'s list; None: recomputed in backward) as the operators'
    outputs: start and nnz per row of all N * L rows (start into the concatenated cols and weights), the
    concatenated cols and weights, and which rows' supports are kept."""
    start, nnz = (torch.zeros(n * length, dtype=torch.int64, device=device) for _ in range(2))
    kept = torch.zeros(n * length, dtype=torch.bool, device=device)
    cols, vals, base = [], [], 0
    for (s, r0, r1), part in zip(blocks, supports, strict=True):
        if part is None:
            continue
        rows = slice(s * length + r0, s * length + r1)
        start[rows], nnz[rows], kept[rows] = part[0] + base, part[1], True
        cols.append(part[2])
        vals.append(part[3])
        base += part[2].numel()
    return (start, nnz, torch.cat(cols) if cols else torch.empty(0, dtype=torch.int32, device=device),
            torch.cat(vals) if vals else torch.empty(0, dtype=dtype, device=device), kept)


def unpack_supports(packed: tuple[Tensor, ...], blocks: list[tuple[int, int, int]], length: int,
                    sample: int = 0) -> list:
    """``pack_supports``' outputs back as the per-block list ``_Native.backward`` takes (block i's start
    relative to its own entries); ``sample``: the first sample of ``blocks``' sample 0."""
    start, nnz, cols, vals, kept = packed
    supports: list = []
    for s, r0, r1 in blocks:
        rows = slice((sample + s) * length + r0, (sample + s) * length + r1)
        if not bool(kept[rows.start]):
            supports.append(None)
            continue
        first = start[rows]
        # A block's entries are contiguous in cols/vals, and its first entry starts a row.
        base, end = int(first.min()), int((first + nnz[rows]).max())
        supports.append((first - base, nnz[rows], cols[base:end], vals[base:end]))
    return supports


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiles(tiles: list[int]) -> native.Tiles | None:
    return native.Tiles(*tiles) if tiles else None


@torch.library.custom_op('nlsr::hspa_blocked', mutates_args=())
def _blocked_op(query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int, memory_budget: int,
                backend: str, tiles: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sparsemax(q k^T) v, and with ``memory_budget`` > 0 on the native back-end the supports kept for
    backward (``pack_supports``)."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        x = _Inputs(query, key, value, block_size)
        if backend == 'native':
            out, supports = _Native(x, native.load(), tiles=_tiles(tiles)).forward(memory_budget)
        else:
            out, supports = _torch_forward(x, topk), [None] * len(x.blocks())
    return (out.to(value.dtype), *pack_supports(supports, x.blocks(), x.n, x.length, x.q.dtype, query.device))


def _fake_supports(n: int, length: int, dtype: torch.dtype, device: torch.device,
                   keeps: bool) -> tuple[Tensor, ...]:
    """The shapes of ``pack_supports``' outputs: the number of kept entries is known only from the data."""
    entries = torch.library.get_ctx().new_dynamic_size() if keeps else 0
    start, nnz = (torch.empty(n * length, dtype=torch.int64, device=device) for _ in range(2))
    return (start, nnz, torch.empty(entries, dtype=torch.int32, device=device),
            torch.empty(entries, dtype=dtype, device=device),
            torch.empty(n * length, dtype=torch.bool, device=device))


@_blocked_op.register_fake
def _(query, key, value, topk, block_size, memory_budget, backend, tiles):
    n, length = query.shape[:2]
    return (value.new_empty(n, length, value.shape[2]),
            *_fake_supports(n, length, _compute_dtype(query, key, value), query.device,
                            backend == 'native' and memory_budget > 0))


@torch.library.custom_op('nlsr::hspa_blocked_backward', mutates_args=())
def _blocked_backward_op(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, start: Tensor, nnz: Tensor,
                         cols: Tensor, vals: Tensor, kept: Tensor, topk: int, block_size: int, backend: str,
                         needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of query, key and value (empty where ``needs`` says not needed)."""
    with torch.autocast(device_type=grad.device.type, enabled=False):
        x = _Inputs(query, key, value, block_size)
        flags = (needs[0], needs[1], needs[2])
        if backend == 'native':
            supports = unpack_supports((start, nnz, cols, vals, kept), x.blocks(), x.length)
            grads = _Native(x, native.load(), grad).backward(supports, flags)
        else:
            grads = _torch_backward(x, topk, grad, flags)
    return tuple(d.to(t.dtype).contiguous() if d is not None else t.new_empty(0)
                 for d, t in zip(grads, (query, key, value), strict=True))


@_blocked_backward_op.register_fake
def _(grad, query, key, value, start, nnz, cols, vals, kept, topk, block_size, backend, needs):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0)  # contiguous, as the kernels write them
                 for t, need in zip((query, key, value), needs, strict=True))


def _blocked_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, value, topk, block_size, _, backend, _ = inputs
    ctx.save_for_backward(query, key, value)
    # The supports are outputs without gradients: attributes, so saved-tensor hooks count only the inputs.
    ctx.supports = output[1:]
    ctx.mark_non_differentiable(*output[1:])
    ctx.topk, ctx.block, ctx.backend = topk, block_size, backend


def _blocked_backward(ctx: Any, grad: Tensor, *_: Any) -> tuple:
    query, key, value = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.nlsr.hspa_blocked_backward(grad, query, key, value, *ctx.supports, ctx.topk, ctx.block,
                                                 ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None, None, None)


_blocked_op.register_autograd(_blocked_backward, setup_context=_blocked_setup)


def needs_grad(*tensors: Tensor) -> bool:
    """Whether a forward over ``tensors`` is differentiated: it then keeps supports for backward."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def blocked_op(query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int, memory_budget: int,
               backend: str, tiles: native.Tiles | None = None) -> Tensor:
    """The registered operator nlsr::hspa_blocked for a resolved ``backend`` (no planning: safe to trace)."""
    budget = memory_budget if needs_grad(query, key, value) else 0
    packed = [] if tiles is None else [tiles.block_rows, tiles.tile_rows, tiles.key_tile, tiles.screen]
    return torch.ops.nlsr.hspa_blocked(query, key, value, topk, block_size, budget, backend, packed)[0]


def hspa_attention(query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int = 0,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str | None = None,
                   tiles: native.Tiles | None = None) -> Tensor:
    """Exact ``sparsemax(query @ key^T, dim=-1) @ value`` over blocks of query rows (the registered operator
    nlsr::hspa_blocked, with its backward nlsr::hspa_blocked_backward).

    query, key: (N, L, Ck); value: (N, L, C). ``topk`` is where the torch back-end's threshold search
    starts (the native one needs none; neither result depends on it). ``block_size``: query rows per
    block (0: about BLOCK_BYTES of scores). ``memory_budget``: bytes of supports kept for backward.
    ``backend``: 'native' or 'torch'; None takes 'native' on the CPU when the kernels compile. ``tiles``:
    the native inference kernel's blocking (None: ``native.tiles_for`` this machine).
    """
    check_attention_inputs('hspa_attention', query, key, value, topk, block_size)
    return blocked_op(query, key, value, topk, block_size, memory_budget, resolve_backend(backend, query.device),
                      tiles)


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
