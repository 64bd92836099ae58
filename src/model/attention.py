"""The non-local attentions of HSPAN: HSPA (soft thresholding, the package model/hspa/) and the softmax
non-local attention of the paper's ablation.

``model.attention.HSPA(channel, reduction=2, res_scale=0.1, topk=128)`` is the published block's import path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.hspa import HSPA, IMPLS, NonLocalEmbeddings, SoftThreshold, soft_threshold, sparsemax_threshold

__all__ = ['HSPA', 'IMPLS', 'NonLocalAttention', 'SoftThreshold', 'soft_threshold', 'sparsemax_threshold']


class NonLocalAttention(NonLocalEmbeddings):
    """Standard non-local attention: x + res_scale * softmax(q k^T) v (the paper's ablation); the
    embeddings' signature (channel=256, reduction=2, res_scale=1, conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.embed(x)
        weights = F.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)
        return self.combine(torch.matmul(weights, v), x)
