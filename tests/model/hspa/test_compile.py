"""torch.compile(fullgraph=True) of the HSPA block and of a tiny HSPAN on the CPU: inference and a training
step equal eager within 1e-5. HSPA's kernels are registered operators (nlsr::hspa_layer, nlsr::hspa_blocked,
nlsr::hspa_triton) with fake implementations and registered backwards, so Dynamo traces the whole network
without a graph break; the plan is taken while tracing, not traced.

The fast tests compile with the 'aot_eager' backend (Dynamo, the fake implementations and AOTAutograd's
joint graph, no code generation); the slow ones with inductor, as --compile runs it.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from nlsr.model.hspa import HSPA, native
from nlsr.model.hspa.dispatch import plan
from nlsr.model.networks.hspan import HSPAN

TOL = 1e-5
BACKENDS = ['aot_eager', pytest.param('inductor', marks=pytest.mark.slow)]


# The CPU operators a forward can take: the whole layer fused (published embeddings) or blocked attention.
PATHS = ['fused', 'blocked']


def _block(path: str) -> nn.Module:
    torch.manual_seed(0)
    layer = HSPA(16, topk=8, res_scale=0.5, impl='blocked')
    if path == 'blocked':
        layer.conv_match1[1] = nn.LeakyReLU(0.25)  # not a PReLU: not fusable, so the blocked operator runs
    return layer


def _tiny_hspan() -> nn.Module:
    torch.manual_seed(0)
    return HSPAN(scale=2, n_colors=3, n_feats=8, n_resgroups=1, n_resblocks=2, reduction=2, topk=8, res_scale=1,
                 rgb_range=1, hspa_impl='auto')


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _step(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One training step's output and gradients (input and parameters)."""
    leaf = x.clone().requires_grad_(True)
    out = net(leaf)
    out.square().mean().backward()
    return [out.detach(), leaf.grad, *(p.grad for p in net.parameters() if p.requires_grad)]


def _compare(net: nn.Module, x: torch.Tensor, backend: str) -> None:
    twin = copy.deepcopy(net)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    with torch.no_grad():
        assert _max_diff([compiled(x)], [net(x)]) <= TOL
    assert _max_diff(_step(compiled, x), _step(net, x)) <= TOL


@pytest.fixture(autouse=True)
def fresh_dynamo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # A private inductor cache: its keys do not cover the ops' Python fakes, so a cache left by other code could
    # hand back a graph compiled against another version of them.
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'inductor'))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('path', PATHS)
def test_block_compiles_whole_and_equals_eager(path: str, backend: str) -> None:
    layer = _block(path)
    x = torch.randn(2, 16, 7, 6)
    assert plan('blocked', x.device, 2, 42, fusable=path == 'fused').fused == (path == 'fused')
    _compare(layer, x, backend)


@pytest.mark.parametrize('backend', BACKENDS)
def test_tiny_hspan_compiles_whole_and_equals_eager(backend: str) -> None:
    _compare(_tiny_hspan(), torch.rand(2, 3, 10, 9), backend)


@pytest.mark.parametrize('backend', BACKENDS)
def test_the_operator_compiles_whole_and_equals_eager(backend: str) -> None:
    """nlsr.hspa, the operator alone (planned outside the graph), forward and backward."""
    import nlsr

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 40, 4), torch.randn(2, 40, 4), torch.randn(2, 40, 6)

    def run(fn) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in leaves)]

    compiled = torch.compile(nlsr.hspa, fullgraph=True, backend=backend)
    assert _max_diff(run(compiled), run(nlsr.hspa)) <= TOL


def test_compiled_forward_neither_plans_nor_logs_in_the_graph(monkeypatch, caplog) -> None:
    """The plan is taken once while tracing (plan_constant), not on every compiled call, and said by no
    compiled call."""
    layer = _block('fused')
    x = torch.randn(1, 16, 5, 5)
    calls = []
    from nlsr.model.hspa import dispatch

    real = dispatch.plan

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, 'plan', counting)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    with torch.no_grad(), caplog.at_level(logging.INFO, logger='nlsr.hspa'):
        for _ in range(3):
            compiled(x)
    assert len(calls) == 1
    assert not caplog.records


def test_fake_implementations_give_shapes_without_data() -> None:
    """The operators run on meta tensors (their fake implementations): shapes and dtypes, no kernel."""
    q, k = (torch.empty(2, 30, 4, device='meta') for _ in 'qk')
    v = torch.empty(2, 30, 6, device='meta', dtype=torch.float64)
    out, start, nnz, cols, vals, kept = torch.ops.nlsr.hspa_blocked(q, k, v, 8, 0, 0, 'native', [])
    assert out.shape == (2, 30, 6) and out.dtype == torch.float64 and vals.dtype == torch.float64
    assert start.shape == nnz.shape == kept.shape == (60,) and cols.numel() == 0
    x = torch.empty(2, 16, 5, 6, device='meta').to(memory_format=torch.channels_last)
    w, b, a = torch.empty(32, 16, device='meta'), torch.empty(32, device='meta'), torch.empty(32, device='meta')
    out = torch.ops.nlsr.hspa_layer(x, w, b, a, 0.5, 8, 8, 0, 0, 'native')[0]
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    out, tau = torch.ops.nlsr.hspa_triton(q, k, v, [16, 16, 16, 16, 16, 4, 1])
    assert out.shape == (2, 30, 6) and tau.shape == (2, 30) and tau.dtype == torch.float32


@pytest.mark.skipif(native.load() is None, reason='no C compiler')
def test_operators_pass_torch_library_opcheck() -> None:
    """torch.library.opcheck: schema, fake implementation against the real one, and the autograd registration."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 20, 4, requires_grad=True) for _ in 'qk')
    v = torch.randn(1, 20, 6, requires_grad=True)
    checks = ('test_schema', 'test_autograd_registration', 'test_faketensor')
    for backend in ('native', 'torch'):
        torch.library.opcheck(torch.ops.nlsr.hspa_blocked.default, (q, k, v, 8, 0, 4096, backend, []),
                              test_utils=checks)
        # Backward on strided inputs (the embeddings are transposed views): the fake gives the real strides.
        qt, kt = (torch.randn(1, 4, 20).transpose(1, 2) for _ in 'qk')
        supports = torch.ops.nlsr.hspa_blocked(qt, kt, v, 8, 0, 4096, backend, [])[1:]
        torch.library.opcheck(torch.ops.nlsr.hspa_blocked_backward.default,
                              (torch.randn(1, 20, 6), qt, kt, v.detach(), *supports, 8, 0, backend,
                               [True, True, True]), test_utils=('test_schema', 'test_faketensor'))
