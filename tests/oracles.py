"""The independent references of the exactness tests, one definition each: a sort-based sparsemax
(Martins & Astudillo 2016; autograd through it gives the exact sparsemax Jacobian, and run in float64 it is
the oracle), the entmax package's sparsemax, dense HSPA built on the sort-based one, the relative error the
tests bound, and the feature maps they draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

TOL = 1e-5  # max |ours - oracle| / max |oracle|, float32


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


def entmax_sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The entmax package's sparsemax (a test-only dependency: the calling test skips without it)."""
    entmax = pytest.importorskip('entmax', reason='entmax (test-only dependency) is not installed')
    return entmax.sparsemax(scores, dim=dim)


def hspa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense HSPA: sparsemax(q k^T) v with the sort-based sparsemax."""
    return sparsemax_ref(q @ k.transpose(1, 2)) @ v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error every exactness bound is stated in."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def features(n: int, length: int, ck: int, c: int, scale: float, seed: int = 0):
    """Seeded query (n, length, ck) scaled by `scale`, key (n, length, ck) and value (n, length, c) maps."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, length, ck, generator=gen) * scale
    k = torch.randn(n, length, ck, generator=gen)
    v = torch.randn(n, length, c, generator=gen)
    return q, k, v


def inference_inputs(case: str, dtype: torch.dtype):
    """The hard inputs of the no-gradient paths: 'ties', 'all_equal' rows, 'compressed' scores, and 'mixed'
    supports from one entry to thousands."""
    if case == 'ties':
        gen = torch.Generator().manual_seed(4)
        q = torch.randint(-1, 2, (2, 700, 4), generator=gen).float()
        k = torch.randint(-1, 2, (2, 700, 4), generator=gen).float() * 0.5
        v = torch.randn(2, 700, 5, generator=gen)
    elif case == 'all_equal':
        q, k, v = features(2, 600, 6, 7, scale=1.0, seed=6)
        q[0, ::3] = 0
        k[1] = k[1, :1]
    elif case == 'compressed':
        q, k, v = features(1, 1500, 16, 24, scale=0.01, seed=12)
    else:  # supports from one entry to thousands
        q, k, v = features(1, 2304, 8, 6, scale=1.0, seed=5)
        q = q * torch.logspace(-4, 1, 2304)[torch.randperm(2304, generator=torch.Generator().manual_seed(0))][:, None]
    return tuple(t.to(dtype) for t in (q, k, v))


def to_uint8(t: torch.Tensor, rgb_range: float) -> np.ndarray:
    """The first image of (N, C, H, W) values on 0..rgb_range as HxWxC uint8, as main.py quantises outputs."""
    return (t[0].permute(1, 2, 0) * 255 / rgb_range).clamp(0, 255).round().to(torch.uint8).numpy()


def assert_published(out: torch.Tensor, expected: torch.Tensor, rgb_range: float, label: str = '') -> None:
    """`out` is the published output `expected` within float32 rounding: at most 1e-4 * rgb_range apart, and as
    8-bit images at most one level apart on under 0.2% of the values."""
    assert out.shape == expected.shape, label
    assert (out - expected).abs().max().item() <= 1e-4 * rgb_range, label
    levels = [(t.detach() * 255 / rgb_range).clamp(0, 255).round() for t in (out, expected)]  # every image
    diff = (levels[0] - levels[1]).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 0.002, label
