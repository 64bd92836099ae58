"""SAN as published (daitao/SAN TestCode): state-dict layout, published outputs at x2/x3/x4/x8, the published
forward_chop, the entries the published forward never reads, bounded memory on whole images, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import SRC, load_reference, reference_path
from nlsr import main, model, option
from nlsr.errors import UserError
from nlsr.model import checkpoint
from nlsr.model.blocks.second_order import (
    EmbeddedGaussianNonLocal,
    RegionNonLocal,
    covariance,
    covariance_window,
    newton_schulz_sqrt,
)
from nlsr.model.contract import ChopRule
from nlsr.model.networks.san import SAN
from oracles import assert_published, to_uint8

SCALES = (2, 3, 4, 8)
RGB_RANGE = 255
TOLERANCE = 1e-4 * RGB_RANGE  # 1e-4 at rgb_range 1


def _layout() -> dict:
    return json.loads(Path(reference_path('san_layout.json')).read_text())


def _small(scale: int, **kw: object) -> SAN:
    a = load_reference('san')['small_args']
    cfg = dict(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resgroups=a['n_resgroups'],
               n_resblocks=a['n_resblocks'], reduction=a['reduction'], rgb_range=a['rgb_range'])
    return SAN(**{**cfg, **kw})


def _small_flags(ref: dict) -> list[str]:
    a = ref['small_args']
    return [f for k in ('n_resgroups', 'n_resblocks', 'n_feats', 'reduction', 'rgb_range')
            for f in (f'--{k}', str(a[k]))]






@pytest.mark.parametrize('scale', SCALES)
def test_published_layout_and_unused_entries(scale: int) -> None:
    layout = _layout()
    published = layout['keys'][str(scale)]
    with torch.device('meta'):  # 15.7M parameters: shapes only
        net = SAN(scale=scale, n_feats=64, n_resgroups=20, n_resblocks=10, reduction=16)
    unused = net.unused_keys()
    # the unused entries are exactly the published ones this network lacks: SAN.conv_last, RG.<i>.gamma and
    # the SOCA of the non-local module
    assert unused == {k for k, _ in published} - set(net.state_dict())
    assert len(unused) == 2 + 20 + 4 and {'conv_last.weight', 'RG.19.gamma', 'non_local.soca.conv_du.2.bias'} <= unused
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert got == [e for e in published if e[0] not in unused]
    unused_count = sum(int(np.prod(shape)) for k, shape in published if k in unused)
    assert sum(p.numel() for p in net.parameters()) + unused_count == layout['params'][str(scale)]
    # a released checkpoint (exactly the published keys and shapes) passes the strict check
    fake = {k: torch.empty(shape, device='meta') for k, shape in published}
    checkpoint.check_state_fits(net, fake, 'layout')
    cfg = SAN.infer_config(fake)
    assert cfg == {'n_feats': 64, 'n_colors': 3, 'scale': scale, 'n_resgroups': 20, 'n_resblocks': 10,
                   'reduction': 16}


@pytest.mark.parametrize('scale', SCALES)
def test_reproduces_published_outputs(scale: int) -> None:
    ref = load_reference('san')
    net = _small(scale)
    checkpoint.fit_into(net, ref[f'x{scale}_state'], None, 'reference')  # strict, published extras dropped
    net.eval()
    with torch.no_grad():
        assert_published(net(ref['input']), ref[f'x{scale}_output'], RGB_RANGE)


def test_used_and_unused_entries() -> None:
    """gamma (the share-source skip) and the non-local W are used; the entries named unused are not."""
    ref = load_reference('san')
    state = ref['x2_state']
    for key in ('gamma', 'non_local.non_local.W.weight'):
        assert state[key].abs().min() > 0  # the reference gave them values (they start at zero)
        net = _small(2)
        changed = dict(state)
        changed[key] = state[key] * 1.5
        checkpoint.fit_into(net, changed, None, 'reference')
        with torch.no_grad():
            assert (net.eval()(ref['input']) - ref['x2_output']).abs().max().item() > 10 * TOLERANCE, key
    net = _small(2)
    assert all(state[k].abs().max() > 0 for k in net.unused_keys())  # random in the published state, ignored
    without = {k: v for k, v in state.items() if k not in net.unused_keys()}
    checkpoint.fit_into(net, without, None, 'reference')


def test_bf16_autocast_keeps_second_order_statistics_in_float32() -> None:
    ref = load_reference('san')
    net = _small(2)
    checkpoint.fit_into(net, ref['x2_state'], None, 'reference')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = net.eval()(ref['input']).float()
    assert torch.isfinite(out).all() and (out - ref['x2_output']).abs().mean().item() < 1  # of 255


def test_chop_is_the_published_forward_chop(tmp_path: Path) -> None:
    ref = load_reference('san')
    assert _small(2).chop_rule(2) == ChopRule(shave=10, min_size=160000, h_mult=0, w_mult=0)
    torch.save(ref['x2_state'], tmp_path / 'x2.pt')
    args = option.parse(['--cpu', '--test_only', '--model', 'SAN', '--scale', '2', *_small_flags(ref), '--chop',
                         '--pre_train', str(tmp_path / 'x2.pt')])
    m = model.Model(args, log=lambda line: None).eval()
    x = ref['chop_input']
    with torch.no_grad():
        out = m(x, 0)
        whole = m.model(x)
    assert_published(out, ref['x2_chop_output'], RGB_RANGE)
    assert (whole - ref['x2_chop_output']).abs().max().item() > 1  # the quarters change a global network


def test_cli_reproduces_published_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ref = load_reference('san')
    demo = tmp_path / 'demo'
    demo.mkdir()
    iio.imwrite(demo / 'crop.png', to_uint8(ref['input'], RGB_RANGE))  # integer 0..255 values: exact in a PNG
    torch.save(ref['x3_state'], tmp_path / 'SAN_BIX3.pt')  # a bare published state dict
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = ['--template', 'SAN', '--no_chop', '--scale', '3', *_small_flags(ref), '--test_only',
            '--data_test', 'Demo', '--dir_demo', str(demo), '--pre_train', str(tmp_path / 'SAN_BIX3.pt'),
            '--save_results', '--n_threads', '0', '--save', 'san', '--reset', '--cpu']
    assert main.main(argv) == 0
    sr = iio.imread(tmp_path / 'experiment' / 'san' / 'results-Demo' / 'crop_x3_SR.png')
    expected = to_uint8(ref['x3_output'], RGB_RANGE)
    diff = np.abs(sr.astype(int) - expected.astype(int))
    assert sr.shape == expected.shape and diff.max() <= 1 and (diff > 0).mean() < 0.002


def _refusal(net: SAN, state: dict, tmp_path: Path) -> str:
    path = tmp_path / 'SAN.pt'
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        checkpoint.load_into(net, path)
    message = str(err.value)
    assert '\n' not in message and str(path) in message
    return message


def test_mismatched_or_damaged_checkpoint_refused_in_one_line(tmp_path: Path) -> None:
    ref = load_reference('san')
    x2, x4 = ref['x2_state'], ref['x4_state']
    # an x2 checkpoint in an x4 model (the published loader skips what does not fit in the tail): refused
    message = _refusal(_small(4), x2, tmp_path)
    assert 'does not fit SAN; 2 missing keys: tail.0.2.weight, tail.0.2.bias;' in message
    assert '--scale 2 (built with 4)' in message
    assert x4['tail.0.2.weight'].shape == (64, 16, 3, 3)
    message = _refusal(_small(3), x2, tmp_path)
    assert 'tail.0.0.weight checkpoint [64, 16, 3, 3] vs model [144, 16, 3, 3]' in message
    # another depth: the second group's keys are unexpected
    message = _refusal(_small(2, n_resgroups=1), x2, tmp_path)  # RG.1.gamma belongs to a group it lacks
    assert 'unexpected keys: RG.1.gamma, RG.1.rcab.0.conv_first.0.weight' in message
    assert '--n_resgroups 2 (built with 1)' in message
    damaged = dict(x2)
    del damaged['RG.1.soca.conv_du.0.weight']
    assert '1 missing keys: RG.1.soca.conv_du.0.weight' in _refusal(_small(2), damaged, tmp_path)
    damaged = {**x2, 'non_local.non_local.theta.weight': x2['non_local.non_local.theta.weight'] * float('nan')}
    assert 'not finite' in _refusal(_small(2), damaged, tmp_path)
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'SAN.pt').read_bytes()[:5000])
    with pytest.raises(UserError, match='cannot read it') as err:
        checkpoint.load_into(_small(2), tmp_path / 'cut.pt')
    assert '\n' not in str(err.value)


def test_make_model_flags_and_template() -> None:
    def parse(*argv: str):
        return option.parse(['--cpu', '--test_only', '--model', 'SAN', *argv])

    net = model.make_network(parse('--scale', '2', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8',
                                   '--reduction', '4'))
    assert isinstance(net, SAN) and net.config['n_feats'] == 8 and net.config['reduction'] == 4
    for argv, flag in ((('--n_feats', '4', '--reduction', '2'), '--n_feats 4'),
                       (('--n_feats', '16', '--reduction', '32'), '--reduction 32'),
                       (('--scale', '5'), '--scale 5')):
        with pytest.raises(UserError, match=flag) as err:
            model.make_network(parse(*argv))
        assert '\n' not in str(err.value)
    with pytest.raises(UserError, match='--res_scale is not used by --model SAN'):
        model.check_model_flags(parse('--res_scale', '0.1'))
    a = option.parse(['--template', 'SAN'])
    assert (a.model, a.n_resgroups, a.n_resblocks, a.n_feats, a.reduction, a.rgb_range, a.chop) == (
        'SAN', 20, 10, 64, 16, 255, True)


def test_covariance_and_square_root_as_published() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1
    m = 35
    i_hat = torch.eye(m, dtype=torch.float64) / m - 1.0 / m / m  # MPNCOV's centring matrix
    flat = x.reshape(2, 6, m)
    assert torch.allclose(covariance(x), flat @ i_hat @ flat.transpose(1, 2), atol=1e-12)
    cov = covariance(x)
    root = newton_schulz_sqrt(cov, 30)  # many iterations converge to the true square root
    assert torch.allclose(root @ root, cov, atol=1e-8)
    coarse = newton_schulz_sqrt(cov, 5)  # SAN's 5 iterations: an approximation, as published
    assert 1e-6 < (coarse - root).abs().max() < 0.5 * root.abs().max()
    trace = cov.diagonal(dim1=1, dim2=2).sum(-1).view(2, 1, 1)
    # one iteration: the published code returns its first Z, (3I - A) / 2, times sqrt(trace)
    assert torch.allclose(newton_schulz_sqrt(cov, 1), 0.5 * (3 * torch.eye(6) - cov / trace) * trace.sqrt())


def test_covariance_window_published_slices() -> None:
    assert covariance_window(torch.empty(1, 1, 999, 20, device='meta')).shape[-2:] == (999, 20)
    assert covariance_window(torch.empty(1, 1, 1200, 20, device='meta')).shape[-2:] == (1000, 20)
    assert covariance_window(torch.empty(1, 1, 30, 1300, device='meta')).shape[-2:] == (30, 1000)
    assert covariance_window(torch.empty(1, 1, 1100, 1300, device='meta')).shape[-2:] == (1000, 1000)
    # a side of exactly 1000: the published last branch slices rows (500 - 1000) // 2 = -250 : 750
    assert covariance_window(torch.empty(1, 1, 500, 1000, device='meta')).shape[-2:] == (250, 1000)
    y = torch.arange(500.0).view(1, 1, 500, 1).expand(1, 1, 500, 1000)
    assert covariance_window(y)[0, 0, 0, 0].item() == 250


def test_non_local_equals_softmax_attention_and_handles_thin_regions() -> None:
    torch.manual_seed(0)
    block = EmbeddedGaussianNonLocal(8, 2).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    q = block.theta(x).flatten(2).transpose(1, 2)
    k = block.phi(x).flatten(2)
    v = block.g(x).flatten(2).transpose(1, 2)
    y = (torch.softmax(q @ k, dim=-1) @ v).transpose(1, 2).reshape(2, 2, 9, 7)
    assert torch.allclose(block(x), block.W(y) + x, atol=1e-10)
    thin = torch.randn(1, 8, 1, 6, dtype=torch.float64)  # no key survives the 2x2 pooling: W(0) + x
    assert torch.allclose(block(thin), block.W(torch.zeros(1, 2, 1, 6, dtype=torch.float64)) + thin)
    region = RegionNonLocal(8, 2).double()
    region.non_local.load_state_dict(block.state_dict())
    out = region(x)
    assert torch.allclose(out[:, :, 4:, :3], block(x[:, :, 4:, :3]))  # quarters cut at int(h/2), int(w/2)
    assert region(torch.randn(1, 8, 1, 1, dtype=torch.float64)).shape == (1, 8, 1, 1)


def test_whole_feature_maps_in_linear_memory() -> None:
    """SOCA's covariance of a 1000x1000 map (the published centring matrix would hold 10^12 floats) and the
    region non-local block on a 160x160 map, both without their quadratic intermediates: the attention takes a
    memory-efficient kernel, not the math path that holds the scores."""
    with torch.no_grad():
        assert covariance(torch.randn(1, 4, 1000, 1000)).shape == (1, 4, 4)
        x = torch.randn(1, 8, 160, 160)
        with torch.profiler.profile() as prof:
            assert RegionNonLocal(8, 1)(x).shape == x.shape
    names = {event.key for event in prof.key_averages()}
    assert any('scaled_dot_product' in name for name in names), names
    assert not any('math' in name for name in names), names


@pytest.mark.slow
def test_published_default_configuration_whole_160_image_under_4_gib() -> None:
    """SAN (20 groups x 10 blocks, 64 features) on a 160x160 LR image at x2 without --chop: peak RSS of a
    fresh process below 4 GiB (the published covariance pooling alone needs 2 x 25600^2 floats, 5.2 GB)."""
    code = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(SRC)!r})
        from nlsr.model.networks.san import SAN
        torch.manual_seed(0)
        net = SAN(scale=2, n_feats=64, n_resgroups=20, n_resblocks=10, reduction=16, rgb_range=255).eval()
        with torch.no_grad():
            y = net(torch.rand(1, 3, 160, 160) * 255)
        assert y.shape == (1, 3, 320, 320) and bool(torch.isfinite(y).all())
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    peak_gib = int(done.stdout.split()[-1]) / 2**20  # ru_maxrss is in KiB on Linux
    assert peak_gib < 4, f'peak RSS {peak_gib:.2f} GiB'
