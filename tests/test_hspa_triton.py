"""Fused Triton HSPA (src/model/hspa/triton/) against the dense oracle.

Without a GPU the kernels run on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are imported), so the maps are small. Outputs and q/k/v gradients must agree with the sort-based
sparsemax oracle to 1e-5 relative in float32.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
pytest.importorskip('triton')

from model import attention  # noqa: E402
from model.hspa.triton import hspa_triton  # noqa: E402
from test_hspa_blocked import TOL, features, hspa_ref, rel  # noqa: E402

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def compare(q, k, v, block_m: int = 16, block_n: int = 32) -> None:
    leaves = [t.detach().clone().to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = hspa_triton(*leaves, block_m=block_m, block_n=block_n)
    ref = hspa_ref(*ref_leaves)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    grads = torch.autograd.grad((out * weight.to(DEVICE)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_leaves)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel(out.cpu(), ref) <= TOL, f'output rel err {rel(out.cpu(), ref):.2e}'
    for name, g, rg in zip('qkv', grads, ref_grads, strict=True):
        assert rel(g.cpu(), rg) <= TOL, f'grad {name} rel err {rel(g.cpu(), rg):.2e}'


@pytest.mark.parametrize('block_m,block_n', [(16, 16), (16, 64), (32, 32)])
def test_tile_sizes_and_odd_length(block_m, block_n):
    # L = 77: no power of two, not a multiple of any tile; value width 12 != query width 6.
    compare(*features(2, 77, 6, 12, scale=1.0, seed=0), block_m=block_m, block_n=block_n)


def test_ties():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-1, 2, (1, 90, 4), generator=gen).float()
    k = torch.randint(-1, 2, (1, 90, 4), generator=gen).float() * 0.5
    v = torch.randn(1, 90, 5, generator=gen)
    compare(q, k, v)


def test_wide_supports_and_sharp_rows():
    # Rows from near-uniform (supports of most of the 120 keys, far beyond a topk of 16) to one entry.
    q, k, v = features(1, 120, 8, 20, scale=1.0, seed=5)
    q = q * torch.logspace(-3, 1, 120)[torch.randperm(120, generator=torch.Generator().manual_seed(0))][:, None]
    support = (hspa_ref(q, k, torch.eye(120)[None]) > 0).sum(-1)
    assert int(support.max()) > 100 and int((support == 1).sum()) > 5
    compare(q, k, v)


def test_all_equal_rows():
    q, k, v = features(2, 50, 6, 7, scale=1.0, seed=6)
    q[0, ::3] = 0            # zero queries: every score of the row is 0
    k[1] = k[1, :1]          # one key repeated: every row of sample 1 is constant
    compare(q, k, v)


def test_module_and_errors():
    torch.manual_seed(0)
    dense = attention.HSPA(channel=16, reduction=2, topk=8, impl='dense')
    fused = attention.HSPA(channel=16, reduction=2, topk=8, impl='triton').to(DEVICE)
    fused.load_state_dict(dense.state_dict())
    x = torch.randn(1, 16, 9, 7)
    with torch.no_grad():
        assert rel(fused(x.to(DEVICE)).cpu(), dense(x)) <= TOL
    q, k, v = features(1, 20, 4, 4, scale=1.0)
    with pytest.raises(ValueError, match='block_m'):
        hspa_triton(q, k, v, block_m=24)
    with pytest.raises(ValueError, match='expects'):
        hspa_triton(q, k[:, :5], v)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU path')
def test_gpu_check_says_there_is_no_gpu():
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py')], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert 'No CUDA GPU on this machine: the GPU checks did not run' in done.stdout
    assert 'CLI commands of this script parse: pass' in done.stderr
