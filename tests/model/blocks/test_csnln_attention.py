"""CSNLN's attentions (model.blocks.csnln_attention) against the published blocks and an oracle.

Oracles: the published NonLocalAttention and CrossScaleAttention run on random maps (float64 outputs in
tests/reference/csnln_reference.pt), and the published cross-scale arithmetic written out here (unfolded
patches, conv2d correlation, softmax, conv_transpose2d paste), also for gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import load_reference
from nlsr.model.blocks.csnln_attention import CrossScaleAttention, InScaleAttention


def _published_cross_scale(module: CrossScaleAttention, x: torch.Tensor) -> torch.Tensor:
    """The published forward: 3s x 3s assembly patches at stride s ('same' padding), 3 x 3 normalised key
    patches of the bilinearly downscaled map, correlation, softmax(10 x), stride-s paste, / 6."""
    s, k = module.scale, module.ksize
    value = module.conv_assembly(x)
    patches = F.unfold(F.pad(value, (s, s, s, s)), 3 * s, stride=s)  # (N, C 9s^2, L)
    n, c = value.shape[:2]
    raw = patches.view(n, c, 3 * s, 3 * s, -1).permute(0, 4, 1, 2, 3)
    key = module.conv_match_2(F.interpolate(x, scale_factor=1 / s, mode='bilinear'))
    kp = F.unfold(F.pad(key, (1, 1, 1, 1)), k).view(n, key.shape[1], k, k, -1).permute(0, 4, 1, 2, 3)
    match = module.conv_match_1(x)
    out = []
    for i in range(n):
        wi = kp[i] / kp[i].pow(2).sum((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-4)
        yi = F.softmax(F.conv2d(F.pad(match[i:i + 1], (1, 1, 1, 1)), wi) * module.softmax_scale, dim=1)
        out.append(F.conv_transpose2d(yi, raw[i], stride=s, padding=s) / 6)
    return torch.cat(out)


def test_in_scale_attention_is_the_published_block() -> None:
    ref = load_reference('csnln')
    block = InScaleAttention(8).double()
    block.load_state_dict(ref['in_scale_state'], strict=True)
    with torch.no_grad():
        out = block(ref['in_scale_input'])
    torch.testing.assert_close(out, ref['in_scale_output'], rtol=0, atol=1e-12)


@pytest.mark.parametrize('scale', [2, 3])
@pytest.mark.parametrize('block_size', [0, 5])
def test_cross_scale_attention_is_the_published_block(scale: int, block_size: int) -> None:
    ref = load_reference('csnln')
    block = CrossScaleAttention(8, scale=scale, block_size=block_size).double()
    block.load_state_dict(ref[f'cross_scale_x{scale}_state'], strict=True)
    with torch.no_grad():
        out = block(ref[f'cross_scale_x{scale}_input'])
    torch.testing.assert_close(out, ref[f'cross_scale_x{scale}_output'], rtol=0, atol=1e-12)


@pytest.mark.parametrize('scale', [2, 3])
def test_cross_scale_attention_equals_oracle_with_gradients(scale: int) -> None:
    """Training path (autograd through the tiled attention): outputs and input gradients of the oracle."""
    torch.manual_seed(scale)
    block = CrossScaleAttention(6, scale=scale, block_size=7).double()
    x = torch.randn(2, 6, 3 * scale, 4 * scale, dtype=torch.float64, requires_grad=True)
    out = block(x)
    expected = _published_cross_scale(block, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, grad)
    (g_expected,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(g, g_expected, rtol=0, atol=1e-10)


def test_in_scale_attention_float32_and_gradients() -> None:
    torch.manual_seed(0)
    block = InScaleAttention(8)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    out = block(x)
    q = block.conv_match1(x).flatten(2).transpose(1, 2)
    k = block.conv_match2(x).flatten(2)
    v = block.conv_assembly(x).flatten(2).transpose(1, 2)
    expected = (F.softmax(q @ k, -1) @ v).transpose(1, 2).reshape(out.shape)  # no 1/sqrt(d), as published
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, g_expected, rtol=0, atol=1e-4)


def test_cross_scale_attention_needs_multiples_of_its_factor() -> None:
    block = CrossScaleAttention(4, scale=3)
    with pytest.raises(ValueError, match='multiples of 3'):
        block(torch.rand(1, 4, 9, 10))
