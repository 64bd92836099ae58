"""The whole HSPA layer (embeddings, exact blocked attention, residual) as one registered operator
(nlsr::hspa_layer, its backward nlsr::hspa_layer_backward), run one sample at a time.

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

from nlsr.model import common
from nlsr.model.hspa import native as kernels
from nlsr.model.hspa.blocked import (
    DEFAULT_MEMORY_BUDGET,
    _fake_supports,
    _Inputs,
    _Native,
    _torch_backward,
    _torch_forward,
    needs_grad,
    pack_supports,
    resolve_backend,
    support_bytes,
    unpack_supports,
)

__all__ = ['fusable', 'hspa_layer', 'layer_op']

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


def _layer_out(x: Tensor) -> Tensor:
    """The layer's output buffer: channels-last where the input is (and not also contiguous)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.custom_op('nlsr::hspa_layer', mutates_args=())
def _layer_op(x: Tensor, weight: Tensor, bias: Tensor, slope: Tensor, res_scale: float, kwidth: int, topk: int,
              block_size: int, memory_budget: int, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x + res_scale * sparsemax(q k^T) v of the stacked embeddings, one sample at a time, and with
    ``memory_budget`` > 0 on the native back-end the supports kept for backward (``pack_supports``)."""
    n, c = x.shape[:2]
    samples = x.reshape(n, c, -1)
    length = samples.shape[2]
    widths = [kwidth, kwidth, weight.shape[0] - 2 * kwidth]
    out = _layer_out(x)
    out_samples = out.view(n, c, -1)
    keep = memory_budget
    lib = kernels.load() if backend == 'native' else None
    supports, blocks, entries = [], [], None
    for s in range(n):
        q, k, v = _embed(samples[s], weight, bias, slope, widths)[1]
        inp = _Inputs(q[None], k[None], v[None], block_size)
        blocks += [(s, r0, r1) for _, r0, r1 in inp.blocks()]
        if lib is not None:
            native = _Native(inp, lib, entries=entries)
            attended, kept = native.forward(keep)
            entries = native.entries  # one support buffer for all samples: no heap churn
            keep -= sum(support_bytes(part) for part in kept)
            supports += kept
        else:
            attended = _torch_forward(inp, topk)
            supports += [None] * len(inp.blocks())
        del q, k, v, inp
        # x + res_scale * attended, written in place: no (C, L) temporaries.
        torch.add(samples[s], attended[0].t(), alpha=res_scale, out=out_samples[s])
    return (out, *pack_supports(supports, blocks, n, length, x.dtype, x.device))


@_layer_op.register_fake
def _(x, weight, bias, slope, res_scale, kwidth, topk, block_size, memory_budget, backend):
    n, length = x.shape[0], x.shape[2] * x.shape[3]
    return (_layer_out(x), *_fake_supports(n, length, x.dtype, x.device, backend == 'native' and memory_budget > 0))


@torch.library.custom_op('nlsr::hspa_layer_backward', mutates_args=())
def _layer_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, slope: Tensor, start: Tensor,
                       nnz: Tensor, cols: Tensor, vals: Tensor, kept: Tensor, res_scale: float, kwidth: int,
                       topk: int, block_size: int, backend: str, needs_x: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x (empty unless ``needs_x``), the stacked weight, bias and slope; each sample's
    embeddings recomputed."""
    n, c = x.shape[:2]
    samples, grads = x.reshape(n, c, -1), grad.reshape(n, c, -1)
    length = samples.shape[2]
    widths = [kwidth, kwidth, weight.shape[0] - 2 * kwidth]
    lib = kernels.load() if backend == 'native' else None
    dx = torch.empty_like(samples) if needs_x else None
    dw, db, dslope = torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros_like(slope)
    parts = [t.split(widths) for t in (weight, slope, dw, db, dslope)]
    entries = None
    for s in range(n):
        pres, posts = _embed(samples[s], weight, bias, slope, widths, keep_pre=True)
        inp = _Inputs(*(t[None] for t in posts), block_size)
        # res_scale * grad, transposed to the (L, C) rows the kernels read, in one pass.
        g = torch.mul(grads[s].t(), res_scale, out=grads.new_empty(length, c))[None]
        if lib is not None:
            native = _Native(inp, lib, g, entries)
            d_posts = native.backward(unpack_supports((start, nnz, cols, vals, kept), inp.blocks(), length, s),
                                      (True, True, True))
            entries = native.entries
        else:
            d_posts = _torch_backward(inp, topk, g, (True, True, True))
        del posts, inp
        if dx is not None:
            dx[s] = grads[s]
        for pre, d_post, (w, a, dw_i, db_i, da_i) in zip(pres, d_posts, zip(*parts, strict=True), strict=True):
            d_pre = _prelu_backward(d_post[0], pre, a, da_i)
            dw_i.addmm_(d_pre.t(), samples[s].t())
            db_i += d_pre.sum(0)
            if dx is not None:
                dx[s].addmm_(w.t(), d_pre.t())
    return (x.new_empty(0) if dx is None else dx.reshape(x.shape), dw, db, dslope)


@_layer_backward_op.register_fake
def _(grad, x, weight, bias, slope, start, nnz, cols, vals, kept, res_scale, kwidth, topk, block_size, backend,
      needs_x):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_x else x.new_empty(0),
            torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(slope))


def _layer_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, slope, res_scale, kwidth, topk, block_size, _, backend = inputs
    ctx.save_for_backward(x, weight, bias, slope)
    # The supports are outputs without gradients: attributes, so saved-tensor hooks count only the inputs.
    ctx.supports = output[1:]
    ctx.mark_non_differentiable(*output[1:])
    ctx.args = (res_scale, kwidth, topk, block_size, backend)


def _layer_backward(ctx: Any, grad: Tensor, *_: Any) -> tuple:
    x, weight, bias, slope = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    dx, dw, db, dslope = torch.ops.nlsr.hspa_layer_backward(grad, x, weight, bias, slope, *ctx.supports, *ctx.args,
                                                            needs_x)
    return (dx if needs_x else None, dw, db, dslope, *([None] * 6))


_layer_op.register_autograd(_layer_backward, setup_context=_layer_setup)


def layer_op(x: Tensor, layer: nn.Module, topk: int, block_size: int, memory_budget: int, backend: str) -> Tensor:
    """The registered operator nlsr::hspa_layer for a fusable ``layer`` and a resolved ``backend`` (no
    planning: safe to trace)."""
    weight, bias, slope = _stacked(layer)
    kwidth = layer.conv_match1[0].out_channels
    budget = memory_budget if needs_grad(x, weight, bias, slope) else 0
    return torch.ops.nlsr.hspa_layer(x, weight, bias, slope, float(layer.res_scale), kwidth, topk, block_size,
                                     budget, backend)[0]


def hspa_layer(x: Tensor, layer: nn.Module, topk: int, block_size: int = 0,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str | None = None) -> Tensor:
    """``layer(x)`` for an HSPA ``layer`` that ``fusable`` accepts: x + res_scale * sparsemax(q k^T) v (the
    registered operator nlsr::hspa_layer, with its backward nlsr::hspa_layer_backward).

    ``topk``, ``block_size`` and ``memory_budget`` as in ``model.hspa.blocked.hspa_attention``; ``backend``
    'native' (the C kernels, CPU) or 'torch' (see ``model.hspa.blocked.resolve_backend``).
    """
    return layer_op(x, layer, topk, block_size, memory_budget, resolve_backend(backend, x.device))
