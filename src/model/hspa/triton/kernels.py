"""Triton kernels of model/hspa/triton/launch.py (imported only when the triton impl runs; see there)."""

import triton
import triton.language as tl


@triton.jit
def scores(q, k_ptr, off_n, length, d_idx, kw, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 scores of the query tile q against keys [off_n, off_n + BLOCK_N)."""
    n_idx = off_n + tl.arange(0, BLOCK_N)
    k = tl.load(k_ptr + n_idx[:, None] * kw + d_idx[None, :],
                mask=(n_idx[:, None] < length) & (d_idx[None, :] < kw), other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision='ieee')
    return tl.where((n_idx < length)[None, :], s, float('-inf')), n_idx


@triton.jit
def forward(q_ptr, k_ptr, v_ptr, out_ptr, tau_ptr, length, kw, width,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    v_ptr += b * length * width
    m_idx = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d_idx = tl.arange(0, BLOCK_D)
    c_idx = tl.arange(0, BLOCK_C)
    q = tl.load(q_ptr + m_idx[:, None] * kw + d_idx[None, :],
                mask=(m_idx[:, None] < length) & (d_idx[None, :] < kw), other=0.0).to(tl.float32)
    row_max = tl.full((BLOCK_M,), float('-inf'), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        s, _ = scores(q, k_ptr, off_n, length, d_idx, kw, BLOCK_N)
        row_max = tl.maximum(row_max, tl.max(s, 1))
    tau = row_max - 1.0
    prev = tl.full((BLOCK_M,), length + 1, tl.int32)
    active = tl.full((BLOCK_M,), 1, tl.int32)
    while tl.max(active, 0) > 0:
        total = tl.zeros((BLOCK_M,), tl.float32)
        count = tl.zeros((BLOCK_M,), tl.int32)
        for off_n in range(0, length, BLOCK_N):
            s, _ = scores(q, k_ptr, off_n, length, d_idx, kw, BLOCK_N)
            on = s > tau[:, None]
            total += tl.sum(tl.where(on, s - row_max[:, None], 0.0), 1)
            count += tl.sum(on.to(tl.int32), 1)
        active = ((count < prev) & (count > 0)).to(tl.int32)
        tau = tl.where(active > 0, row_max + (total - 1.0) / tl.maximum(count, 1).to(tl.float32), tau)
        prev = tl.where(active > 0, count, prev)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        s, n_idx = scores(q, k_ptr, off_n, length, d_idx, kw, BLOCK_N)
        p = tl.maximum(s - tau[:, None], 0.0)
        v = tl.load(v_ptr + n_idx[:, None] * width + c_idx[None, :],
                    mask=(n_idx[:, None] < length) & (c_idx[None, :] < width), other=0.0).to(tl.float32)
        acc += tl.dot(p, v, input_precision='ieee')
    tl.store(out_ptr + b * length * width + m_idx[:, None] * width + c_idx[None, :], acc,
             mask=(m_idx[:, None] < length) & (c_idx[None, :] < width))
    tl.store(tau_ptr + b * length + m_idx, tau, mask=m_idx < length)


@triton.jit
def backward_rows(q_ptr, k_ptr, v_ptr, g_ptr, tau_ptr, dq_ptr, mean_ptr, length, kw, width,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1)
    q_ptr += b * length * kw
    k_ptr += b * length * kw
    v_ptr += b * length * width
    m_idx = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d_idx = tl.arange(0, BLOCK_D)
    c_idx = tl.arange(0, BLOCK_C)
    row_ok = m_idx < length
    q = tl.load(q_ptr + m_idx[:, None] * kw + d_idx[None, :],
                mask=row_ok[:, None] & (d_idx[None, :] < kw), other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * length * width + m_idx[:, None] * width + c_idx[None, :],
                mask=row_ok[:, None] & (c_idx[None, :] < width), other=0.0).to(tl.float32)
    tau = tl.load(tau_ptr + b * length + m_idx, mask=row_ok, other=0.0)
    total = tl.zeros((BLOCK_M,), tl.float32)
    count = tl.zeros((BLOCK_M,), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        s, n_idx = scores(q, k_ptr, off_n, length, d_idx, kw, BLOCK_N)
        v = tl.load(v_ptr + n_idx[:, None] * width + c_idx[None, :],
                    mask=(n_idx[:, None] < length) & (c_idx[None, :] < width), other=0.0).to(tl.float32)
        on = s > tau[:, None]
        d_p = tl.dot(g, tl.trans(v), input_precision='ieee')
        total += tl.sum(tl.where(on, d_p, 0.0), 1)
        count += tl.sum(on.to(tl.float32), 1)
    mean = total / tl.maximum(count, 1.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for off_n in range(0, length, BLOCK_N):
        s, n_idx = scores(q, k_ptr, off_n, length, d_idx, kw, BLOCK_N)
        v = tl.load(v_ptr + n_idx[:, None] * width + c_idx[None, :],
                    mask=(n_idx[:, None] < length) & (c_idx[None, :] < width), other=0.0).to(tl.float32)
        k = tl.load(k_ptr + n_idx[:, None] * kw + d_idx[None, :],
                    mask=(n_idx[:, None] < length) & (d_idx[None, :] < kw), other=0.0).to(tl.float32)
        d_s = tl.where(s > tau[:, None], tl.dot(g, tl.trans(v), input_precision='ieee') - mean[:, None], 0.0)
        dq += tl.dot(d_s, k, input_precision='ieee')
    tl.store(dq_ptr + b * length * kw + m_idx[:, None] * kw + d_idx[None, :], dq,
             mask=row_ok[:, None] & (d_idx[None, :] < kw))
    tl.store(mean_ptr + b * length + m_idx, mean, mask=row_ok)


@triton.jit
def backward_keys(q_ptr, k_ptr, v_ptr, g_ptr, tau_ptr, mean_ptr, dk_ptr, dv_ptr, length, kw, width,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1)
    q_ptr += b * length * kw
    g_ptr += b * length * width
    n_idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    d_idx = tl.arange(0, BLOCK_D)
    c_idx = tl.arange(0, BLOCK_C)
    col_ok = n_idx < length
    k = tl.load(k_ptr + b * length * kw + n_idx[:, None] * kw + d_idx[None, :],
                mask=col_ok[:, None] & (d_idx[None, :] < kw), other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * length * width + n_idx[:, None] * width + c_idx[None, :],
                mask=col_ok[:, None] & (c_idx[None, :] < width), other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for off_m in range(0, length, BLOCK_M):
        m_idx = off_m + tl.arange(0, BLOCK_M)
        row_ok = m_idx < length
        q = tl.load(q_ptr + m_idx[:, None] * kw + d_idx[None, :],
                    mask=row_ok[:, None] & (d_idx[None, :] < kw), other=0.0).to(tl.float32)
        g = tl.load(g_ptr + m_idx[:, None] * width + c_idx[None, :],
                    mask=row_ok[:, None] & (c_idx[None, :] < width), other=0.0).to(tl.float32)
        tau = tl.load(tau_ptr + b * length + m_idx, mask=row_ok, other=float('inf'))
        mean = tl.load(mean_ptr + b * length + m_idx, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision='ieee')                       # (BLOCK_M, BLOCK_N)
        on = (s > tau[:, None]) & col_ok[None, :]
        p = tl.where(on, s - tau[:, None], 0.0)
        d_s = tl.where(on, tl.dot(g, tl.trans(v), input_precision='ieee') - mean[:, None], 0.0)
        dk += tl.dot(tl.trans(d_s), q, input_precision='ieee')
        dv += tl.dot(tl.trans(p), g, input_precision='ieee')
    tl.store(dk_ptr + b * length * kw + n_idx[:, None] * kw + d_idx[None, :], dk,
             mask=col_ok[:, None] & (d_idx[None, :] < kw))
    tl.store(dv_ptr + b * length * width + n_idx[:, None] * width + c_idx[None, :], dv,
             mask=col_ok[:, None] & (c_idx[None, :] < width))
