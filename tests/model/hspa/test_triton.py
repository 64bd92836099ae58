"""Fused Triton HSPA (src/nlsr/model/hspa/triton/) against the dense oracle.

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

from nlsr.model import attention  # noqa: E402
from nlsr.model.hspa.triton import SHARED_PER_BLOCK, Tiles, choose_tiles, hspa_triton  # noqa: E402
from nlsr.model.hspa.triton.static_check import WIDTHS  # noqa: E402
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


def _step(net, lr_img: torch.Tensor, hr: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """One training step's loss and parameter gradients, then an evaluation forward."""
    net.train().zero_grad(set_to_none=True)
    loss = (net(lr_img) - hr).abs().mean()
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in net.named_parameters() if p.grad is not None}
    with torch.no_grad():
        evaluated = net.eval()(lr_img).cpu()
    return float(loss.detach()), grads, evaluated


def test_tiny_hspan_training_step_and_evaluation_match_the_cpu_engine():
    """A whole HSPAN (every HSPA layer on the triton plan) against the CPU engine (impl 'fast': the fused
    layer on the native kernels): loss, the parameter gradients and the evaluation output within 1e-5."""
    from nlsr.model.hspa import HSPA
    from nlsr.model.networks.hspan import HSPAN

    torch.manual_seed(0)
    cpu = HSPAN(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, reduction=2, topk=8, res_scale=1.0,
                hspa_impl='fast')
    fused = HSPAN(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, reduction=2, topk=8, res_scale=1.0,
                  hspa_impl='triton').to(DEVICE)
    fused.load_state_dict(cpu.state_dict())
    plans = []
    for m in fused.modules():
        if isinstance(m, HSPA):
            m.plan_log = plans.append
    gen = torch.Generator().manual_seed(1)
    lr_img, hr = torch.rand(1, 3, 9, 7, generator=gen), torch.rand(1, 3, 18, 14, generator=gen)
    loss, grads, evaluated = _step(cpu, lr_img, hr)
    fused_loss, fused_grads, fused_evaluated = _step(fused, lr_img.to(DEVICE), hr.to(DEVICE))
    assert plans and {p.path for p in plans} == {'triton'}
    assert abs(fused_loss - loss) <= TOL * abs(loss)
    assert fused_grads.keys() == grads.keys() and len(grads) > 20
    # Relative to the step's largest gradient entry: a one-element PReLU slope gradient is a sum over all
    # positions that cancels to ~1e-6, whose float32 rounding depends on the summation order.
    flat, fused_flat = (torch.cat([g[name].flatten() for name in grads]) for g in (grads, fused_grads))
    assert rel(fused_flat, flat) <= TOL, f'parameter gradients: rel err {rel(fused_flat, flat):.2e}'
    for name, g in grads.items():
        if g.numel() > 1:
            assert rel(fused_grads[name], g) <= TOL, f'{name}: rel err {rel(fused_grads[name], g):.2e}'
    assert rel(fused_evaluated, evaluated) <= TOL


def test_16_bit_weights_keep_their_dtype_on_the_triton_plan():
    layer = attention.HSPA(channel=16, reduction=2, topk=8, impl='triton').to(DEVICE, torch.bfloat16)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(DEVICE, torch.bfloat16)
    out = conv(layer(torch.randn(1, 16, 5, 6, device=DEVICE, dtype=torch.bfloat16)))
    assert out.dtype == torch.bfloat16
