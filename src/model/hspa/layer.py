"""The whole HSPA layer (embeddings, exact blocked attention, residual) as one autograd function, run one
sample at a time.

Through autograd, ``HSPA.embed`` keeps every 1x1 convolution's output and every PReLU's output for
backward: two (N, 2C/r + C, H, W) tensors per layer, more than the attention keeps. ``hspa_layer`` keeps
only the layer's input (which its caller holds anyway) and the attention supports, and recomputes a
sample's embeddings in backward (three matmuls, about a tenth of a training step's time). Each
embedding is computed as the (L, C') matrix the kernels read, so no transposed copies are made. Results
equal the module path's (``HSPA.embed`` + ``hspa_attention`` + ``HSPA.combine``) up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import common
from model.hspa import native as kernels
from model.hspa.blocked import (
    DEFAULT_MEMORY_BUDGET,
    _Inputs,
    _Native,
    _torch_backward,
    _torch_forward,
    resolve_backend,
    support_bytes,
)

__all__ = ['fusable', 'hspa_layer']

_EMBEDDINGS = ('conv_match1', 'conv_match2', 'conv_assembly')


_HOOKS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')
# Hooks registered for every module (nn.modules.module.register_module_*_hook): tools that use them
# (module trackers, FLOP counters) must see the embeddings' calls, so the module path runs instead.
_GLOBAL_HOOKS = ('_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
                 '_global_backward_pre_hooks')


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _plain_embedding(block: nn.Module, dtype: torch.dtype) -> bool:
    if type(block) not in (common.BasicBlock, nn.Sequential) or len(block) != 2:
        return False
    conv, act = block[0], block[1]
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and type(act) is nn.PReLU
            and not any(_hooked(m) for m in (block, conv, act))
            and all(t.dtype == dtype for t in (conv.weight, conv.bias, act.weight) if t is not None))


def fusable(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``hspa_layer`` computes ``layer(x)`` exactly as the module path does: each embedding is a
    plain 1x1 convolution and a PReLU, as published, with no hooks on them (nor global module hooks);
    ``res_scale`` is a number; x is a float32/float64 NCHW tensor of the parameters' dtype; autocast is off."""
    blocks = [getattr(layer, name, None) for name in _EMBEDDINGS]
    return (x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and all(b is not None and _plain_embedding(b, x.dtype) for b in blocks)
            and isinstance(layer.res_scale, (int, float))
            and not any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS)
            and not torch.is_autocast_enabled(x.device.type))


def _stacked(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(2Ck + C, C) weight, bias and per-channel PReLU slope of the three embeddings, stacked (in the
    autograd graph, so their gradients reach the modules' parameters)."""
    convs = [getattr(layer, name)[0] for name in _EMBEDDINGS]
    acts = [getattr(layer, name)[1] for name in _EMBEDDINGS]
    weight = torch.cat([c.weight.flatten(1) for c in convs])
    bias = torch.cat([c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs])
    slope = torch.cat([a.weight.expand(c.out_channels) for a, c in zip(acts, convs, strict=True)])
    return weight, bias, slope


def _embed(x: Tensor, weight: Tensor, bias: Tensor, slope: Tensor, widths: list[int],
           keep_pre: bool = False) -> tuple[list, list[Tensor]]:
    """One sample's (C, L) input -> the pre-activations (when ``keep_pre``) and the activations q, k, v,
    each (L, width) and contiguous, as the kernels read them."""
    pres, posts = [], []
    for w, b, a in zip(weight.split(widths), bias.split(widths), slope.split(widths), strict=True):
        pre = torch.addmm(b, x.t(), w.t())
        # Where the slope is one number (as published) leaky ReLU computes it (4x faster than prelu's
        # kernel here), in place when pre is not kept: one buffer fewer per embedding, which keeps the heap
        # from fragmenting (whole-image HSPAN x4: 514 MiB peak against 538-604).
        uniform = bool((a == a[0]).all())
        if keep_pre:
            posts.append(F.leaky_relu(pre, float(a[0])) if uniform else F.prelu(pre, a))
            pres.append(pre)
        else:
            posts.append(F.leaky_relu_(pre, float(a[0])) if uniform else F.prelu(pre, a))
            pres.append(None)
    return pres, posts


def _prelu_backward(d_post: Tensor, pre: Tensor, slope: Tensor, d_slope: Tensor) -> Tensor:
    """d/dpre of PReLU(pre) for the gradient d_post; adds d/dslope (per channel) to ``d_slope``."""
    if bool((slope == slope[0]).all()):
        # One slope (as published): leaky ReLU's backward and one product, 16x faster than
        # aten._prelu_kernel_backward, which writes a per-element slope gradient first.
        d_slope += torch.mul(pre.clamp(max=0), d_post).sum(0)
        return torch.ops.aten.leaky_relu_backward(d_post, pre, float(slope[0]), False)
    d_pre, per_element = torch.ops.aten._prelu_kernel_backward(d_post, pre, slope[None])
    d_slope += per_element.sum(0)
    return d_pre


class _HSPALayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, slope: Tensor, res_scale: float,
                kwidth: int, topk: int, block_size: int, memory_budget: int, backend: str) -> Tensor:
        n, c = x.shape[:2]
        samples = x.reshape(n, c, -1)
        widths = [kwidth, kwidth, weight.shape[0] - 2 * kwidth]
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out_samples = out.view(n, c, -1)
        keep = memory_budget if any(ctx.needs_input_grad[:4]) else 0
        lib = kernels.load() if backend == 'native' else None
        supports, entries = [], None
        for s in range(n):
            q, k, v = _embed(samples[s], weight, bias, slope, widths)[1]
            inp = _Inputs(q[None], k[None], v[None], block_size)
            if lib is not None:
                native = _Native(inp, lib, entries=entries)
                attended, kept = native.forward(keep)
                entries = native.entries  # one support buffer for all samples: no heap churn
                keep -= sum(support_bytes(part) for part in kept)
                supports.append(kept)
            else:
                attended = _torch_forward(inp, topk)
            del q, k, v, inp
            # x + res_scale * attended, written in place: no (C, L) temporaries.
            torch.add(samples[s], attended[0].t(), alpha=res_scale, out=out_samples[s])
        ctx.save_for_backward(x, weight, bias, slope)
        ctx.supports, ctx.block, ctx.lib, ctx.widths = supports, block_size, lib, widths
        ctx.res_scale, ctx.topk = res_scale, topk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor):
        x, weight, bias, slope = ctx.saved_tensors
        n, c = x.shape[:2]
        samples, grads = x.reshape(n, c, -1), grad.reshape(n, c, -1)
        dx = torch.empty_like(samples) if ctx.needs_input_grad[0] else None
        dw, db, dslope = torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros_like(slope)
        parts = [t.split(ctx.widths) for t in (weight, slope, dw, db, dslope)]
        entries = None
        for s in range(n):
            pres, posts = _embed(samples[s], weight, bias, slope, ctx.widths, keep_pre=True)
            inp = _Inputs(*(t[None] for t in posts), ctx.block)
            # res_scale * grad, transposed to the (L, C) rows the kernels read, in one pass.
            g = torch.mul(grads[s].t(), ctx.res_scale, out=grads.new_empty(grads.shape[2], c))[None]
            if ctx.lib is not None:
                native = _Native(inp, ctx.lib, g, entries)
                d_posts = native.backward(ctx.supports[s], (True, True, True))
                entries = native.entries
            else:
                d_posts = _torch_backward(inp, ctx.topk, g, (True, True, True))
            del posts, inp
            if dx is not None:
                dx[s] = grads[s]
            for pre, d_post, (w, a, dw_i, db_i, da_i) in zip(pres, d_posts, zip(*parts, strict=True), strict=True):
                d_pre = _prelu_backward(d_post[0], pre, a, da_i)
                dw_i.addmm_(d_pre.t(), samples[s].t())
                db_i += d_pre.sum(0)
                if dx is not None:
                    dx[s].addmm_(w.t(), d_pre.t())
        return (None if dx is None else dx.reshape(x.shape), dw, db, dslope, *([None] * 6))


def hspa_layer(x: Tensor, layer: nn.Module, topk: int, block_size: int = 0,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str | None = None) -> Tensor:
    """``layer(x)`` for an HSPA ``layer`` that ``fusable`` accepts: x + res_scale * sparsemax(q k^T) v.

    ``topk``, ``block_size`` and ``memory_budget`` as in ``model.hspa.blocked.hspa_attention``; ``backend``
    'native' (the C kernels, CPU) or 'torch' (see ``model.hspa.blocked.resolve_backend``).
    """
    backend = resolve_backend(backend, x.device)
    weight, bias, slope = _stacked(layer)
    kwidth = layer.conv_match1[0].out_channels
    return _HSPALayer.apply(x, weight, bias, slope, float(layer.res_scale), kwidth, topk, block_size,
                            memory_budget, backend)
