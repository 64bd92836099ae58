"""Soft thresholding (sparsemax) operator: stored published values, gradcheck, entmax agreement, ties, retry."""

from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from nlsr.model.attention import SoftThreshold, soft_threshold
from oracles import entmax_sparsemax


@pytest.fixture(scope='module')
def reference() -> dict:
    return torch.load(shared_path('reference', 'hspan_reference.pt'), weights_only=True)


@pytest.mark.parametrize('kind', ['sparse', 'wide'])
def test_matches_published_operator(reference: dict, kind: str) -> None:
    x = reference[f'st_{kind}_input'].clone().requires_grad_(True)
    assert x.dtype == torch.float64
    y = soft_threshold(x, dim=2, topk=16)
    (y * reference[f'st_{kind}_weight']).sum().backward()
    assert (y - reference[f'st_{kind}_output']).abs().max().item() <= 1e-10
    assert (x.grad - reference[f'st_{kind}_grad']).abs().max().item() <= 1e-10
    support = (y > 0).sum(dim=2)
    if kind == 'wide':  # the data must exercise the retry with 2k (supports larger than topk)
        assert support.max().item() > 16
    else:
        assert support.max().item() < 16


def _rows_with_ties_and_wide_support(gen: torch.Generator) -> torch.Tensor:
    n = 64
    narrow = torch.randn(40, n, generator=gen, dtype=torch.float64) * 3  # small supports
    wide = torch.randn(40, n, generator=gen, dtype=torch.float64) * 0.01  # support ~ whole row (> topk)
    ties = torch.randint(0, 4, (40, n), generator=gen).double() * 0.25  # many exact ties, incl. at the max
    top_ties = torch.zeros(8, n, dtype=torch.float64)
    top_ties[:, :20] = 1.0  # 20 tied maxima: support exactly the tied block, larger than topk
    return torch.cat([narrow, wide, ties, top_ties])


@pytest.mark.parametrize('topk', [None, 1, 4, 16, 64, 500])
def test_random_rows_match_entmax_sparsemax(topk: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = _rows_with_ties_and_wide_support(gen).requires_grad_(True)
    weight = torch.randn(rows.shape, generator=gen, dtype=torch.float64)

    ours = soft_threshold(rows, dim=-1, topk=topk)
    (ours * weight).sum().backward()
    ours_grad = rows.grad.clone()

    rows.grad = None
    theirs = entmax_sparsemax(rows, dim=-1)
    (theirs * weight).sum().backward()

    assert (ours - theirs).abs().max().item() <= 1e-12
    assert (ours_grad - rows.grad).abs().max().item() <= 1e-12
    assert torch.allclose(ours.sum(-1), torch.ones(rows.shape[0], dtype=torch.float64))
    assert (ours > 0).sum(-1).max().item() > 16  # wide supports really occur


def test_other_dims_and_shapes() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, 5, generator=gen, dtype=torch.float64)
    for dim in range(4):
        moved = x.movedim(dim, -1)
        expected = soft_threshold(moved.reshape(-1, moved.shape[-1]), topk=2).reshape(moved.shape).movedim(-1, dim)
        assert torch.equal(soft_threshold(x, dim=dim, topk=2), expected)
        assert soft_threshold(x, dim=dim).shape == x.shape


def test_backward_formula_on_support() -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 30, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    g = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    y = soft_threshold(x, topk=3)
    (grad,) = torch.autograd.grad(y, x, g)
    support = y > 0
    for r in range(5):
        s = support[r]
        assert torch.allclose(grad[r, s], g[r, s] - g[r, s].mean())
        assert torch.all(grad[r, ~s] == 0)


@pytest.mark.parametrize('topk', [None, 2, 8])
def test_gradcheck(topk: int | None) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 4, 12, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: SoftThreshold.apply(t, 1, topk), (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda t: soft_threshold(t, dim=-1, topk=topk), (x,), eps=1e-6, atol=1e-8)


def test_low_precision_input_keeps_dtype_and_sums_to_one() -> None:
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(4)) * 0.05
    y16 = soft_threshold(x.bfloat16(), topk=8)
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float().sum(-1), torch.ones(4), atol=2e-2)
    assert torch.allclose(y16.float(), soft_threshold(x.bfloat16().float(), topk=8), atol=1e-2)


def test_invalid_topk() -> None:
    with pytest.raises(ValueError):
        soft_threshold(torch.zeros(2, 3), topk=0)
