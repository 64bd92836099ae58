"""Fused Triton HSPA (src/model/hspa/triton/) against the dense oracle.

Without a GPU the kernels run on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are imported), so the maps are small. Outputs and q/k/v gradients must agree with the sort-based
sparsemax oracle to 1e-5 relative in float32.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
pytest.importorskip('triton')

from conftest import ROOT  # noqa: E402
from model import attention  # noqa: E402
from model.hspa.triton import SHARED_PER_BLOCK, Tiles, choose_tiles, hspa_triton  # noqa: E402
from model.hspa.triton.static_check import WIDTHS  # noqa: E402
from oracles import TOL, features, hspa_ref, rel  # noqa: E402

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
# Small forced tiles: value chunks of 16 over widths up to 40 (three chunks, the last one partly masked).
SMALL = Tiles(block_m=16, block_n=16, block_d=16, block_c=16, block_q=16)


def compare(q, k, v, tiles: Tiles | None = SMALL) -> None:
    leaves = [t.detach().clone().to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = hspa_triton(*leaves, tiles=tiles)
    ref = hspa_ref(*ref_leaves)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    grads = torch.autograd.grad((out * weight.to(DEVICE)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_leaves)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel(out.cpu(), ref) <= TOL, f'output rel err {rel(out.cpu(), ref):.2e}'
    for name, g, rg in zip('qkv', grads, ref_grads, strict=True):
        assert rel(g.cpu(), rg) <= TOL, f'grad {name} rel err {rel(g.cpu(), rg):.2e}'


def chosen_tiles() -> set[Tiles]:
    """Every configuration the chooser returns for the project's widths on the listed GPUs, and for a
    query width past 128 (its 16-row tiles)."""
    widths = [*WIDTHS.values(), (200, 20)]
    return {choose_tiles(cap, kw, width) for cap in SHARED_PER_BLOCK for kw, width in widths}


@pytest.mark.parametrize('tiles', sorted(chosen_tiles(), key=str), ids=str)
def test_every_chosen_configuration(tiles):
    # L = 77: no power of two, not a multiple of any tile. Widths as wide as the tile's accumulators, so the
    # value width spans two chunks (the second one partly masked) and the query width 3/4 of block_q.
    kw, width = tiles.block_q * 3 // 4, tiles.block_c + tiles.block_c // 2
    q, k, v = features(1, 77, kw, width, scale=1.0, seed=2)
    compare(q / kw ** 0.5, k, v, tiles)


def test_chooser_fits_every_listed_gpu():
    for cap in SHARED_PER_BLOCK:
        for kw, width in WIDTHS.values():
            tiles = choose_tiles(cap, kw, width)
            assert tiles.block_q >= kw and tiles.shared_bytes() <= SHARED_PER_BLOCK[cap]
    with pytest.raises(ValueError, match='query/key width'):
        choose_tiles((8, 0), 300, 64)


@pytest.mark.parametrize('tiles', [SMALL, Tiles(16, 32, 16, 32, 16), Tiles(32, 16, 16, 16, 16)], ids=str)
def test_tile_sizes_and_odd_length(tiles):
    # L = 77; value width 40 != query width 6: three value chunks of 16, a query chunk mostly masked.
    compare(*features(2, 77, 6, 40, scale=1.0, seed=0), tiles)


def test_default_tiles_and_low_precision_inputs():
    q, k, v = features(1, 40, 6, 12, scale=1.0, seed=3)
    compare(q, k, v, tiles=None)
    halves = [t.to(torch.bfloat16).to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    out = hspa_triton(*halves)
    out.float().sum().backward()
    ref = hspa_ref(*(t.detach().float().cpu() for t in halves))
    assert out.dtype == torch.bfloat16 and halves[0].grad.dtype == torch.bfloat16
    assert rel(out.float().cpu(), ref) <= 1e-2  # the bfloat16 rounding of the output


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
    with pytest.raises(ValueError, match='powers of two'):
        hspa_triton(q, k, v, tiles=Tiles(24, 16, 16, 16, 16))
    with pytest.raises(ValueError, match='expects'):
        hspa_triton(q, k[:, :5], v)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU path')
def test_gpu_check_says_there_is_no_gpu():
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py')], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert 'No CUDA GPU on this machine: the GPU checks did not run' in done.stdout
    assert 'CLI commands of this script parse: pass' in done.stderr
