"""Blocked exact HSPA (src/nlsr/model/hspa/blocked.py, both back-ends) against dense oracles.

Oracles (tests/oracles.py): a plain sort-based sparsemax (autograd through it gives the exact sparsemax
Jacobian), checked itself against the entmax package; entmax's sparsemax directly; and
model.hspa.soft_threshold (the dense operator of the published algorithm).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT
from nlsr.model import attention
from nlsr.model.hspa import native, plan
from nlsr.model.hspa.blocked import choose_block_size, hspa_attention
from oracles import TOL, entmax_sparsemax, features, hspa_ref, inference_inputs, rel, sparsemax_ref

# Every back-end that impl 'fast' (and so 'auto' on the CPU) can run: the native kernels where a C compiler
# exists (CI has one: test_native_kernel_builds), the torch back-end where none does.
BACKENDS = ['native', 'torch']

@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == 'native' and native.load() is None:
        pytest.skip(f'native HSPA kernels unavailable here: {native.unavailable_reason()}')
    return request.param


def compare(q, k, v, topk: int, block: int, backend: str, oracle=hspa_ref, tol: float = TOL, **kw) -> None:
    """Output and the gradients w.r.t. query, key and value agree with the oracle."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = hspa_attention(*leaves, topk, block, backend=backend, **kw)
    ref = oracle(*ref_leaves)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_leaves)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel(out, ref) <= tol, f'output rel err {rel(out, ref):.2e}'
    for name, g, rg in zip('qkv', grads, ref_grads, strict=True):
        assert rel(g, rg) <= tol, f'grad {name} rel err {rel(g, rg):.2e}'


def test_oracle_matches_entmax():
    s = torch.randn(64, 300, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)[:, None]
    assert torch.allclose(sparsemax_ref(s), entmax_sparsemax(s, dim=-1), atol=1e-12)


@pytest.mark.parametrize('length,block', [(300, 0), (300, 7), (300, 64), (300, 300), (300, 10_000), (50, 1)])
def test_random_features_block_sizes(length, block, backend):
    # L = 300 is no power of two, nor a multiple of the kernel's vector groups or of most blocks.
    compare(*features(2, length, 8, 12, scale=0.5), topk=16, block=block, backend=backend)


def test_against_entmax_directly(backend):
    q, k, v = features(2, 500, 8, 6, scale=0.3, seed=3)
    compare(q, k, v, topk=8, block=37, backend=backend,
            oracle=lambda a, b, c: entmax_sparsemax(a @ b.transpose(1, 2), dim=-1) @ c)


def test_ties(backend):
    # Small integer features: many scores are exactly equal, also at the row maximum and around tau.
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-1, 2, (2, 700, 4), generator=gen).float()
    k = torch.randint(-1, 2, (2, 700, 4), generator=gen).float() * 0.5
    v = torch.randn(2, 700, 5, generator=gen)
    compare(q, k, v, topk=8, block=45, backend=backend)
    compare(q, k, v, topk=128, block=0, backend=backend)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_supports_from_one_to_thousands(backend, dtype):
    # Rows scaled from near-uniform (supports of thousands, far beyond topk) to sharp (one entry), on rows
    # long enough (L = 2304) for the kernel's subset bound, in both kernel element types.
    q, k, v = (t.to(dtype) for t in features(1, 2304, 8, 6, scale=1.0, seed=5))
    order = torch.randperm(2304, generator=torch.Generator().manual_seed(0))
    q = q * torch.logspace(-4, 1, 2304, dtype=dtype)[order][:, None]
    support = (hspa_ref(q, k, torch.eye(2304, dtype=dtype)[None]) > 0).sum(-1)
    assert int(support.max()) > 1500 and int((support > 4).sum()) > 500 and int((support == 1).sum()) > 100
    compare(q, k, v, topk=4, block=1000, backend=backend)


def test_compressed_scores(backend):
    # Every score of a row within 1 of its maximum (as in trained networks): the support is wide.
    q, k, v = features(2, 1500, 16, 24, scale=0.01, seed=12)
    scores = q @ k.transpose(1, 2)
    assert float((scores.amax(-1) - scores.amin(-1)).max()) < 1
    compare(q, k, v, topk=1, block=100, backend=backend)


def test_all_equal_rows(backend):
    q, k, v = features(2, 260, 6, 7, scale=1.0, seed=6)
    q[0, ::3] = 0            # zero queries: every score of the row is 0
    k[1] = k[1, :1]          # one key repeated: every row of sample 1 is constant
    out = hspa_attention(q, k, v, 16, 50, backend=backend)
    assert torch.allclose(out[1], v[1].mean(0).expand(260, -1), atol=1e-5)
    assert torch.allclose(out[0, ::3], v[0].mean(0).expand(out[0, ::3].shape), atol=1e-5)
    compare(q, k, v, topk=16, block=50, backend=backend)


def test_backward_recomputes_when_supports_exceed_budget(backend):
    # A 1-byte budget keeps no support for backward: every block's scores are recomputed.
    q, k, v = features(2, 200, 8, 6, scale=0.5, seed=7)
    compare(q, k, v, topk=16, block=33, backend=backend, memory_budget=1)


def test_partial_gradients(backend):
    # Only some inputs need gradients: the others are not computed, the requested ones stay exact.
    q, k, v = features(1, 300, 8, 6, scale=0.5, seed=13)
    q.requires_grad_(True)
    weight = torch.randn(1, 300, 6)
    (dq,) = torch.autograd.grad((hspa_attention(q, k, v, 8, 64, backend=backend) * weight).sum(), [q])
    ref_q = q.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((hspa_ref(ref_q, k, v) * weight).sum(), [ref_q])
    assert rel(dq, ref) <= TOL


def test_gradcheck_float64(backend):
    q, k, v = (t.double().requires_grad_(True) for t in features(1, 9, 2, 2, scale=0.7, seed=8))
    assert torch.autograd.gradcheck(lambda a, b, c: hspa_attention(a, b, c, 2, 4, backend=backend), (q, k, v))
    q, k, v = (t.double().requires_grad_(True) for t in features(1, 300, 2, 2, scale=3.0, seed=8))
    assert torch.autograd.gradcheck(lambda a, b, c: hspa_attention(a, b, c, 4, 100, backend=backend), (q, k, v),
                                    fast_mode=True)


def test_no_grad_path_and_dtype(backend):
    q, k, v = features(1, 100, 4, 3, scale=1.0, seed=9)
    with torch.no_grad():
        out = hspa_attention(q, k, v, 8, backend=backend)
    assert not out.requires_grad and out.dtype == torch.float32
    assert rel(out, hspa_ref(q, k, v)) <= TOL


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('case', ['ties', 'all_equal', 'compressed', 'mixed'])
def test_inference_path(backend, case, dtype):
    # Without gradients the native back-end runs its fused kernel (own score micro-kernel, padded key tiles).
    q, k, v = inference_inputs(case, dtype)
    with torch.no_grad():
        out = hspa_attention(q, k, v, 8, backend=backend)
    assert out.dtype == dtype and rel(out, hspa_ref(q, k, v)) <= (TOL if dtype == torch.float32 else 1e-12)


def test_autocast_computes_scores_in_float32(backend):
    q, k, v = (t.bfloat16() for t in features(1, 300, 8, 6, scale=0.5, seed=10))
    q.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = hspa_attention(q, k, v, 16, 64, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = hspa_ref(q.detach().float(), k.float(), v.float())
    assert rel(out.float(), ref) <= 1e-2    # only the final rounding to bfloat16
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


def test_real_features_set5(backend):
    imageio = pytest.importorskip('imageio.v3')
    path = ROOT / 'datasets' / 'benchmark' / 'Set5' / 'LR_bicubic' / 'X4' / 'img_001x4.png'
    img = torch.from_numpy(np.ascontiguousarray(imageio.imread(path)[:32, :32, :3])).float() / 255
    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, 32, 3, padding=1)

    def embed(c_out):
        return torch.nn.Sequential(torch.nn.Conv2d(32, c_out, 1), torch.nn.PReLU())

    with torch.no_grad():
        x = head(img.permute(2, 0, 1)[None]) * 8   # stronger features: supports from a few to hundreds
        q, k, v = (embed(c)(x).flatten(2).transpose(1, 2) for c in (16, 16, 32))
    compare(q, k, v, topk=32, block=100, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device on this machine')
def test_cuda_matches_cpu():
    q, k, v = features(2, 300, 8, 12, scale=0.5)
    out = hspa_attention(q.cuda(), k.cuda(), v.cuda(), 16, 50)
    assert rel(out.cpu(), hspa_ref(q, k, v)) <= TOL


def test_against_project_soft_threshold(backend):
    q, k, v = features(2, 300, 8, 12, scale=0.3, seed=11)
    compare(q, k, v, topk=8, block=70, backend=backend,
            oracle=lambda a, b, c: attention.soft_threshold(a @ b.transpose(1, 2), dim=-1, topk=8) @ c)


def test_native_kernel_builds():
    # Where a C compiler exists (CI, Linux and macOS set-ups) the default CPU path is the native kernel.
    if shutil.which(os.environ.get('CC') or 'cc') is None:
        pytest.skip('no C compiler: the torch back-end is the CPU default here')
    assert native.load() is not None, native.unavailable_reason()
    assert plan('auto', torch.device('cpu'), 1, 100, fusable=True).backend == 'native'


def test_block_size_choice_and_errors():
    assert choose_block_size(16384) == 512                      # 32 MiB of float32 scores
    assert choose_block_size(2304) == 2304                      # a training sample in one block
    assert choose_block_size(100) == 100                        # never more than L
    assert choose_block_size(10**7) == 32                       # never fewer than 32 rows
    q, k, v = features(1, 10, 2, 3, scale=1.0)
    with pytest.raises(ValueError, match='topk'):
        hspa_attention(q, k, v, 0)
    with pytest.raises(ValueError, match='expects'):
        hspa_attention(q, k[:, :5], v, 4)
    with pytest.raises(ValueError, match='backend'):
        hspa_attention(q, k, v, 4, backend='sparse')


@pytest.mark.parametrize('impl', ['fast', 'auto'])
def test_hspa_module_equals_dense(impl):
    torch.manual_seed(0)
    dense = attention.HSPA(channel=16, reduction=2, topk=8, impl='dense')
    other = attention.HSPA(channel=16, reduction=2, topk=8, impl=impl, block_size=100 if impl == 'fast' else 0)
    other.load_state_dict(dense.state_dict())
    x = torch.randn(2, 16, 20, 17) * 3
    outs, grads = [], []
    for layer in (dense, other):
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([inp.grad] + [p.grad for p in layer.parameters()])
    assert rel(outs[1], outs[0]) <= TOL
    for g_other, g_dense in zip(grads[1], grads[0], strict=True):
        assert rel(g_other, g_dense) <= TOL


def test_hspa_rejects_bad_arguments():
    with pytest.raises(ValueError, match='impl'):
        attention.HSPA(channel=8, impl='sparse')
    with pytest.raises(ValueError, match='topk'):
        attention.HSPA(channel=8, topk=0)

