"""Fast exact HSPA (src/model/hspa_fast.py) against dense oracles (issue 4).

Oracles: a plain sort-based sparsemax written here (autograd through it gives the exact sparsemax
Jacobian), checked itself against the entmax package; and model.attention.soft_threshold (the project's
dense operator) when that module is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_path
from model.hspa_fast import _block_support, choose_block_size, hspa_attention

TOL = 1e-5  # max |fast - oracle| / max |oracle|, float32


def sparsemax_ref(scores: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dim, by a full sort (Martins & Astudillo 2016)."""
    z = scores - scores.amax(-1, keepdim=True)
    zs = z.sort(-1, descending=True).values
    csum = zs.cumsum(-1) - 1
    ks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    k_sup = (ks * zs > csum).sum(-1, keepdim=True)
    tau = csum.gather(-1, k_sup - 1) / k_sup.to(z.dtype)
    # relu, not clamp: an entry exactly at tau (a tie) gets no gradient, as in the published backward.
    return torch.relu(z - tau)


def hspa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sparsemax_ref(q @ k.transpose(1, 2)) @ v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def compare(q, k, v, topk: int, block: int, oracle=hspa_ref, tol: float = TOL, **kw) -> None:
    """Output and the gradients w.r.t. query, key and value agree with the oracle."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = hspa_attention(*leaves, topk, block, **kw)
    ref = oracle(*ref_leaves)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_leaves)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel(out, ref) <= tol, f'output rel err {rel(out, ref):.2e}'
    for name, g, rg in zip('qkv', grads, ref_grads, strict=True):
        assert rel(g, rg) <= tol, f'grad {name} rel err {rel(g, rg):.2e}'


def features(n: int, length: int, ck: int, c: int, scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, length, ck, generator=gen) * scale
    k = torch.randn(n, length, ck, generator=gen)
    v = torch.randn(n, length, c, generator=gen)
    return q, k, v


def test_oracle_matches_entmax():
    entmax = pytest.importorskip('entmax')
    s = torch.randn(64, 300, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)[:, None]
    assert torch.allclose(sparsemax_ref(s), entmax.sparsemax(s, dim=-1), atol=1e-12)


@pytest.mark.parametrize('length,block', [(300, 0), (300, 7), (300, 64), (300, 300), (300, 10_000), (50, 1)])
def test_random_features_block_sizes(length, block):
    # L = 300 is not a multiple of the 32-column groups (tail group) nor of most blocks.
    compare(*features(2, length, 8, 12, scale=0.5), topk=16, block=block)


def test_against_entmax_directly():
    entmax = pytest.importorskip('entmax')
    q, k, v = features(2, 500, 8, 6, scale=0.3, seed=3)
    compare(q, k, v, topk=8, block=37,
            oracle=lambda a, b, c: entmax.sparsemax(a @ b.transpose(1, 2), dim=-1) @ c)


def test_ties():
    # Small integer features: many scores are exactly equal, also at the row maximum and around tau.
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-1, 2, (2, 400, 4), generator=gen).float()
    k = torch.randint(-1, 2, (2, 400, 4), generator=gen).float() * 0.5
    v = torch.randn(2, 400, 5, generator=gen)
    compare(q, k, v, topk=8, block=45)
    compare(q, k, v, topk=128, block=0)


def test_supports_larger_than_topk_and_all_paths():
    # Rows scaled from near-uniform (support of hundreds) to sharp (a few entries). With L = 2304 (72
    # column groups) and topk 4 all paths run: sparse rows with <= topk support entries, sparse rows with
    # more (support > topk; some compacted from full rows), and near-uniform rows on the dense path.
    q, k, v = features(1, 2304, 8, 6, scale=1.0, seed=5)
    order = torch.randperm(2304, generator=torch.Generator().manual_seed(0))
    q = q * torch.logspace(-3, 1, 2304)[order][:, None]
    rows, _, _, dense_rows = _block_support((q @ k.transpose(1, 2))[0], 4)
    per_row = torch.bincount(rows, minlength=2304)
    assert dense_rows.numel() > 100
    assert int((per_row > 4).sum()) > 100 and int(((per_row > 0) & (per_row <= 4)).sum()) > 100
    compare(q, k, v, topk=4, block=1000)


def test_every_row_longer_than_topk():
    # topk 1 and compressed scores: every row of the block has more than topk candidates, so the short
    # bucket is empty (this crashed before the empty-bucket guard).
    compare(*features(2, 600, 8, 4, scale=0.2, seed=12), topk=1, block=100)


def test_all_equal_rows():
    q, k, v = features(2, 260, 6, 7, scale=1.0, seed=6)
    q[0, ::3] = 0            # zero queries: every score of the row is 0
    k[1] = k[1, :1]          # one key repeated: every row of sample 1 is constant
    out = hspa_attention(q, k, v, 16, 50)
    assert torch.allclose(out[1], v[1].mean(0).expand(260, -1), atol=1e-5)
    assert torch.allclose(out[0, ::3], v[0].mean(0).expand(out[0, ::3].shape), atol=1e-5)
    compare(q, k, v, topk=16, block=50)


def test_backward_recomputes_when_supports_exceed_budget():
    # A 1-byte budget keeps no support for backward: every block's scores are recomputed.
    q, k, v = features(2, 200, 8, 6, scale=0.5, seed=7)
    compare(q, k, v, topk=16, block=33, memory_budget=1)


def test_gradcheck_float64():
    q, k, v = (t.double().requires_grad_(True) for t in features(1, 9, 2, 2, scale=0.7, seed=8))
    assert torch.autograd.gradcheck(lambda a, b, c: hspa_attention(a, b, c, 2, 4), (q, k, v))
    # Long enough rows for the sparse path (256 columns: 8 groups); fast mode checks random projections.
    q, k, v = (t.double().requires_grad_(True) for t in features(1, 256, 2, 2, scale=3.0, seed=8))
    assert torch.autograd.gradcheck(lambda a, b, c: hspa_attention(a, b, c, 4, 100), (q, k, v), fast_mode=True)


def test_no_grad_path_and_dtype():
    q, k, v = features(1, 100, 4, 3, scale=1.0, seed=9)
    with torch.no_grad():
        out = hspa_attention(q, k, v, 8)
        flushed = hspa_attention(q, k, v, 8, 30, memory_budget=1)   # sparse rows aggregated per block
    assert not out.requires_grad
    assert rel(out, hspa_ref(q, k, v)) <= TOL
    assert rel(flushed, hspa_ref(q, k, v)) <= TOL


def test_autocast_computes_scores_in_float32():
    q, k, v = (t.bfloat16() for t in features(1, 300, 8, 6, scale=0.5, seed=10))
    q.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = hspa_attention(q, k, v, 16, 64)
    assert out.dtype == torch.bfloat16
    ref = hspa_ref(q.detach().float(), k.float(), v.float())
    assert rel(out.float(), ref) <= 1e-2    # only the final rounding to bfloat16
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


def test_real_features_set5():
    imageio = pytest.importorskip('imageio.v3')
    path = shared_path('data', 'benchmark', 'Set5', 'LR_bicubic', 'X4', 'img_001x4.png')
    img = torch.from_numpy(np.ascontiguousarray(imageio.imread(path)[:32, :32, :3])).float() / 255
    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, 32, 3, padding=1)

    def embed(c_out):
        return torch.nn.Sequential(torch.nn.Conv2d(32, c_out, 1), torch.nn.PReLU())

    with torch.no_grad():
        x = head(img.permute(2, 0, 1)[None]) * 8   # stronger features: supports from a few to hundreds
        q, k, v = (embed(c)(x).flatten(2).transpose(1, 2) for c in (16, 16, 32))
    compare(q, k, v, topk=32, block=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device on this machine')
def test_cuda_matches_cpu():
    q, k, v = features(2, 300, 8, 12, scale=0.5)
    out = hspa_attention(q.cuda(), k.cuda(), v.cuda(), 16, 50)
    assert rel(out.cpu(), hspa_ref(q, k, v)) <= TOL


def test_against_project_soft_threshold():
    attention = pytest.importorskip('model.attention', reason='src/model/attention.py not present yet')
    if not hasattr(attention, 'soft_threshold'):
        pytest.skip('model.attention has no soft_threshold yet')
    q, k, v = features(2, 300, 8, 12, scale=0.3, seed=11)
    compare(q, k, v, topk=8, block=70,
            oracle=lambda a, b, c: attention.soft_threshold(a @ b.transpose(1, 2), dim=-1, topk=8) @ c)


def test_block_size_choice_and_errors():
    assert choose_block_size(1, 16384, memory_budget=2**20) == 16
    assert choose_block_size(16, 2304, memory_budget=2**40) == 2304
    assert choose_block_size(4, 10**6, memory_budget=1) == 1
    q, k, v = features(1, 10, 2, 3, scale=1.0)
    with pytest.raises(ValueError, match='topk'):
        hspa_attention(q, k, v, 0)
    with pytest.raises(ValueError, match='expects'):
        hspa_attention(q, k[:, :5], v, 4)


def test_hspa_module_fast_equals_dense():
    attention = pytest.importorskip('model.attention', reason='src/model/attention.py not present yet')
    if not hasattr(attention, 'HSPA'):
        pytest.skip('model.attention has no HSPA yet')
    torch.manual_seed(0)
    dense = attention.HSPA(channel=16, reduction=2, topk=8, impl='dense')
    fast = attention.HSPA(channel=16, reduction=2, topk=8, impl='fast', block_size=100)
    fast.load_state_dict(dense.state_dict())
    x = torch.randn(2, 16, 20, 17) * 3
    outs, grads = [], []
    for layer in (dense, fast):
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([inp.grad] + [p.grad for p in layer.parameters()])
    assert rel(outs[1], outs[0]) <= TOL
    for g_fast, g_dense in zip(grads[1], grads[0], strict=True):
        assert rel(g_fast, g_dense) <= TOL
