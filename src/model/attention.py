"""The non-local attentions of HSPAN: HSPA (soft thresholding) and softmax non-local attention.

`soft_threshold` (model/sparsemax.py) is the operator of the HSPAN paper. `HSPA` runs either the published
dense algorithm (the (L x L) scores; the test oracle) or the exact blocked one of model/hspa_blocked.py;
`impl='auto'` picks by device and size (see `choose_impl`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import common, hspa_export, hspa_kernel, hspa_triton
from model.hspa_blocked import hspa_attention
from model.hspa_layer import fusable, hspa_layer
from model.sparsemax import SoftThreshold, soft_threshold, sparsemax_threshold

__all__ = ['HSPA', 'IMPLS', 'NonLocalAttention', 'SoftThreshold', 'choose_impl', 'describe_impl', 'soft_threshold',
           'sparsemax_threshold']


class _Embeddings(nn.Module):
    """The three 1x1 embeddings of the published non-local attentions (names fixed by released weights)."""

    def __init__(self, channel: int, reduction: int, res_scale: float, conv: common.ConvFactory) -> None:
        super().__init__()
        self.res_scale = res_scale
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


IMPLS = ('auto', 'dense', 'fast', 'triton')
# impl='auto' on CUDA forms the whole score tensor while it takes at most this share of free memory.
CUDA_DENSE_SHARE = 0.25


def choose_impl(impl: str, device: torch.device, batch: int, length: int, element_size: int = 4) -> str:
    """The algorithm of one forward: 'dense', 'fast' or 'triton'. 'auto': on the CPU always 'fast' (exact
    and faster at every size measured, see benchmarks/README.md); on CUDA 'dense' while the (batch, L, L)
    scores take at most CUDA_DENSE_SHARE of the free memory, else 'triton' (or 'fast', its torch
    back-end, without the triton package)."""
    if impl != 'auto':
        return impl
    if device.type != 'cuda':
        return 'fast'
    free, _ = torch.cuda.mem_get_info(device)
    if batch * length * length * element_size <= CUDA_DENSE_SHARE * free:
        return 'dense'
    return 'triton' if hspa_triton.available() else 'fast'


def describe_impl(impl: str, device: torch.device) -> str:
    """One line saying which HSPA algorithm `impl` runs on `device`."""
    if impl == 'dense':
        return 'HSPA: dense (published algorithm, the full L x L scores)'
    if impl == 'triton':
        return 'HSPA: triton (fused exact kernels)'
    if device.type == 'cpu':
        blocked = (f'blocked exact, {hspa_kernel.describe()}' if hspa_kernel.load() is not None
                   else f'blocked exact, torch back-end ({hspa_kernel.unavailable_reason()})')
    else:
        blocked = 'blocked exact, torch back-end'
    if impl == 'fast':
        return f'HSPA: fast ({blocked})'
    if device.type == 'cuda':
        large = 'triton (fused exact kernels)' if hspa_triton.available() else f'fast ({blocked})'
        return f'HSPA: auto (dense while the scores take <= {CUDA_DENSE_SHARE:.0%} of free GPU memory, else {large})'
    return f'HSPA: auto -> fast ({blocked})'


class HSPA(_Embeddings):
    """High-Similarity-Pass Attention: x + res_scale * sparsemax(q k^T) v over all H*W positions.

    impl: 'dense' forms the (L, L) scores (published arithmetic); 'fast' calls model.hspa_layer.hspa_layer
    (the whole layer, embeddings recomputed in backward) or, for embeddings it does not cover,
    model.hspa_blocked.hspa_attention (same result, memory bounded, native kernels on the CPU); 'triton'
    the fused kernels of model.hspa_triton (CUDA); 'auto' chooses per forward with `choose_impl`.
    block_size: query rows per block of 'fast' (0: automatic).
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
        if impl not in IMPLS:
            raise ValueError(f"HSPA impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        if topk < 1:
            raise ValueError(f'HSPA topk must be a positive integer, got {topk}')
        if block_size < 0:
            raise ValueError(f'HSPA block_size must be >= 0, got {block_size}')
        self.topk = topk
        self.impl = impl
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hspa_export.exporting():  # a traced graph (ONNX): fixed shapes, no data-dependent branch
            q, k, v = self.embed(x)
            return self.combine(hspa_export.hspa_attention_export(q, k, v, self.topk), x)
        impl = choose_impl(self.impl, x.device, x.shape[0], x.shape[2] * x.shape[3])
        if impl == 'fast' and fusable(self, x):
            return hspa_layer(x, self, self.topk, self.block_size)
        q, k, v = self.embed(x)
        if impl == 'fast':
            attended = hspa_attention(q, k, v, self.topk, self.block_size)
        elif impl == 'triton':
            attended = hspa_triton.hspa_triton(q, k, v)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):  # float32 scores under autocast
                if q.dtype in (torch.float16, torch.bfloat16):
                    q, k, v = q.float(), k.float(), v.float()
                scores = torch.matmul(q, k.transpose(1, 2))
                attended = torch.matmul(soft_threshold(scores, dim=-1, topk=self.topk), v)
        return self.combine(attended, x)

    def extra_repr(self) -> str:
        return f'topk={self.topk}, impl={self.impl}, block_size={self.block_size}'


class NonLocalAttention(_Embeddings):
    """Standard non-local attention: x + res_scale * softmax(q k^T) v (the paper's ablation)."""

    def __init__(
        self,
        channel: int = 256,
        reduction: int = 2,
        res_scale: float = 1,
        conv: common.ConvFactory = common.default_conv,
    ) -> None:
        super().__init__(channel, reduction, res_scale, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.embed(x)
        weights = F.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)
        return self.combine(torch.matmul(weights, v), x)
