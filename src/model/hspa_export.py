"""Exact HSPA in a form that exports to ONNX with dynamic batch, height and width.

The eager paths of HSPA choose their algorithm per forward and find each row's threshold by a search whose
number of rounds depends on the data (retry with 2k while the support fills the top k); a traced graph would
freeze whichever branch the sample input took. Here every operation has a shape fixed by the input's shape:

* sparsemax of a score row by a full sort (ONNX TopK with k = row length), cumulative sums, the support
  size from the rank condition 1 + j z_j > sum_{i<=j} z_i, and the threshold gathered at that size: exact
  for every row (ties, supports of any size, all-equal rows), with no branch;
* the query rows are taken in blocks by a scripted loop (an ONNX Loop), so the graph holds one
  (rows x L) score block at a time, never the (L x L) matrix. The rows per block are computed in the graph
  from the dynamic L: max(1, block_scores // L), so each block holds about `block_scores` scores.

Limits: a sort costs O(L log L) per row where the eager kernels do a few linear passes, and a single row
is never split, so one block holds at least L scores (the runtime needs about 24 bytes per score of a
block: the scores, the sorted values and TopK's int64 indices).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Scores per query block of the exported loop (32 Mi: 128 MiB of float32 scores).
BLOCK_SCORES = 2**25


def sparsemax_sorted(scores: Tensor) -> Tensor:
    """Exact sparsemax along the last dimension by a full sort: no data-dependent branch."""
    s = scores - scores.amax(dim=-1, keepdim=True)
    z = torch.sort(s, dim=-1, descending=True).values
    csum = z.cumsum(-1) - 1
    ranks = torch.ones_like(z).cumsum(-1)
    # j is in the support iff 1 + j * z_j > sum_{i<=j} z_i; the rows satisfying it are a prefix of z.
    size = (ranks * z > csum).to(torch.int64).sum(-1, keepdim=True).clamp_min(1)
    tau = csum.gather(-1, size - 1) / size.to(s.dtype)
    return torch.clamp(s - tau, min=0)


def _attend_blocks(query: Tensor, key: Tensor, value: Tensor, block_scores: int) -> Tensor:
    """sparsemax(query key^T) value over blocks of query rows; (N, L, C') x (N, L, C') x (N, L, C)."""
    length = query.size(1)
    rows = max(1, block_scores // max(1, key.size(1)))
    key_t = key.transpose(1, 2)
    parts: list[Tensor] = []
    for start in range(0, length, rows):
        block = query[:, start:start + rows]
        parts.append(torch.matmul(sparsemax_sorted(torch.matmul(block, key_t)), value))
    return torch.cat(parts, dim=1)


@functools.cache
def _scripted_blocks():
    """_attend_blocks compiled by TorchScript (once, on first use), so that tracing records its loop
    as a loop rather than unrolling it at the sample input's length."""
    return torch.jit.script(_attend_blocks)


def exporting() -> bool:
    """True while torch.onnx.export (or torch.jit.trace) records a graph."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def hspa_attention_export(query: Tensor, key: Tensor, value: Tensor, block_scores: int = BLOCK_SCORES) -> Tensor:
    """Exact sparsemax(query key^T) value in float32 (float64 for float64 inputs), as a graph of fixed
    shapes: the rows of each block of about `block_scores` scores sorted in full."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(dtype) for t in (query, key, value))
    return _scripted_blocks()(q, k, v, block_scores)
