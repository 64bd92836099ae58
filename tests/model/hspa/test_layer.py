"""The whole-layer HSPA (src/nlsr/model/hspa/layer.py, both back-ends) against the module path with the published
dense algorithm: the output and the gradients of the input and of every parameter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nlsr.model import attention
from nlsr.model.hspa import layer as hspa_layer
from nlsr.model.hspa import native
from oracles import TOL, rel


@pytest.fixture(params=['native', 'torch'])
def backend(request) -> str:
    if request.param == 'native' and native.load() is None:
        pytest.skip(f'native HSPA kernels unavailable here: {native.unavailable_reason()}')
    return request.param


def _dense_layer(channel: int = 16, reduction: int = 2, dtype: torch.dtype = torch.float32,
                 per_channel: bool = False, seed: int = 0, signed_slopes: bool = False) -> attention.HSPA:
    """A dense-path HSPA. ``signed_slopes``: PReLU slopes drawn from [-0.6, 0.6] instead of the 0.25 of
    PReLU's initialisation (for the float64 checks: in float32 a slope's gradient, a sum over every
    position, can cancel to 1/1000 of its terms, and rounding then dominates both paths alike)."""
    torch.manual_seed(seed)
    layer = attention.HSPA(channel=channel, reduction=reduction, res_scale=0.3, topk=8, impl='dense')
    for name in ('conv_match1', 'conv_match2', 'conv_assembly'):
        block = getattr(layer, name)
        if per_channel:
            block[1] = nn.PReLU(block[0].out_channels)
        if signed_slopes:
            with torch.no_grad():
                block[1].weight.uniform_(-0.6, 0.6)
    return layer.to(dtype)


def _run(fn, layer: nn.Module, x: torch.Tensor, grad_x: bool = True) -> list[torch.Tensor]:
    """Output and the gradients of x (when it requires them) and of every parameter that requires them."""
    layer.zero_grad(set_to_none=True)
    inp = x.detach().clone().requires_grad_(grad_x)
    out = fn(inp)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    grads = [inp.grad] if grad_x else []
    return [out.detach(), *grads, *(p.grad for p in layer.parameters() if p.requires_grad)]


def _compare(layer: nn.Module, x: torch.Tensor, backend: str, tol: float = TOL, grad_x: bool = True,
             **kw) -> None:
    """hspa_layer against the oracle: the layer's module path, dense, in float64 on the same values. A float32
    result may be off by TOL, or by twice what the published float32 path itself is off (the PReLU slopes'
    gradients are sums over every position, with cancellation)."""
    def fused(inp):
        return hspa_layer.hspa_layer(inp, layer, layer.topk, backend=backend, **kw)

    oracle_layer = copy.deepcopy(layer).double()
    oracle = _run(oracle_layer, oracle_layer, x.double(), grad_x)
    published = _run(layer, layer, x, grad_x)
    got = _run(fused, layer, x, grad_x)
    assert len(got) == len(oracle)
    for g, p, o in zip(got, published, oracle, strict=True):
        assert g.shape == o.shape and g.dtype == x.dtype
        assert rel(g.double(), o) <= max(tol, 2 * rel(p.double(), o))


@pytest.mark.parametrize('dtype, tol', [(torch.float32, TOL), (torch.float64, 1e-10)])
def test_equals_dense_module(backend: str, dtype: torch.dtype, tol: float) -> None:
    # L = 143 (not a power of two) in blocks of 40 rows; C = 24, C/r = 8.
    layer = _dense_layer(channel=24, reduction=3, dtype=dtype, signed_slopes=dtype == torch.float64)
    x = torch.randn(3, 24, 11, 13, dtype=dtype) * 2
    _compare(layer, x, backend, tol, block_size=40)


def test_per_channel_prelu_and_convolutions_without_bias(backend: str) -> None:
    layer = _dense_layer(per_channel=True)
    layer.conv_match2[0].bias = None
    x = torch.randn(2, 16, 9, 10) * 2
    assert hspa_layer.fusable(layer, x)
    _compare(layer, x, backend)


@pytest.mark.parametrize('budget', [0, 1, 2000])
def test_supports_beyond_the_budget_are_recomputed(backend: str, budget: int) -> None:
    # 0: forward keeps nothing (the fused inference kernel); 1: every block recomputed; 2000: some kept.
    layer = _dense_layer()
    x = torch.randn(3, 16, 8, 9) * 2
    _compare(layer, x, backend, block_size=20, memory_budget=budget)


def test_partial_gradients(backend: str) -> None:
    layer = _dense_layer()
    x = torch.randn(2, 16, 7, 8) * 2
    _compare(layer, x, backend, grad_x=False)  # the first layer of a network: parameters only
    layer.requires_grad_(False)
    _compare(layer, x, backend)  # frozen layer: the input only


def test_channels_last_input(backend: str) -> None:
    layer = _dense_layer()
    x = (torch.randn(2, 16, 6, 7) * 2).to(memory_format=torch.channels_last)
    _compare(layer, x, backend)


def test_gradcheck_float64(backend: str) -> None:
    layer = _dense_layer(channel=4, reduction=2, dtype=torch.float64, signed_slopes=True)
    params = [layer.conv_match1[0].weight, layer.conv_assembly[0].bias, layer.conv_match2[1].weight]

    def fn(x, *_):
        return hspa_layer.hspa_layer(x, layer, layer.topk, block_size=4, backend=backend)

    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *params))


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors the autograd graph of layer(x) keeps for backward."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(sizes)


def test_module_keeps_only_its_input_for_backward() -> None:
    layer = _dense_layer(channel=32)
    layer.impl = 'fast'
    x = torch.randn(4, 32, 12, 12, requires_grad=True)
    out = layer(x)
    assert 'nlsr_hspa_layer' in type(out.grad_fn).__name__
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert _saved_bytes(layer, x) <= x.numel() * x.element_size() + 2 * param_bytes
    # The module path keeps each embedding's convolution output and activation: twice 2 * C/r + C channels.
    layer.impl = 'dense'
    assert _saved_bytes(layer, x) > 3 * x.numel() * x.element_size()


def _zero_assembly(layer: nn.Module) -> None:
    layer.conv_assembly.register_forward_hook(lambda module, inputs, output: output * 0)


# Changes after which hspa_layer does not compute layer(x) as the module path would.
CHANGES = {
    'hook on an embedding block': _zero_assembly,
    'hook on a convolution': lambda layer: layer.conv_match1[0].register_forward_hook(lambda *_: None),
    'backward hook on a PReLU': lambda layer: layer.conv_match2[1].register_full_backward_hook(lambda *_: None),
    'a 3x3 embedding': lambda layer: setattr(layer.conv_match1, '0', nn.Conv2d(16, 8, 3, padding=1)),
    'learnable res_scale': lambda layer: setattr(layer, 'res_scale', nn.Parameter(torch.tensor(0.3))),
    'float64 bias': lambda layer: setattr(layer.conv_match2[0], 'bias', nn.Parameter(torch.zeros(8).double())),
}


@pytest.mark.parametrize('change', CHANGES)
def test_module_falls_back_where_the_layer_does_not_apply(change: str) -> None:
    layer = _dense_layer()
    x = torch.randn(2, 16, 6, 7)
    assert hspa_layer.fusable(layer, x)
    CHANGES[change](layer)
    assert not hspa_layer.fusable(layer, x)
    if change == 'float64 bias':
        return  # the module path cannot run it either
    fast = copy.deepcopy(layer)
    fast.impl = 'fast'
    ref, got = _run(layer, layer, x), _run(fast, fast, x)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert rel(g, r) <= TOL


def test_fusable_conditions_of_the_call() -> None:
    layer = _dense_layer()
    x = torch.randn(2, 16, 6, 7)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not hspa_layer.fusable(layer, x)
    assert not hspa_layer.fusable(layer, x.double())
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert not hspa_layer.fusable(layer, x)  # module trackers must see the embeddings
    finally:
        handle.remove()
    assert hspa_layer.fusable(layer, x)


def test_channels_last_output_stays_channels_last() -> None:
    layer = _dense_layer()
    layer.impl = 'fast'
    x = torch.randn(2, 16, 6, 7).to(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
