"""Triton kernels of model/hspa/triton/launch.py (imported only when the triton impl runs; see there).

All inputs are contiguous float32 (the launcher casts). Every matrix product is a chain of IEEE float32
fused multiply-adds over its reduction axis in a fixed order, reduced in chunks of BLOCK_D columns (of the
query width for the scores, of the value width for dP), so the scores recomputed by different kernels are
the same bits, the support (s > tau) is the same set in every pass, and no operand tile outgrows the
registers. Outputs over the value width get a grid axis per BLOCK_C chunk; dq and dk are BLOCK_Q >= kw
wide. Integer and pointer arguments are not specialised: one compiled variant per tile configuration and
architecture, whatever the shape, which is exactly what static_check.py compiles.
"""

import inspect

import triton
import triton.language as tl


def plain_jit(fn):
    """triton.jit without specialising the sizes or the pointers' alignment (one variant per tile set)."""
    names = list(inspect.signature(fn).parameters)
    return triton.jit(fn, do_not_specialize=[n for n in names if n in ('length', 'kw', 'width')],
                      do_not_specialize_on_alignment=[n for n in names if n.endswith('_ptr')])


@triton.jit
def row_dots(a_ptr, b_ptr, m_idx, n_idx, length, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 dot products a[m_idx] . b[n_idx] of rows of `width` (0 past `length`)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d0 in range(0, width, BLOCK_D):
        d_idx = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + m_idx[:, None] * width + d_idx[None, :],
                    mask=(m_idx[:, None] < length) & (d_idx[None, :] < width), other=0.0)
        b = tl.load(b_ptr + n_idx[:, None] * width + d_idx[None, :],
                    mask=(n_idx[:, None] < length) & (d_idx[None, :] < width), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision='ieee')
    return acc


@triton.jit
def scores(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 scores q[m_idx] . k[n_idx], -inf for keys past the end."""
    s = row_dots(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M, BLOCK_N, BLOCK_D)
    return tl.where((n_idx < length)[None, :], s, float('-inf'))


@plain_jit
def threshold(q_ptr, k_ptr, tau_ptr, length, kw,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """tau per query row: the row maximum, then Michelot's iteration until no row's support shrinks."""
    pid, b = tl.program_id(0), tl.program_id(1)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    m_idx = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_max = tl.full((BLOCK_M,), float('-inf'), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        s = scores(q_ptr, k_ptr, m_idx, off_n + tl.arange(0, BLOCK_N), length, kw, BLOCK_M, BLOCK_N, BLOCK_D)
        row_max = tl.maximum(row_max, tl.max(s, 1))
    tau = row_max - 1.0
    prev = tl.full((BLOCK_M,), length + 1, tl.int32)
    active = tl.full((BLOCK_M,), 1, tl.int32)
    while tl.max(active, 0) > 0:
        total = tl.zeros((BLOCK_M,), tl.float32)
        count = tl.zeros((BLOCK_M,), tl.int32)
        for off_n in range(0, length, BLOCK_N):
            s = scores(q_ptr, k_ptr, m_idx, off_n + tl.arange(0, BLOCK_N), length, kw, BLOCK_M, BLOCK_N, BLOCK_D)
            on = s > tau[:, None]
            total += tl.sum(tl.where(on, s - row_max[:, None], 0.0), 1)
            count += tl.sum(on.to(tl.int32), 1)
        active = ((count < prev) & (count > 0)).to(tl.int32)
        tau = tl.where(active > 0, row_max + (total - 1.0) / tl.maximum(count, 1).to(tl.float32), tau)
        prev = tl.where(active > 0, count, prev)
    tl.store(tau_ptr + b * length + m_idx, tau, mask=m_idx < length)


@plain_jit
def forward(q_ptr, k_ptr, v_ptr, tau_ptr, out_ptr, length, kw, width,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[:, chunk] = sum_j max(s_j - tau, 0) v_j[chunk] for one query tile and one value-column chunk."""
    pid, chunk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    v_ptr += b * length * width
    m_idx = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    c_idx = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    tau = tl.load(tau_ptr + b * length + m_idx, mask=m_idx < length, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        n_idx = off_n + tl.arange(0, BLOCK_N)
        s = scores(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M, BLOCK_N, BLOCK_D)
        p = tl.maximum(s - tau[:, None], 0.0)
        v = tl.load(v_ptr + n_idx[:, None] * width + c_idx[None, :],
                    mask=(n_idx[:, None] < length) & (c_idx[None, :] < width), other=0.0)
        acc = tl.dot(p, v, acc, input_precision='ieee')
    tl.store(out_ptr + b * length * width + m_idx[:, None] * width + c_idx[None, :], acc,
             mask=(m_idx[:, None] < length) & (c_idx[None, :] < width))


@plain_jit
def backward_rows(q_ptr, k_ptr, v_ptr, g_ptr, tau_ptr, dq_ptr, mean_ptr, length, kw, width,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    """For one query tile: the mean of dP over each row's support, then dq = dS k (BLOCK_Q >= kw)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    v_ptr += b * length * width
    g_ptr += b * length * width
    m_idx = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m_idx < length
    tau = tl.load(tau_ptr + b * length + m_idx, mask=row_ok, other=0.0)
    total = tl.zeros((BLOCK_M,), tl.float32)
    count = tl.zeros((BLOCK_M,), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        n_idx = off_n + tl.arange(0, BLOCK_N)
        on = scores(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M, BLOCK_N, BLOCK_D) > tau[:, None]
        d_p = row_dots(g_ptr, v_ptr, m_idx, n_idx, length, width, BLOCK_M, BLOCK_N, BLOCK_D)  # dP = g . v
        total += tl.sum(tl.where(on, d_p, 0.0), 1)
        count += tl.sum(on.to(tl.float32), 1)
    mean = total / tl.maximum(count, 1.0)
    q_idx = tl.arange(0, BLOCK_Q)
    dq = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        n_idx = off_n + tl.arange(0, BLOCK_N)
        on = scores(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M, BLOCK_N, BLOCK_D) > tau[:, None]
        d_p = row_dots(g_ptr, v_ptr, m_idx, n_idx, length, width, BLOCK_M, BLOCK_N, BLOCK_D)  # dP = g . v
        d_s = tl.where(on, d_p - mean[:, None], 0.0)
        k = tl.load(k_ptr + n_idx[:, None] * kw + q_idx[None, :],
                    mask=(n_idx[:, None] < length) & (q_idx[None, :] < kw), other=0.0)
        dq = tl.dot(d_s, k, dq, input_precision='ieee')
    tl.store(dq_ptr + b * length * kw + m_idx[:, None] * kw + q_idx[None, :], dq,
             mask=row_ok[:, None] & (q_idx[None, :] < kw))
    tl.store(mean_ptr + b * length + m_idx, mean, mask=row_ok)


@plain_jit
def backward_keys(q_ptr, k_ptr, v_ptr, g_ptr, tau_ptr, mean_ptr, dk_ptr, length, kw, width,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    """dk = dS^T q for one key tile (BLOCK_Q >= kw), streaming the query tiles."""
    pid, b = tl.program_id(0), tl.program_id(1)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    v_ptr += b * length * width
    g_ptr += b * length * width
    n_idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    q_idx = tl.arange(0, BLOCK_Q)
    dk = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
    for off_m in range(0, length, BLOCK_M):
        m_idx = off_m + tl.arange(0, BLOCK_M)
        row_ok = m_idx < length
        tau = tl.load(tau_ptr + b * length + m_idx, mask=row_ok, other=float('inf'))
        mean = tl.load(mean_ptr + b * length + m_idx, mask=row_ok, other=0.0)
        on = scores(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M, BLOCK_N, BLOCK_D) > tau[:, None]
        d_p = row_dots(g_ptr, v_ptr, m_idx, n_idx, length, width, BLOCK_M, BLOCK_N, BLOCK_D)  # dP = g . v
        d_s = tl.where(on, d_p - mean[:, None], 0.0)
        q = tl.load(q_ptr + m_idx[:, None] * kw + q_idx[None, :],
                    mask=row_ok[:, None] & (q_idx[None, :] < kw), other=0.0)
        dk = tl.dot(tl.trans(d_s), q, dk, input_precision='ieee')
    tl.store(dk_ptr + b * length * kw + n_idx[:, None] * kw + q_idx[None, :], dk,
             mask=(n_idx[:, None] < length) & (q_idx[None, :] < kw))


@plain_jit
def backward_values(q_ptr, k_ptr, g_ptr, tau_ptr, dv_ptr, length, kw, width,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """dv[:, chunk] = P^T g[:, chunk] for one key tile and one value-column chunk."""
    pid, chunk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    g_ptr += b * length * width
    n_idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c_idx = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    dv = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for off_m in range(0, length, BLOCK_M):
        m_idx = off_m + tl.arange(0, BLOCK_M)
        row_ok = m_idx < length
        tau = tl.load(tau_ptr + b * length + m_idx, mask=row_ok, other=float('inf'))
        s = scores(q_ptr, k_ptr, m_idx, n_idx, length, kw, BLOCK_M, BLOCK_N, BLOCK_D)
        p = tl.where(s > tau[:, None], s - tau[:, None], 0.0)
        g = tl.load(g_ptr + m_idx[:, None] * width + c_idx[None, :],
                    mask=row_ok[:, None] & (c_idx[None, :] < width), other=0.0)
        dv = tl.dot(tl.trans(p), g, dv, input_precision='ieee')
    tl.store(dv_ptr + b * length * width + n_idx[:, None] * width + c_idx[None, :], dv,
             mask=(n_idx[:, None] < length) & (c_idx[None, :] < width))
