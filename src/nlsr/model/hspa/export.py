"""Exact HSPA in a form that exports to ONNX with dynamic batch, height and width.

The eager paths of HSPA (model.hspa.dispatch) choose their algorithm per forward and find each row's threshold
by a search whose number of rounds depends on the data (retry with 2k while the support fills the top k); a
traced graph would freeze whichever branch the sample input took. Here every operation has a shape fixed by
the input's shape:

* sparsemax of the score rows (sparsemax_exact): the threshold of each row's top k scores, then, for
  rows whose support fills them, Michelot's iteration over the whole row: exact for every row (ties,
  supports of any size, all-equal rows); its rounds are an ONNX Loop whose stopping condition onnxruntime
  evaluates, so nothing depends on the sample input;
* the query rows are taken in blocks by a scripted loop (an ONNX Loop), so the graph holds one
  (rows x L) score block at a time, never the (L x L) matrix. The rows per block are computed in the graph
  from the dynamic L: max(1, block_scores // L), so each block holds about `block_scores` scores.

Why not a full sort of each row: onnxruntime's TopK with k = L took about 110 s for one HSPA layer on a
128 x 128 map (2 CPU cores). Limits: a row is never split, so one block holds
at least L scores (the runtime needs about 10 bytes per score of a block: scores, mask, masked copy);
every round scans the whole block, so the block costs as many passes as its slowest row needs.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Scores per query block of the exported loop (32 Mi: 128 MiB of float32 scores).
BLOCK_SCORES = 2**25
# Scores per row whose threshold is found first (HSPA's published topk; the result never depends on it).
TOPK = 128


def sparsemax_exact(scores: Tensor, topk: int = TOPK) -> Tensor:
    """Exact sparsemax along the last dimension, all rows at once, in two stages.

    1. The threshold of the `topk` largest scores of each row (TopK, cumulative sums, the rank condition
       1 + j z_j > sum_{i<=j} z_i): exact for a row whose support is smaller than topk, as in
       model.hspa.reference, and a lower bound of the threshold otherwise.
    2. Rows whose support fills the top k continue over the whole row by Michelot's iteration from that
       bound: tau <- (sum of the scores above tau - 1) / their count until no such row's support shrinks
       (each round removes at least one score of every row still moving: at most n rounds). tau never
       decreases, so the loop ends in floating point too. Scripted, this is a loop whose condition the
       runtime evaluates (zero rounds when every support is inside the top k), not a branch frozen at
       tracing.
    """
    s = scores - scores.amax(dim=-1, keepdim=True)
    n = s.size(-1)
    k = min(max(1, topk), n)
    top = torch.topk(s, k, dim=-1).values
    csum = top.cumsum(-1) - 1
    ranks = torch.ones_like(top).cumsum(-1)
    size = (ranks * top > csum).to(torch.int64).sum(-1, keepdim=True).clamp_min(1)
    tau = csum.gather(-1, size - 1) / size.to(s.dtype)
    moving = size == k
    count = torch.full_like(tau, float(n) + 1.0)
    while bool(moving.any()):
        support = s > tau
        new_count = support.to(s.dtype).sum(-1, keepdim=True)
        total = torch.where(support, s, torch.zeros_like(s)).sum(-1, keepdim=True)
        tau = torch.where(moving, torch.maximum(tau, (total - 1) / new_count), tau)
        moving = moving & (new_count < count)
        count = new_count
    return torch.clamp(s - tau, min=0)


def _attend_blocks(query: Tensor, key: Tensor, value: Tensor, topk: int, block_scores: int) -> Tensor:
    """sparsemax(query key^T) value over blocks of query rows; (N, L, C') x (N, L, C') x (N, L, C)."""
    length = query.size(1)
    rows = max(1, block_scores // max(1, key.size(1)))
    key_t = key.transpose(1, 2)
    parts: list[Tensor] = []
    for start in range(0, length, rows):
        block = query[:, start:start + rows]
        parts.append(torch.matmul(sparsemax_exact(torch.matmul(block, key_t), topk), value))
    return torch.cat(parts, dim=1)


@functools.cache
def _scripted(name: str):
    """A function of this module compiled by TorchScript (once, on first use): tracing then records its
    loops as loops rather than unrolling them at the sample input."""
    return torch.jit.script(globals()[name])


def sparsemax_graph(scores: Tensor, topk: int = TOPK) -> Tensor:
    """sparsemax_exact, scripted: what a traced graph calls."""
    return _scripted('sparsemax_exact')(scores, topk)


def hspa_attention_export(query: Tensor, key: Tensor, value: Tensor, topk: int = TOPK,
                          block_scores: int = BLOCK_SCORES) -> Tensor:
    """Exact sparsemax(query key^T) value in float32 (float64 for float64 inputs), scripted for tracing:
    query rows in blocks of about `block_scores` scores; `topk` only sets where each row's threshold search
    starts."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(dtype) for t in (query, key, value))
    return _scripted('_attend_blocks')(q, k, v, topk, block_scores)
