"""Exact HSPA as fused Triton kernels, in the flash-attention layout (optional: needs the triton package).

``hspa_triton(q, k, v)`` returns ``sparsemax(q @ k^T) @ v`` without forming the (L x L) scores. The
kernels (kernels.py beside this file) recompute the scores in tiles on every pass:

1. ``threshold``, per query tile: the row maximum m, then Michelot's iteration from tau = m - 1 (one pass
   sums the scores above tau and counts them, the new tau is m + (sum(s - m) - 1) / count) until no row's
   support shrinks, so the threshold is exact, not a fixed number of steps;
2. ``forward``, per query tile and BLOCK_C chunk of value columns: out = sum_j max(s_j - tau, 0) v_j.

Backward keeps tau per row: ``backward_rows`` (per query tile) gets the mean of dP = g v^T over each row's
support and dq; ``backward_keys`` (per key tile) dk; ``backward_values`` (per key tile and value chunk)
dv. dS = dP - mean on the support (the sparsemax Jacobian), 0 elsewhere.

Tiles come from `choose_tiles`, derived from the GPU's shared memory per block (`SHARED_PER_BLOCK`) and
the 255-register limit of a thread; static_check.py compiles every launch it can make for
sm_80/86/89/90 and checks that each fits with no register spills. Inputs of any float dtype are cast to
float32; scores, thresholds and products are IEEE float32 (no TF32). Any L and widths (masked tiles), no
1/sqrt(d) scaling. Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (slowly; for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from nlsr.model.hspa.reference import check_attention_inputs

__all__ = ['MISSING', 'SHARED_PER_BLOCK', 'Tiles', 'available', 'choose_tiles', 'hspa_triton', 'supports',
           'traced_as_constant', 'unsupported_reason']

# Opt-in shared memory per thread block (bytes), CUDA C Programming Guide, "Technical Specifications per
# Compute Capability". A capability not listed gets the smallest entry of its major version, else 64 KiB.
SHARED_PER_BLOCK = {(7, 0): 98_304, (7, 5): 65_536, (8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912,
                    (8, 9): 101_376, (9, 0): 232_448, (10, 0): 232_448, (12, 0): 101_376}
MAX_REGISTERS = 255      # per thread, every architecture since sm_35; passed to ptxas as maxnreg
NUM_WARPS = 4
REDUCTION_CHUNK = 16     # BLOCK_D: the K of every score/dP product; a thread holds (its rows + cols) x K operands
# Shares of a thread's 256-register file (255 usable): the rest holds operands, addresses and loop state.
ACCUMULATOR_REGS = (MAX_REGISTERS + 1) // 8   # the fp32 output accumulator (out, dq, dk or dv chunk)
SCORE_REGS = (MAX_REGISTERS + 1) // 32        # one (BLOCK_M, BLOCK_N) score tile (s, dP and dS coexist)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch configuration of the kernels (every block size a power of two >= 16)."""

    block_m: int     # query rows per tile
    block_n: int     # keys per tile
    block_d: int     # reduction chunk of the query width (scores) and of the value width (dP)
    block_c: int     # value columns per output chunk (forward, dv)
    block_q: int     # padded query width of the dq / dk accumulators (>= kw)
    num_warps: int = NUM_WARPS
    num_stages: int = 1   # the inner loops run kw / 16 trips: pipelining them would cost registers, not time

    def constexprs(self) -> dict[str, int]:
        return {'BLOCK_M': self.block_m, 'BLOCK_N': self.block_n, 'BLOCK_D': self.block_d,
                'BLOCK_C': self.block_c, 'BLOCK_Q': self.block_q}

    def options(self) -> dict[str, int | bool]:
        """Compile options of every launch (also what static_check.py compiles with). No fusion of
        a separate multiply and add: IEEE float32 rounding outside the dots' own FMA chains, whatever
        Triton's default."""
        return {'num_warps': self.num_warps, 'num_stages': self.num_stages, 'maxnreg': MAX_REGISTERS,
                'enable_fp_fusion': False}

    def shared_bytes(self) -> int:
        """Estimated shared memory of the largest kernel: both fp32 operands of its widest product pass
        through shared memory on their way to the dot layout (matches the compiled kernels)."""
        m, n, d, c, q = self.block_m, self.block_n, self.block_d, self.block_c, self.block_q
        operands = max((m + n) * d, m * n + n * c, m * n + n * q, m * n + m * q, m * n + m * c)
        return 4 * operands * max(1, self.num_stages)


MISSING = ("HSPA impl 'triton' needs the triton package: pip install 'nlsr[gpu]' (in a checkout: pip install -r "
           'requirements-gpu.txt)')

def shared_limit(capability: tuple[int, int]) -> int:
    """Shared memory per block of a compute capability (see SHARED_PER_BLOCK)."""
    if capability in SHARED_PER_BLOCK:
        return SHARED_PER_BLOCK[capability]
    same_major = [v for (major, _), v in SHARED_PER_BLOCK.items() if major == capability[0]]
    return min(same_major) if same_major else 65_536


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def choose_tiles(capability: tuple[int, int], kw: int, width: int) -> Tiles:
    """The largest square query/key tile whose score tile, dq/dk accumulator and value chunk fit their
    register shares (ACCUMULATOR_REGS, SCORE_REGS of MAX_REGISTERS) and whose shared memory fits the
    capability's limit; the value chunk is as wide as the accumulator share allows, up to the value width.
    Input dtypes do not enter: the kernels compute from float32 copies."""
    threads = 32 * NUM_WARPS
    block_q = _pow2(kw)
    for block in (64, 32, 16):
        if block * block > SCORE_REGS * threads or block * block_q > ACCUMULATOR_REGS * threads:
            continue
        block_c = min(_pow2(width), 1 << ((ACCUMULATOR_REGS * threads // block).bit_length() - 1))
        tiles = Tiles(block, block, REDUCTION_CHUNK, block_c, block_q)
        if tiles.shared_bytes() <= shared_limit(capability):
            return tiles
    raise ValueError(unsupported_reason(kw))


def unsupported_reason(kw: int) -> str:
    """One line: the query/key width ``kw`` is wider than the smallest tile's dq/dk accumulator holds."""
    return f'hspa_triton supports a query/key width up to {ACCUMULATOR_REGS * 32 * NUM_WARPS // 16}, got {kw}'


def supports(device: torch.device, kw: int, width: int) -> bool:
    """Whether `choose_tiles` has tiles for these widths on ``device`` (the query/key width is bounded, the
    value width is not: it is chunked)."""
    try:
        choose_tiles(_capability(device), kw, width)
    except ValueError:
        return False
    return True


def traced_as_constant(fn: Callable) -> Callable:
    """``fn`` marked as torch.compiler.assume_constant_result marks it (Dynamo calls it while tracing and
    keeps its result as a constant of the graph), without importing torch._dynamo (and with it triton)
    when this module is imported."""
    fn._dynamo_marked_constant = True
    return fn


@traced_as_constant
@functools.cache
def available() -> bool:
    """True when triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Under TRITON_INTERPRET=1 (CPU tensors) any tile runs; take the tightest listed shared-memory limit.
INTERPRETER_CAPABILITY = (8, 6)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, read once per device."""
    if device.type != 'cuda':
        return INTERPRETER_CAPABILITY
    return torch.cuda.get_device_capability(device)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as the current CUDA device while kernels launch: Triton launches on the current device,
    which need not be the tensors' (cuda:1 tensors while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


def _kernels() -> ModuleType:
    from nlsr.model.hspa.triton import kernels  # imports triton, so only when a kernel runs

    return kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_forward(query: Tensor, key: Tensor, value: Tensor, tiles: Tiles) -> tuple[Tensor, Tensor]:
    """(out in value's dtype, tau per row): the threshold and forward kernels on float32 copies."""
    with _on_device(query.device):
        kern = _kernels()
        q, k, v = (t.float().contiguous() for t in (query, key, value))
        n, length, kw = q.shape
        width = v.shape[2]
        const, opts = tiles.constexprs(), tiles.options()
        tau = torch.empty(n, length, device=q.device, dtype=torch.float32)
        kern.threshold[(_cdiv(length, tiles.block_m), n)](
            q, k, tau, length, kw, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, **opts)
        out = torch.empty(n, length, width, device=q.device, dtype=torch.float32)
        kern.forward[(_cdiv(length, tiles.block_m), _cdiv(width, tiles.block_c), n)](
            q, k, v, tau, out, length, kw, width, **_pick(const, kern.forward), **opts)
        return out.to(value.dtype), tau


def triton_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, tau: Tensor,
                    tiles: Tiles) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of query, key and value (in their dtypes) from the forward's ``tau``."""
    with _on_device(grad.device):
        kern = _kernels()
        q, k, v = (t.float().contiguous() for t in (query, key, value))
        const, opts = tiles.constexprs(), tiles.options()
        n, length, kw = q.shape
        width = v.shape[2]
        g = grad.float().contiguous()
        dq = torch.empty(n, length, kw, device=q.device, dtype=torch.float32)
        mean = torch.empty(n, length, device=q.device, dtype=torch.float32)
        kern.backward_rows[(_cdiv(length, tiles.block_m), n)](
            q, k, v, g, tau, dq, mean, length, kw, width, **_pick(const, kern.backward_rows), **opts)
        dk = torch.empty_like(dq)
        kern.backward_keys[(_cdiv(length, tiles.block_n), n)](
            q, k, v, g, tau, mean, dk, length, kw, width, **_pick(const, kern.backward_keys), **opts)
        dv = torch.empty(n, length, width, device=q.device, dtype=torch.float32)
        kern.backward_values[(_cdiv(length, tiles.block_n), _cdiv(width, tiles.block_c), n)](
            q, k, g, tau, dv, length, kw, width, **_pick(const, kern.backward_values), **opts)
        return tuple(t.to(s.dtype) for t, s in zip((dq, dk, dv), (query, key, value), strict=True))


@torch.library.custom_op('nlsr::hspa_triton', mutates_args=())
def _triton_op(query: Tensor, key: Tensor, value: Tensor, tiles: list[int]) -> tuple[Tensor, Tensor]:
    """sparsemax(q k^T) v and the threshold tau of every row (kept for backward)."""
    return triton_forward(query, key, value, Tiles(*tiles))


@_triton_op.register_fake
def _(query, key, value, tiles):
    n, length = query.shape[:2]
    return value.new_empty(n, length, value.shape[2]), query.new_empty(n, length, dtype=torch.float32)


@torch.library.custom_op('nlsr::hspa_triton_backward', mutates_args=())
def _triton_backward_op(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, tau: Tensor,
                        tiles: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of query, key and value."""
    return triton_backward(grad, query, key, value, tau, Tiles(*tiles))


@_triton_backward_op.register_fake
def _(grad, query, key, value, tau, tiles):
    return tuple(t.new_empty(t.shape) for t in (query, key, value))  # contiguous, as the kernels write them


def _triton_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs[:3], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.tiles = inputs[3]


def _triton_grad(ctx: Any, grad: Tensor, _: Any) -> tuple:
    return (*torch.ops.nlsr.hspa_triton_backward(grad, *ctx.saved_tensors, ctx.tiles), None)


_triton_op.register_autograd(_triton_grad, setup_context=_triton_setup)


@traced_as_constant
def _default_tiles(device: torch.device, kw: int, width: int) -> Tiles:
    """`choose_tiles` for the device's capability: a constant to torch.compile (no device query traced)."""
    return choose_tiles(_capability(device), kw, width)


def _pick(constexprs: dict[str, int], kernel: Any) -> dict[str, int]:
    """The block sizes a kernel takes."""
    return {name: value for name, value in constexprs.items() if name in kernel.arg_names}


def hspa_triton(query: Tensor, key: Tensor, value: Tensor, tiles: Tiles | None = None) -> Tensor:
    """Exact ``sparsemax(query @ key^T, dim=-1) @ value``; query, key (N, L, Ck), value (N, L, C).

    tiles: the launch configuration (default: `choose_tiles` for the device's capability and the widths).
    The registered operator nlsr::hspa_triton, with its backward nlsr::hspa_triton_backward."""
    if not available():
        raise ValueError(MISSING)
    check_attention_inputs('hspa_triton', query, key, value)
    if tiles is None:
        tiles = _default_tiles(query.device, query.shape[2], value.shape[2])
    elif any(b < 16 or b & (b - 1) for b in dataclasses.astuple(tiles)[:5]) or tiles.block_q < query.shape[2]:
        raise ValueError(f'hspa_triton tiles must be powers of two >= 16 with block_q >= {query.shape[2]}, '
                         f'got {tiles}')
    with torch.autocast(device_type=query.device.type, enabled=False):
        return torch.ops.nlsr.hspa_triton(query, key, value, list(dataclasses.astuple(tiles)))[0]
