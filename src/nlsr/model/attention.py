"""The non-local attentions of HSPAN: HSPA (soft thresholding, the package model/hspa/) and the softmax
non-local attention of the paper's ablation.

``nlsr.model.attention.HSPA`` is the published block under its published module path (``model.attention``).
``NORMALIZERS``: how the other non-local attentions (NLSN, CSNLN, PA-EDSR, MSNLAN) turn scores into weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlsr.model.hspa import HSPA, IMPLS, NonLocalEmbeddings, SoftThreshold, soft_threshold, sparsemax_threshold

__all__ = ['HSPA', 'IMPLS', 'NORMALIZERS', 'NonLocalAttention', 'SoftThreshold', 'check_normalizer', 'soft_threshold',
           'softmax_attention', 'sparsemax_threshold']

# Scores to weights: 'softmax' (the published attentions) or 'soft_threshold' (exact sparsemax, HSPA's).
NORMALIZERS = ('softmax', 'soft_threshold')


def check_normalizer(normalizer: str) -> None:
    """ValueError unless ``normalizer`` is one of NORMALIZERS."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be 'softmax' or 'soft_threshold', got {normalizer!r}")


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for q, k (N, L, E) and v (N, L, Ev), without the L x L matrix.

    The CPU kernel of scaled_dot_product_attention keeps memory linear in L only for contiguous inputs with
    E == Ev (otherwise it falls back to the quadratic math path): a narrower q/k is zero-padded to Ev (the
    dot products are unchanged), a narrower v to E (the extra outputs dropped).
    """
    ev = v.shape[-1]
    width = max(q.shape[-1], ev)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else _unit_stride_rows(t) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)
    return out[:, 0, :, :ev]


class NonLocalAttention(NonLocalEmbeddings):
    """Standard non-local attention: x + res_scale * softmax(q k^T) v (the paper's ablation); the
    embeddings' signature (channel=256, reduction=2, res_scale=1, conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.embed(x)
        weights = F.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)
        return self.combine(torch.matmul(weights, v), x)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with stride 1 along its last dim, as the memory-efficient kernels check it literally (a width-1 view
    counts as contiguous, so .contiguous() would keep its stride)."""
    return t if t.stride(-1) == 1 else t.new_empty(t.shape).copy_(t)
