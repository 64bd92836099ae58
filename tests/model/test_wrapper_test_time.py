"""Test-time forwards of the Model wrapper: published --chop, --tile, --self_ensemble, --precision, modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_reference
from nlsr import model, option
from nlsr.errors import UserError
from nlsr.model import tiling
from nlsr.model.contract import ChopRule

IMPLS = ['dense', 'fast', 'auto']  # every HSPA algorithm the flag can select
# EDSR without residual blocks: head, body conv, upsampler conv (LR, radius 3) and tail conv (HR, radius 1):
# every output pixel depends on LR pixels at most 4 away.
TINY_EDSR = ['--model', 'EDSR', '--n_resblocks', '0', '--n_feats', '4', '--rgb_range', '1']


def _silent(line: str) -> None:
    pass


def _model(*argv: str, logs: list[str] | None = None) -> model.Model:
    args = option.parse(['--cpu', '--test_only', *argv])
    m = model.Model(args, log=logs.append if logs is not None else _silent)
    return m.eval()


def _plain(m: model.Model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.model(x)


@pytest.mark.parametrize('impl', IMPLS)
def test_chop_reproduces_published_forward_chop(tmp_path: Path, impl: str) -> None:
    ref = load_reference('hspan')
    a = ref['small_args']
    torch.save(ref['x2_state'], tmp_path / 'x2.pt')
    flags = ['--model', 'HSPAN', '--scale', '2', '--n_resgroups', str(a['n_resgroups']),
             '--n_resblocks', str(a['n_resblocks']), '--n_feats', str(a['n_feats']), '--topk', str(a['topk']),
             '--reduction', str(a['reduction']), '--rgb_range', str(a['rgb_range']),
             '--res_scale', str(a['res_scale']), '--hspa_impl', impl, '--pre_train', str(tmp_path / 'x2.pt')]
    m = _model(*flags, '--chop')
    x = ref['chop_input']
    with torch.no_grad():
        out = m(x, 0)
    expected = ref['x2_chop_output']
    assert out.shape == expected.shape == (1, 3, 140, 180)
    assert (out - expected).abs().max().item() <= 1e-5
    if impl == 'dense':  # (once: a 70x90 forward is slow) the quarters matter, the unchopped output differs
        assert (_plain(m, x) - expected).abs().max().item() > 1e-3


def test_chop_equals_plain_for_local_model_and_recurses() -> None:
    torch.manual_seed(0)
    m = _model(*TINY_EDSR, '--scale', '3', '--chop')
    x = torch.rand(1, 3, 37, 52)
    plain = _plain(m, x)
    with torch.no_grad():
        chopped = m(x)
        deep = m.forward_chop(x, min_size=100)  # two more levels of quarters
    # overlap (shave 10) exceeds the receptive field: chopping is invisible
    assert torch.allclose(chopped, plain, atol=1e-6)
    assert torch.allclose(deep, plain, atol=1e-6)
    tiny = torch.rand(1, 3, 12, 12)  # too small to split: plain forward
    with torch.no_grad():
        assert torch.equal(m(tiny), _plain(m, tiny))


def test_chop_rules() -> None:
    from nlsr.model.contract import EDSR_CHOP
    from nlsr.model.networks.hspan import HSPAN_CHOP

    assert HSPAN_CHOP == ChopRule(shave=10, min_size=120000, h_mult=4, w_mult=8)
    m = _model('--model', 'HSPAN', '--scale', '2', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8',
               '--reduction', '2', '--topk', '8')
    assert m.chop_rule() == HSPAN_CHOP
    m = _model('--model', 'MSNLAN', '--scale', '4', '--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16')
    assert m.chop_rule() == ChopRule(shave=10, min_size=3600, h_mult=4, w_mult=4)
    # EDSR's own rule (EDSR-PyTorch's forward_chop: min_size 160000, quarters not rounded), not HSPAN's
    m = _model(*TINY_EDSR, '--scale', '2')
    assert m.chop_rule() == EDSR_CHOP == ChopRule(shave=10, min_size=160000, h_mult=0, w_mult=0)


def test_tile_geometry_and_weights() -> None:
    for length, tile, overlap in [(100, 32, 8), (33, 32, 8), (32, 32, 8), (10, 32, 8), (257, 48, 16), (70, 20, 19)]:
        starts = tiling.tile_starts(length, tile, overlap)
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length
        for a, b in zip(starts, starts[1:], strict=False):
            assert a < b and a + size - b >= overlap
        for scale in (1, 3):
            weights = tiling.tile_weights(starts, length, tile, overlap, scale)
            total = torch.zeros(scale * length, dtype=torch.float64)
            for a, w in zip(starts, weights, strict=True):
                assert w.shape == (scale * size,)
                total[scale * a:scale * (a + size)] += w
            assert torch.allclose(total, torch.ones_like(total))


def test_tiled_equals_untiled_within_receptive_field() -> None:
    torch.manual_seed(1)
    m = _model(*TINY_EDSR, '--scale', '2', '--tile', '24', '--tile_overlap', '16')
    x = torch.rand(2, 3, 50, 71)
    with torch.no_grad():
        tiled = m(x)
    assert (tiled - _plain(m, x)).abs().max().item() <= 1e-5
    # with a thin overlap (68 = 3 tiles of 24 overlapping by exactly 2) the seams show: the comparison can fail
    thin = _model(*TINY_EDSR, '--scale', '2', '--tile', '24', '--tile_overlap', '2')
    thin.model.load_state_dict(m.model.state_dict())
    x = torch.rand(1, 3, 68, 68)
    assert tiling.tile_starts(68, 24, 2) == [0, 22, 44]
    with torch.no_grad():
        assert (thin(x) - _plain(m, x)).abs().max().item() > 1e-4


def test_tiled_close_for_nonlocal_model() -> None:
    torch.manual_seed(2)
    m = _model('--model', 'HSPAN', '--scale', '2', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '16',
               '--topk', '8', '--rgb_range', '1', '--hspa_impl', 'dense', '--tile', '20', '--tile_overlap', '8')
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        tiled = m(x)
    plain = _plain(m, x)
    assert tiled.shape == plain.shape
    diff = (tiled - plain).abs()
    assert 0 < diff.mean().item() < 1e-2 * plain.abs().mean().item()


def test_tile_flag_validation_and_precedence() -> None:
    with pytest.raises(UserError, match='--tile_overlap 24'):
        _model(*TINY_EDSR, '--tile', '24', '--tile_overlap', '24')
    with pytest.raises(UserError, match='--tile -1'):
        _model(*TINY_EDSR, '--tile', '-1')
    with pytest.raises(UserError, match='--chop and --tile'):  # one of them would silently win
        _model(*TINY_EDSR, '--tile', '24', '--chop')
    assert _model('--template', 'MSNLAN', '--model', 'EDSR', '--n_resblocks', '0', '--n_feats', '4',
                  '--res_scale', '1', '--tile', '24', '--no_chop').tile == 24


def _manual_x8(forward, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for t in range(8):
        y = x.flip(-1) if t & 1 else x
        y = y.flip(-2) if t & 2 else y
        y = y.transpose(-1, -2) if t & 4 else y
        sr = forward(y)
        sr = sr.transpose(-1, -2) if t & 4 else sr
        sr = sr.flip(-2) if t & 2 else sr
        sr = sr.flip(-1) if t & 1 else sr
        outs.append(sr)
    return sum(outs) / 8


def test_self_ensemble_equals_manual_average() -> None:
    torch.manual_seed(3)
    m = _model('--model', 'EDSR', '--n_resblocks', '1', '--n_feats', '8', '--scale', '3', '--self_ensemble')
    x = torch.rand(2, 3, 9, 13) * 255
    with torch.no_grad():
        out = m(x)
        manual = _manual_x8(m.model, x)
        single = m.model(x)
    assert out.shape == (2, 3, 27, 39)
    assert torch.allclose(out, manual, atol=1e-4)
    assert (out - single).abs().max().item() > 1e-3  # a random net is not flip-equivariant


def test_self_ensemble_wraps_chop() -> None:
    torch.manual_seed(4)
    m = _model(*TINY_EDSR, '--scale', '2', '--self_ensemble', '--chop')
    x = torch.rand(1, 3, 30, 41)
    with torch.no_grad():
        out = m(x)
        manual = _manual_x8(lambda y: m.forward_chop(y, min_size=200), x)
        out_small = tiling.forward_x8(x, lambda y: m.forward_chop(y, min_size=200))
    assert torch.allclose(out, manual, atol=1e-5)
    assert torch.allclose(out_small, manual, atol=1e-6)


def test_training_mode_is_plain_forward() -> None:
    torch.manual_seed(5)
    m = _model(*TINY_EDSR, '--scale', '2', '--self_ensemble', '--tile', '8', '--tile_overlap', '2')
    m.train()
    x = torch.rand(1, 3, 30, 30)
    out = m(x)
    assert out.requires_grad
    assert torch.equal(out.detach(), _plain(m, x))
    m.eval()
    with torch.no_grad():
        assert not torch.equal(m(x), _plain(m, x))


def test_precision_half_on_cpu_keeps_float32() -> None:
    torch.manual_seed(6)
    logs: list[str] = []
    m = _model(*TINY_EDSR, '--scale', '2', '--precision', 'half', logs=logs)
    assert any('--precision half needs CUDA' in line for line in logs)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        out = m(x)
    assert out.dtype == torch.float32 and torch.equal(out, _plain(m, x))


def test_device_notice_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    logs: list[str] = []
    m = model.Model(option.parse([*TINY_EDSR, '--test_only']), log=logs.append)
    assert m.device.type == 'cpu'
    assert sum('CUDA is not available' in line for line in logs) == 1
