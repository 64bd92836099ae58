"""The HSPA layer: x + res_scale * sparsemax(q k^T) v over all H*W positions, computed as `plan` says."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nlsr.model import common
from nlsr.model.contract import exporting
from nlsr.model.hspa.blocked import DEFAULT_MEMORY_BUDGET, blocked_op, needs_grad
from nlsr.model.hspa.dispatch import Plan, PlanLog, canonical_impl, plan_forward
from nlsr.model.hspa.export import hspa_attention_export
from nlsr.model.hspa.layer import fusable, layer_op
from nlsr.model.hspa.reference import check_attention_inputs, dense_attention
from nlsr.model.hspa.triton import hspa_triton


def attend(p: Plan, query: Tensor, key: Tensor, value: Tensor, topk: int, block_size: int = 0) -> Tensor:
    """``sparsemax(query @ key^T, dim=-1) @ value`` along the path of plan ``p`` (the layer-fused form aside):
    query, key (N, L, Ck); value (N, L, C)."""
    if p.path == 'blocked':
        return blocked_op(query, key, value, topk, block_size, DEFAULT_MEMORY_BUDGET, p.backend)
    if p.path == 'triton':
        return hspa_triton(query, key, value)
    if p.path == 'export':
        return hspa_attention_export(query, key, value, topk)
    return dense_attention(query, key, value, topk)


def hspa(query: Tensor, key: Tensor, value: Tensor, *, impl: str = 'auto', topk: int = 128,
         block_size: int = 0) -> Tensor:
    """The HSPA operator, exact ``sparsemax(query @ key^T, dim=-1) @ value``, with autograd.

    query, key: (N, L, Ck); value: (N, L, C); float32 or float64 (16-bit inputs are computed in float32 and
    returned in value's dtype). ``impl``: 'auto', 'dense', 'blocked' or 'triton', chosen by the one dispatcher
    (``plan``: on the CPU the native blocked kernels, which never hold the (L x L) scores). ``topk`` is where
    the threshold search starts; no result depends on it. ``block_size``: query rows per block of the
    blocked path (0: automatic).
    """
    check_attention_inputs('hspa', query, key, value, topk, block_size)
    p = plan_forward(impl, query.device, query.shape[0], query.shape[1], exporting=exporting(),
                     training=needs_grad(query, key, value), widths=(query.shape[2], value.shape[2]))
    return attend(p, query, key, value, topk, block_size)


class NonLocalEmbeddings(nn.Module):
    """The three 1x1 embeddings of the published non-local attentions (names fixed by released weights),
    with the published defaults."""

    def __init__(self, channel: int = 256, reduction: int = 2, res_scale: float = 1,
                 conv: common.ConvFactory = common.default_conv) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.key_width = channel // reduction  # the query/key embeddings' width
        self.conv_match1 = common.BasicBlock(conv, channel, channel // reduction, 1, bn=False, act=nn.PReLU())
        self.conv_match2 = common.BasicBlock(conv, channel, channel // reduction, 1, bn=False, act=nn.PReLU())
        self.conv_assembly = common.BasicBlock(conv, channel, channel, 1, bn=False, act=nn.PReLU())

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query (N, L, C/r), key (N, L, C/r), value (N, L, C) with L = H * W in row-major order."""
        q = self.conv_match1(x).flatten(2).transpose(1, 2)
        k = self.conv_match2(x).flatten(2).transpose(1, 2)
        v = self.conv_assembly(x).flatten(2).transpose(1, 2)
        return q, k, v

    def combine(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """res_scale * attended (N, L, C) back in NCHW, plus the input."""
        return self.res_scale * attended.transpose(1, 2).reshape(x.shape) + x


class HSPA(NonLocalEmbeddings):
    """High-Similarity-Pass Attention, the published block (channel, reduction=2, res_scale, topk=128).

    impl: 'auto', 'dense', 'blocked' or 'triton' (model.hspa.dispatch.IMPLS; 'fast' is read as 'blocked');
    each forward runs what ``model.hspa.dispatch.plan`` returns for it (the table there), and tells
    ``plan_log`` (shared by a network's layers; set by the Model wrapper) so that each distinct plan is said
    once. Every path computes exact sparsemax: topk only sets where the dense threshold search starts.
    block_size: query rows per block of the blocked path (0: automatic).
    """

    def __init__(
        self,
        channel: int = 256,
        reduction: int = 2,
        res_scale: float = 1,
        conv: common.ConvFactory = common.default_conv,
        topk: int = 128,
        impl: str = 'auto',
        block_size: int = 0,
    ) -> None:
        super().__init__(channel, reduction, res_scale, conv)
        if topk < 1:
            raise ValueError(f'HSPA topk must be a positive integer, got {topk}')
        if block_size < 0:
            raise ValueError(f'HSPA block_size must be >= 0, got {block_size}')
        self.topk = topk
        self.impl = canonical_impl(impl)
        self.block_size = block_size
        self.plan_log = PlanLog()

    def plan(self, x: torch.Tensor) -> Plan:
        """How this forward runs (``dispatch.plan_forward``), said once through ``plan_log`` (not while
        torch.compile traces: the plan is then a constant of the graph)."""
        traced = exporting()
        p = plan_forward(self.impl, x.device, x.shape[0], x.shape[2] * x.shape[3],
                         fusable=not traced and fusable(self, x), exporting=traced,
                         training=needs_grad(x, *self.parameters()), widths=(self.key_width, x.shape[1]))
        if not torch.compiler.is_compiling():
            self.plan_log(p)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.plan(x)
        if p.fused:
            return layer_op(x, self, self.topk, self.block_size, DEFAULT_MEMORY_BUDGET, p.backend)
        q, k, v = self.embed(x)
        return self.combine(attend(p, q, k, v, self.topk, self.block_size), x)

    def extra_repr(self) -> str:
        return f'topk={self.topk}, impl={self.impl}, block_size={self.block_size}'
