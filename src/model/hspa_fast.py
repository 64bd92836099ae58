"""Exact, memory-bounded High-Similarity-Pass Attention (issue 4).

``hspa_attention(q, k, v, topk)`` returns ``sparsemax(q @ k^T) @ v`` row by row, the same result as the
dense oracle in ``model.attention``, without ever holding the (L x L) score matrix:

* Query rows are processed in blocks; one (N*block x L) score buffer, reused across blocks, is the only
  large work space, so the extra memory is O(block * L + L * C). The block comes from a byte budget.
* Candidates without a top-k: a row's support only holds scores above its threshold tau, and the
  sparsemax threshold of any subset of a row is a lower bound of tau (tau >= max - 1 is the one-element
  case). The row is cut into 32-column strided groups whose maxima come from one vectorised ``amax``
  pass; the threshold of a 32-element subset of those maxima gives a tight bound (of all of them, for
  rows where that is not enough), and only the groups whose maximum exceeds it are gathered and tested
  entry by entry. On random features this leaves about as many candidates as support entries.
* Rows whose candidate groups cover more than an eighth of the groups (compressed scores, e.g. an
  untrained network on a real image) are compacted from their full score rows instead.
* tau of each row comes from a sort of its few candidates (rows with more than ``topk`` candidates are
  sorted in a separate batch: nothing assumes |support| <= topk). Rows with more than max(topk, L/16)
  candidates (near-uniform or all-equal scores) take an exact dense path: tau from the top-``topk``
  scores, redone with 2k while the support reaches k (up to a full sort), output as dense weights @ V.
* The output of the sparse rows is one CSR matrix times V: O(|support| * C) per row, not O(L * C).
* Backward uses the saved support entries (about 20 bytes each) while they fit in the budget, and
  otherwise recomputes the block's scores; dense-path rows are always recomputed. The sparsemax
  Jacobian is applied on the support only: dS_ij = dP_ij - mean_{j' in S_i} dP_ij'.

Scores and thresholds are computed in float32 (float64 when an input is float64) with autocast
disabled inside, so the result is exact under mixed precision too. Device agnostic (CPU and CUDA).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ['hspa_attention', 'choose_block_size', 'DEFAULT_MEMORY_BUDGET']

# Bytes allowed for the per-block score work space when block_size is 0 (and for supports kept for
# backward). 128 MiB keeps blocks large enough that per-op overheads stay small (2048 rows of a 128x128
# map) while a training step's extra memory stays well below the dense algorithm's.
DEFAULT_MEMORY_BUDGET = 128 * 2**20
# Columns per strided group for the candidate search (a trade-off: group maxima vs gathered entries).
_GROUP = 32
# Size of the score subset whose sparsemax threshold bounds a row's threshold from below, and the
# safety margin kept below that bound.
_BOUND_SIZE = 32
_BOUND_MARGIN = 2.0**-10


def choose_block_size(batch: int, length: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                      element_size: int = 4) -> int:
    """Query rows per block so that one (batch * block x length) score buffer fits the budget."""
    per_row = max(1, batch * length * element_size)
    return int(max(1, min(length, memory_budget // per_row)))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # The "CSR is beta" notice is printed once per process by torch; it is noise for users here.
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _crow(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointer for entries sorted by row."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


def _threshold(zs: Tensor) -> Tensor:
    """Sparsemax threshold of rows sorted in descending order (R x k) -> (R,)."""
    csum = zs.cumsum(1) - 1
    ks = torch.arange(1, zs.shape[1] + 1, device=zs.device, dtype=zs.dtype)
    k_sup = (ks * zs > csum).sum(1, keepdim=True)
    return (csum.gather(1, k_sup - 1) / k_sup.to(zs.dtype)).squeeze(1)


def _ragged_threshold(rows: Tensor, z: Tensor, counts: Tensor) -> Tensor:
    """Sparsemax thresholds of ragged rows given as entries (rows ascending, values z; counts per row).

    The rows are padded to the longest one with -2, which lies below every candidate (> bound >= -1 -
    margin) and provably never enters the support, so a padded row has the threshold of its candidates."""
    kmax = int(counts.max())
    start = counts.cumsum(0) - counts
    pos = torch.arange(rows.numel(), device=z.device) - start[rows]
    padded = z.new_full((counts.numel(), kmax), -2.0)
    padded[rows, pos] = z
    return _threshold(padded.sort(1, descending=True).values)


def _block_support(scores: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact sparsemax support of the rows of ``scores`` (R x L), except rows left to the dense path.

    Returns (rows, cols, p, dense_rows): the support entries (rows ascending) with their weights > 0,
    and the rows left to the dense path."""
    n_rows, length = scores.shape
    dev = scores.device
    width = length // _GROUP          # strided groups: group c holds columns {c + t * width}
    main = width * _GROUP
    tail = length - main              # < _GROUP leftover columns form one extra group
    parts = []
    if width:
        # amax over the middle dim keeps the contiguous dim innermost: one fast vectorised pass.
        parts.append(scores[:, :main].view(n_rows, _GROUP, width).amax(1))
    if tail:
        parts.append(scores[:, main:].amax(1, keepdim=True))
    group_max = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    n_groups = group_max.shape[1]
    row_max = group_max.amax(1, keepdim=True)
    group_z = group_max.sub_(row_max)
    # Lower bound of the threshold: the sparsemax threshold of any subset of a row is <= the row's
    # (tau >= max - 1 is the one-element case). The subset taken: maxima of _BOUND_SIZE interleaved sets
    # of groups, spread over the image, so they catch most of the top scores at the cost of one small sort.
    # The small margin keeps the bound below the exact threshold despite rounding.
    subset = group_z
    if n_groups >= 2 * _BOUND_SIZE:
        used = n_groups // _BOUND_SIZE * _BOUND_SIZE
        subset = group_z[:, :used].view(n_rows, -1, _BOUND_SIZE).amax(1)
    bound = _threshold(subset.sort(1, descending=True).values)[:, None] - _BOUND_MARGIN
    # The same expression (s - max > bound) decides groups and entries, so no candidate is lost to rounding.
    cand_groups = group_z > bound
    # Rows whose candidates spread over more than an eighth of the groups (compressed scores) are
    # compacted from their full score rows instead of gathered group by group...
    wide = 8 * cand_groups.sum(1) > n_groups
    if subset is not group_z and bool(wide.any()):
        # ...unless the threshold of all their group maxima, a tighter bound, narrows them down.
        w = wide.nonzero().flatten()
        gz_w = group_z[w]
        bound[w] = _threshold(gz_w.sort(1, descending=True).values)[:, None] - _BOUND_MARGIN
        cand_w = gz_w > bound[w]
        cand_groups[w] = cand_w
        wide[w] = 8 * cand_w.sum(1) > n_groups
    if wide.any():
        cand_groups &= ~wide[:, None]
    g_row, g_id = cand_groups.nonzero(as_tuple=True)   # row-major: sorted by row
    t = torch.arange(_GROUP, device=dev)
    if tail:
        cols = torch.where(g_id[:, None] < width, g_id[:, None] + t * width, main + t)
        valid = cols < length
        cols.clamp_(max=length - 1)
    else:
        cols = g_id[:, None] + t * width
    z = scores.view(-1)[g_row[:, None] * length + cols].sub_(row_max[g_row])
    is_cand = z > bound[g_row]
    if tail:
        is_cand &= valid
    ent_g, ent_t = is_cand.nonzero(as_tuple=True)
    rows, cols, z = g_row[ent_g], cols[ent_g, ent_t], z[ent_g, ent_t]
    wide_rows = wide.nonzero().flatten()
    if wide_rows.numel():
        # In pieces of 1/16 of the block: even if every entry is a candidate, the (row, column) pairs of
        # a piece take at most a quarter of the score block.
        parts = [(rows, cols, z)]
        piece = max(1, n_rows // 16)
        for i in range(0, wide_rows.numel(), piece):
            w = wide_rows[i:i + piece]
            zw = scores[w].sub_(row_max[w])
            er, ec = (zw > bound[w]).nonzero(as_tuple=True)
            parts.append((w[er], ec, zw[er, ec]))
        rows, cols, z = (torch.cat(x) for x in zip(*parts, strict=True))
        order = torch.argsort(rows, stable=True)
        rows, cols, z = rows[order], cols[order], z[order]
    # Every support entry is a candidate, so the threshold of the candidates is the row's. Rows with more
    # than length/16 candidates (near-uniform or all-equal rows) go to the dense path.
    counts = torch.bincount(rows, minlength=n_rows)
    dense = counts > max(topk, length // 16)
    if dense.any():
        keep = ~dense[rows]
        rows, cols, z = rows[keep], cols[keep], z[keep]
        counts = torch.where(dense, 0, counts)
    dense_rows = dense.nonzero().flatten()
    if rows.numel() == 0:
        return rows, cols, z, dense_rows
    # Rows with up to topk candidates (nearly all) are padded and sorted together, the longer ones
    # separately, so that one long row does not pad all the others.
    long_row = counts > topk
    if not bool(long_row.any()):
        tau = _ragged_threshold(rows, z, counts)
    else:
        tau = torch.zeros(n_rows, dtype=z.dtype, device=dev)
        long_entry = long_row[rows]
        for sel in (~long_entry, long_entry):
            if not bool(sel.any()):  # every candidate row is long (or none is)
                continue
            # Compact row ids so that padding spans only the rows of this bucket.
            ids, local, bucket_counts = torch.unique_consecutive(rows[sel], return_inverse=True, return_counts=True)
            tau[ids] = _ragged_threshold(local, z[sel], bucket_counts)
    p = z.sub_(tau[rows])
    keep = p > 0
    return rows[keep], cols[keep], p[keep], dense_rows


def _dense_sparsemax(scores: Tensor, topk: int) -> Tensor:
    """Exact row-wise sparsemax of a dense (h x L) block (only for near-uniform rows).

    tau from the top-k scores, exact when the support found is smaller than k; rows whose support
    reaches k are redone with 2k (up to a full sort)."""
    z = scores - scores.amax(1, keepdim=True)
    length = z.shape[1]
    tau = z.new_empty(z.shape[0])
    todo: Tensor | None = None   # None: all rows
    k = min(length, topk)
    while True:
        rows = z if todo is None else z[todo]
        top = rows.topk(k, 1).values if k < length else rows.sort(1, descending=True).values
        csum = top.cumsum(1) - 1
        ks = torch.arange(1, k + 1, device=z.device, dtype=z.dtype)
        k_sup = (ks * top > csum).sum(1, keepdim=True)
        found = (csum.gather(1, k_sup - 1) / k_sup.to(z.dtype)).squeeze(1)
        if todo is None:
            tau = found
        else:
            tau[todo] = found
        if k == length:
            break
        redo = (k_sup.squeeze(1) == k).nonzero().flatten()
        if redo.numel() == 0:
            break
        todo = redo if todo is None else todo[redo]
        k = min(length, 2 * k)
    return z.sub_(tau[:, None]).clamp_(min=0)


class _Blocks:
    """One call's inputs in the compute dtype, the block layout and a reusable score buffer."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int) -> None:
        dtype = torch.float64 if torch.float64 in (query.dtype, key.dtype, value.dtype) else torch.float32
        self.q = query.to(dtype)
        self.k = key.to(dtype)
        self.v = value.to(dtype)
        self.n, self.length, _ = query.shape
        self.nl = self.n * self.length
        self.topk = topk
        elem = torch.finfo(dtype).bits // 8
        self.block = block_size if block_size > 0 else choose_block_size(self.n, self.length, element_size=elem)
        self.block = min(self.block, self.length)
        # Dense-path rows are handled in pieces of a quarter block: their sort work space is then about
        # one score block.
        self.piece = max(1, self.n * self.block // 4)
        self.k_t = self.k.transpose(1, 2)
        self._buffer: Tensor | None = None  # allocated on first use: a backward with saved supports needs none

    def ranges(self) -> list[tuple[int, int]]:
        return [(r0, min(r0 + self.block, self.length)) for r0 in range(0, self.length, self.block)]

    def scores(self, r0: int, r1: int) -> Tensor:
        """Scores of query rows [r0, r1) of every sample, as (N * (r1 - r0)) x L (sample-major)."""
        b = r1 - r0
        if self._buffer is None:
            self._buffer = self.q.new_empty(self.n * self.block * self.length)
        out = self._buffer[: self.n * b * self.length].view(self.n, b, self.length)
        torch.bmm(self.q[:, r0:r1], self.k_t, out=out)
        return out.view(self.n * b, self.length)

    def support(self, r0: int, r1: int, scores: Tensor) -> tuple[_Entries, Tensor]:
        """Support of block [r0, r1) in global coordinates (row n*L + i, column n*L + j), and the
        global ids of its dense-path rows."""
        b = r1 - r0
        rows, cols, p, dense = _block_support(scores, self.topk)
        sample = rows // b
        entries = _Entries(sample * self.length + r0 + rows % b, sample * self.length + cols, p)
        return entries, (dense // b) * self.length + r0 + dense % b

    def dense_pieces(self, ids: Tensor) -> list[tuple[int, Tensor]]:
        """Global row ids -> [(sample, rows within the sample)] in pieces of at most self.piece rows."""
        samples = ids // self.length
        out = []
        for s in torch.unique(samples).tolist():
            rows = ids[samples == s] - s * self.length
            out += [(int(s), rows[i:i + self.piece]) for i in range(0, rows.numel(), self.piece)]
        return out


class _Entries:
    """Sparse weights in global coordinates: rows and columns in [0, N*L), weights p > 0."""

    __slots__ = ('rows', 'cols', 'p')

    def __init__(self, rows: Tensor, cols: Tensor, p: Tensor) -> None:
        self.rows, self.cols, self.p = rows, cols, p

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.cols, self.p))

    @staticmethod
    def merge(parts: list[_Entries], nl: int) -> _Entries:
        """One entry set sorted by row, then column (the CSR layout)."""
        rows = torch.cat([e.rows for e in parts])
        cols = torch.cat([e.cols for e in parts])
        order = torch.argsort(rows * nl + cols)
        return _Entries(rows[order], cols[order], torch.cat([e.p for e in parts])[order])

    def csr(self, values: Tensor, nl: int, crow: Tensor | None = None) -> Tensor:
        if crow is None:
            crow = _crow(self.rows, nl)
        return _csr(crow, self.cols, values, (nl, nl))


def _forward(blocks: _Blocks, keep: bool, budget: int) -> tuple[Tensor, _Entries | None, Tensor | None, list]:
    """Output (N, L, C); with ``keep``, also what backward needs: the support entries kept within the
    budget, the dense-path row ids of those blocks, and the blocks to recompute."""
    nl = blocks.nl
    v_flat = blocks.v.reshape(nl, -1)
    out = torch.zeros_like(v_flat)
    pending: list[_Entries] = []
    pending_bytes = 0
    dense_ids: list[Tensor] = []
    recompute: list[tuple[int, int]] = []

    def flush(parts: list[_Entries]) -> _Entries | None:
        # The sparse rows all at once: sum_j p_ij v_j costs O(|support| * C) per row.
        if not parts:
            return None
        merged = _Entries.merge(parts, nl)
        out.add_(merged.csr(merged.p, nl) @ v_flat)
        return merged

    for r0, r1 in blocks.ranges():
        scores = blocks.scores(r0, r1)
        entries, dense = blocks.support(r0, r1, scores)
        for s, rows in blocks.dense_pieces(dense):
            local = s * (r1 - r0) + rows - r0
            out[s * blocks.length + rows] = _dense_sparsemax(scores[local], blocks.topk) @ blocks.v[s]
        if keep and pending_bytes + entries.nbytes() > budget:
            recompute.append((r0, r1))          # backward recomputes this block's scores
            flush([entries])
            continue
        if keep:
            dense_ids.append(dense)
        elif pending_bytes + entries.nbytes() > budget:
            flush(pending)
            pending, pending_bytes = [], 0
        pending.append(entries)
        pending_bytes += entries.nbytes()
    saved = flush(pending)
    dense_all = torch.cat(dense_ids) if dense_ids else None
    return out.view(blocks.n, blocks.length, -1), saved, dense_all, recompute


def _sparse_backward(blocks: _Blocks, e: _Entries, g: Tensor, q: Tensor, k: Tensor, v: Tensor,
                     grads: tuple[Tensor, Tensor, Tensor], needs: tuple[bool, bool, bool]) -> None:
    """Accumulate the gradients of out = P V through the sparse rows P (global entries ``e``)."""
    nl = blocks.nl
    dq, dk, dv = grads
    crow = _crow(e.rows, nl)
    # dP on the support only: (G V^T) sampled at the support pattern.
    d_p = torch.sparse.sampled_addmm(e.csr(e.p, nl, crow), g, v.t(), beta=0.0).values()
    # Sparsemax Jacobian on the support: dS_ij = dP_ij - mean over the row's support of dP.
    row_sum = torch.zeros(nl, dtype=d_p.dtype, device=d_p.device).index_add_(0, e.rows, d_p)
    row_mean = row_sum / (crow[1:] - crow[:-1]).clamp(min=1).to(d_p.dtype)
    d_s = d_p - row_mean[e.rows]
    if needs[0]:
        dq.add_(e.csr(d_s, nl, crow) @ k)
    if needs[1] or needs[2]:
        # Transposed pattern (key-major) for dK = dS^T Q and dV = P^T G.
        order = torch.argsort(e.cols, stable=True)
        t = _Entries(e.cols[order], e.rows[order], e.p[order])
        crow_t = _crow(t.rows, nl)
        if needs[1]:
            dk.add_(t.csr(d_s[order], nl, crow_t) @ q)
        if needs[2]:
            dv.add_(t.csr(t.p, nl, crow_t) @ g)


def _dense_backward(blocks: _Blocks, ids: Tensor, g: Tensor, grads: tuple[Tensor, Tensor, Tensor]) -> None:
    """Accumulate the gradients of the dense-path rows ``ids`` (global), recomputing their scores."""
    dq, dk, dv = (t.view(blocks.n, blocks.length, -1) for t in grads)
    g = g.view(blocks.n, blocks.length, -1)
    for s, rows in blocks.dense_pieces(ids):
        q_rows, g_rows = blocks.q[s, rows], g[s, rows]
        p = _dense_sparsemax(q_rows @ blocks.k_t[s], blocks.topk)
        d_p = g_rows @ blocks.v[s].t()
        on = p > 0
        mean = torch.where(on, d_p, 0).sum(1, keepdim=True) / on.sum(1, keepdim=True).to(d_p.dtype)
        d_s = torch.where(on, d_p - mean, 0)
        dq[s].index_add_(0, rows, d_s @ blocks.k[s])
        dk[s].add_(d_s.t() @ q_rows)
        dv[s].add_(p.t() @ g_rows)


def _backward(blocks: _Blocks, saved: _Entries | None, dense_ids: Tensor | None, recompute: list,
              grad: Tensor, needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
    nl = blocks.nl
    q, k, v = (t.reshape(nl, -1) for t in (blocks.q, blocks.k, blocks.v))
    g = grad.to(blocks.q.dtype).reshape(nl, -1)
    grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    if saved is not None and saved.rows.numel():
        _sparse_backward(blocks, saved, g, q, k, v, grads, needs)
    if dense_ids is not None and dense_ids.numel():
        _dense_backward(blocks, dense_ids, g, grads)
    for r0, r1 in recompute:
        entries, dense = blocks.support(r0, r1, blocks.scores(r0, r1))
        if entries.rows.numel():
            _sparse_backward(blocks, _Entries.merge([entries], nl), g, q, k, v, grads, needs)
        if dense.numel():
            _dense_backward(blocks, dense, g, grads)
    return tuple(t.view(blocks.n, blocks.length, -1) for t in grads)


class _HSPAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int,
                budget: int) -> Tensor:
        with torch.autocast(device_type=query.device.type, enabled=False):
            blocks = _Blocks(query, key, value, topk, block_size)
            out, saved, dense_ids, recompute = _forward(blocks, keep=True, budget=budget)
        ctx.save_for_backward(query, key, value)
        ctx.topk, ctx.block_size = topk, blocks.block
        ctx.support = (saved, dense_ids, recompute)
        return out.to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        query, key, value = ctx.saved_tensors
        with torch.autocast(device_type=query.device.type, enabled=False):
            blocks = _Blocks(query, key, value, ctx.topk, ctx.block_size)
            dq, dk, dv = _backward(blocks, *ctx.support, grad, tuple(ctx.needs_input_grad[:3]))
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None


def hspa_attention(query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int = 0,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Tensor:
    """Exact ``sparsemax(query @ key^T, dim=-1) @ value`` in bounded memory.

    query, key: (N, L, Ck); value: (N, L, C). ``topk`` is the candidate count up to which rows are
    thresholded together in the cheapest way (longer rows are handled separately, so the result never
    depends on it). ``block_size`` query rows per block; 0 picks it from ``memory_budget`` (bytes for
    one score block). The support entries (about 20 bytes each) are kept for backward up to
    ``memory_budget`` bytes too; beyond that, backward recomputes the block's scores.
    """
    if query.dim() != 3 or key.shape != query.shape or value.dim() != 3 or value.shape[:2] != query.shape[:2]:
        raise ValueError(f'hspa_attention expects query/key (N, L, Ck) and value (N, L, C); got '
                         f'{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}')
    if topk < 1 or block_size < 0:
        raise ValueError(f'hspa_attention needs topk >= 1 and block_size >= 0; got {topk}, {block_size}')
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _HSPAFunction.apply(query, key, value, topk, block_size, memory_budget)
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, _, _, _ = _forward(_Blocks(query, key, value, topk, block_size), keep=False, budget=memory_budget)
    return out.to(value.dtype)
