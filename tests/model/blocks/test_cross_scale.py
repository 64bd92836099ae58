"""MSNLAN's cross-scale attention computed over query tiles (model.cross_scale) against the published block.

Oracles: the published arithmetic (CrossScaleAttention impl='dense': correlation by conv2d, pasting by
conv_transpose2d), an independent unfold/fold formulation written here, the published outputs of the
reference MSNLAN (../shared/reference), and entmax's sparsemax for the soft-thresholding variant.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from nlsr.model.blocks.cross_scale import cross_scale_attention, tile_shape
from nlsr.model.hspa import dispatch
from nlsr.model.networks.msnlan import MSNLAB, MSNLAN, CrossScaleAttention
from oracles import entmax_sparsemax

BLOCKS = [3, 17, 0]


def _unfold_oracle(module: CrossScaleAttention, x_l: torch.Tensor, x_s: torch.Tensor, normalize) -> torch.Tensor:
    """The block written with unfold/fold: scores between all k x k patches, weights, patches folded back."""
    k, p = module.ksize, module.ksize // 2
    match, key, value = module.conv_match_1(x_l), module.conv_match_2(x_s), module.conv_assembly(x_s)
    queries = F.unfold(match, k, padding=p)  # (N, C' k^2, H W)
    keys = F.unfold(key, k, padding=p)  # (N, C' k^2, L)
    keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-4)
    weights = normalize(module.softmax_scale * queries.transpose(1, 2) @ keys, -1)  # (N, H W, L)
    cols = F.unfold(value, k, padding=p) @ weights.transpose(1, 2)  # (N, C k^2, H W)
    return F.fold(cols, x_l.shape[2:], k, padding=p) + module.res_scale * x_l


def _pair(ksize: int, normalizer: str, seed: int = 0) -> tuple[CrossScaleAttention, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    module = CrossScaleAttention(8, 0.5, ksize, ksize // 2, normalizer=normalizer, topk=4).double()
    x_l = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    # as in the MSNLAB, the key map is larger than the query map for ksize 5 and 7
    x_s = torch.randn(2, 8, 9 + ksize - 3, 11 + ksize - 3, dtype=torch.float64)
    return module, x_l, x_s


@pytest.mark.parametrize('ksize', [3, 5, 7])
@pytest.mark.parametrize('normalizer', ['softmax', 'soft_threshold'])
def test_blocked_equals_dense_and_unfold_oracle(ksize: int, normalizer: str) -> None:
    module, x_l, x_s = _pair(ksize, normalizer)
    normalize = (lambda s, d: F.softmax(s, dim=d)) if normalizer == 'softmax' else entmax_sparsemax
    with torch.no_grad():
        oracle = _unfold_oracle(module, x_l, x_s, normalize)
        module.impl = 'dense'
        dense = module(x_l, x_s)
        torch.testing.assert_close(dense, oracle, rtol=0, atol=1e-10)
        module.impl = 'fast'  # the blocked path
        for block in BLOCKS:
            module.block_size = block
            torch.testing.assert_close(module(x_l, x_s), dense, rtol=0, atol=1e-10, msg=f'block {block}')
    if normalizer == 'soft_threshold':  # the weights are sparse here, so the comparison has teeth
        key = F.unfold(module.conv_match_2(x_s), ksize, padding=ksize // 2)
        scores = module.softmax_scale * F.unfold(module.conv_match_1(x_l), ksize, padding=ksize // 2).transpose(1, 2) \
            @ (key / key.norm(dim=1, keepdim=True))
        zeros = (entmax_sparsemax(scores, -1) == 0).double().mean().item()
        assert 0.5 < zeros < 1


@pytest.mark.parametrize('normalizer', ['softmax', 'soft_threshold'])
def test_blocked_gradients_equal_dense(normalizer: str) -> None:
    module, x_l, x_s = _pair(5, normalizer, seed=1)
    weight = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    grads = {}
    for impl, block in (('dense', 0), ('fast', 7), ('fast', 40)):
        module.impl, module.block_size = impl, block
        a, b = x_l.clone().requires_grad_(), x_s.clone().requires_grad_()
        module.zero_grad()
        (module(a, b) * weight).sum().backward()
        grads[impl, block] = [a.grad, b.grad] + [p.grad.clone() for p in module.parameters()]
    for key in (('fast', 7), ('fast', 40)):
        for got, want in zip(grads[key], grads['dense', 0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_blocked_float32_tiles_agree() -> None:
    torch.manual_seed(2)
    match, key, value = torch.randn(4, 13, 10), torch.randn(4, 15, 12), torch.randn(6, 15, 12)
    escape = torch.tensor([1e-4])
    with torch.no_grad():
        whole = cross_scale_attention(match, key, value, 5, 10, escape, block_size=10_000)
        for block in (9, 33):
            torch.testing.assert_close(cross_scale_attention(match, key, value, 5, 10, escape, block_size=block),
                                       whole, rtol=1e-5, atol=1e-5)


def test_tile_shape_and_bad_arguments() -> None:
    assert tile_shape(1, 9, 11) == (1, 1)
    assert tile_shape(64, 100, 100) == (8, 8)
    assert tile_shape(64, 100, 5) == (12, 5)  # narrow images: whole rows
    assert tile_shape(10_000, 7, 9) == (7, 9)
    with pytest.raises(ValueError):
        tile_shape(0, 4, 4)
    x = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match='odd'):
        cross_scale_attention(x, x, x, 4, 10, torch.tensor([1e-4]))
    with pytest.raises(ValueError, match='normalizer'):
        cross_scale_attention(x, x, x, 3, 10, torch.tensor([1e-4]), normalizer='relu')


def test_auto_takes_dense_for_small_maps_and_blocked_above(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    block = MSNLAB(16, 1.0).eval()
    x = torch.randn(1, 16, 12, 10)
    outs = {}
    with torch.no_grad():
        for impl in ('auto', 'dense', 'fast'):
            for name in ('atten1', 'atten2', 'atten3'):
                getattr(block, name).stoL.impl = impl
            outs[impl] = block(x)
        assert torch.equal(outs['auto'], outs['dense'])
        monkeypatch.setattr(dispatch, 'CROSS_SCALE_DENSE_MAX', 0)
        for name in ('atten1', 'atten2', 'atten3'):
            getattr(block, name).stoL.impl = 'auto'
        assert torch.equal(block(x), outs['fast'])
    torch.testing.assert_close(outs['fast'], outs['dense'], rtol=1e-5, atol=1e-5)


def _reference_net(ref: dict, scale: int, **kw) -> MSNLAN:
    a = ref['small_args']
    net = MSNLAN(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resgroups=a['n_resgroups'],
                 n_resblocks=a['n_resblocks'], res_scale=a['res_scale'], rgb_range=a['rgb_range'], **kw)
    net.load_state_dict(ref[f'x{scale}_state'], strict=True)
    return net.eval()


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_blocked_msnlan_matches_published_model(scale: int) -> None:
    """With the published weights: in float64 the blocked network equals the published arithmetic at every
    tile size; in float32 it is at least as close to that float64 result as the published float32 output."""
    ref = torch.load(shared_path('reference', 'msnlan_reference.pt'), weights_only=True)
    x = ref['input']
    with torch.no_grad():
        truth = _reference_net(ref, scale, msnlab_impl='dense').double()(x.double())
        published_error = (ref[f'x{scale}_output'].double() - truth).abs().max().item()
        for block in (150, 0):
            net = _reference_net(ref, scale, msnlab_impl='fast', msnlab_block=block)
            torch.testing.assert_close(net.double()(x.double()), truth, rtol=0, atol=1e-9)
            error = (net.float()(x).double() - truth).abs().max().item()
            assert error <= published_error, f'block {block}: {error} > {published_error}'


_PEAK_SCRIPT = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
from nlsr.model.networks.msnlan import CrossScaleAttention

def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
x_l, x_s = torch.randn(1, 16, 64, 64), torch.randn(1, 16, 68, 68)
for impl, block in (('fast', 64), ('dense', 0)):
    module = CrossScaleAttention(16, 1.0, 7, 3, impl=impl, block_size=block).eval()
    with torch.no_grad():
        module(x_l[:, :, :8, :8], x_s[:, :, :12, :12])  # warm-up
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        before = status('VmRSS')
        module(x_l, x_s)
        print(impl, status('VmHWM') - before)
'''


def test_blocked_extra_memory_is_bounded_by_the_tile(tmp_path) -> None:
    """Extra peak RSS of one 64x64 attention (4096 queries x 4624 patches, 76 MB per score map): the blocked
    computation with 64-query tiles stays far below the published one, which holds whole score maps."""
    import subprocess
    import sys

    from conftest import SRC

    if not Path('/proc/self/clear_refs').exists():
        pytest.skip('/proc/self/clear_refs is not available: no peak-RSS reset')
    r = subprocess.run([sys.executable, '-c', _PEAK_SCRIPT, str(SRC)], capture_output=True, text=True, timeout=300)
    if r.returncode and 'clear_refs' in r.stderr:
        pytest.skip(f'peak-RSS reset refused: {r.stderr.strip().splitlines()[-1]}')
    assert r.returncode == 0, r.stderr
    extra = {line.split()[0]: int(line.split()[1]) for line in r.stdout.splitlines()}
    assert extra['dense'] > 150e6  # two score maps at least: the measurement sees them
    assert extra['fast'] < 40e6  # measured 20 MB: four tile buffers of about 196 x 4900 floats and padding
