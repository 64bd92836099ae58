"""RDN, DDBPN and MDSR as published in laoyangui/HSPAN: layouts, published outputs at every published scale, the
chop rule, refused checkpoints, flag errors, and the command line (tests/reference/README.md says how the
reference data was made).

RDN's and DDBPN's widths are fixed by the published code (a small configuration would still be megabytes),
so their reference files hold the seed and gain of each state instead of the state: `seeded_state` rebuilds it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import load_reference, reference_path, run_main, tiny_world
from nlsr import main, model, option
from nlsr.errors import UserError
from nlsr.model import checkpoint
from nlsr.model.networks import ddbpn, mdsr, rdn
from nlsr.model.networks.hspan import HSPAN_CHOP
from oracles import assert_published

SCALES = {'rdn': (2, 3, 4), 'ddbpn': (2, 4, 8), 'mdsr': (2, 3, 4)}
MODEL = {'rdn': 'RDN', 'ddbpn': 'DDBPN', 'mdsr': 'MDSR'}


def seeded_state(state: dict[str, torch.Tensor], seed: int, gain: float) -> dict[str, torch.Tensor]:
    """The reference weights: in state-dict order, uniform(-b, b) from one generator seeded with `seed`, with
    b = gain * sqrt(3 / fan_in) for 2-d and larger entries (fan_in = the product of all but the first
    dimension) and b = gain * 0.1 for 1-d ones; the MeanShift entries keep their values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.startswith(('sub_mean.', 'add_mean.')):
            out[key] = value.detach().clone()
            continue
        u = torch.rand(value.shape, generator=g, dtype=torch.float32) * 2 - 1
        fan = math.prod(value.shape[1:]) if value.dim() > 1 else 0
        out[key] = u * (gain * (math.sqrt(3 / fan) if fan else 0.1))
    return out


def small_net(name: str, scale: int) -> torch.nn.Module:
    """The reference's small configuration of `name` at `scale` (MDSR: every scale, `scale` selected), with
    the reference weights, in eval mode."""
    ref = load_reference(name)
    a = ref['small_args']
    if name == 'rdn':
        net = rdn.RDN(scale=scale, n_colors=a['n_colors'], G0=a['G0'], RDNkSize=a['RDNkSize'],
                      RDNconfig=a['RDNconfig'], rgb_range=a['rgb_range'])
    elif name == 'ddbpn':
        net = ddbpn.DDBPN(scale=scale, n_colors=a['n_colors'], rgb_range=a['rgb_range'])
    else:
        net = mdsr.MDSR(scales=a['scale'], n_colors=a['n_colors'], n_feats=a['n_feats'],
                        n_resblocks=a['n_resblocks'], rgb_range=a['rgb_range'])
        net.load_state_dict(ref['state'], strict=True)
        net.set_scale(a['scale'].index(scale))
        return net.eval()
    net.load_state_dict(seeded_state(net.state_dict(), ref[f'x{scale}_seed'], ref['state_gain']), strict=True)
    return net.eval()




def _args(*argv: str):
    return option.parse(['--cpu', '--test_only', *argv])


# ---- layouts

def _published_net(name: str, scale: int | str) -> torch.nn.Module:
    if name == 'rdn':
        return rdn.RDN(scale=int(scale), G0=64, RDNkSize=3, RDNconfig='B')
    if name == 'ddbpn':
        return ddbpn.DDBPN(scale=int(scale))
    return mdsr.MDSR(scales=[int(s) for s in str(scale).split('+')], n_feats=64, n_resblocks=80)


@pytest.mark.parametrize('name', ['rdn', 'ddbpn', 'mdsr'])
def test_default_layout_keys_order_shapes_and_params(name: str) -> None:
    layout = json.loads(Path(reference_path(f'{name}_layout.json')).read_text())
    assert sorted(layout['keys']) == (['2+3+4'] if name == 'mdsr' else sorted(map(str, SCALES[name])))
    for scale, keys in layout['keys'].items():
        with torch.device('meta'):
            net = _published_net(name, scale)
        assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == keys, scale
        assert sum(p.numel() for p in net.parameters()) == layout['params'][scale]
        fake = {k: torch.empty(shape, device='meta') for k, shape in keys}
        checkpoint.check_state_fits(net, fake, 'layout')  # a released checkpoint's keys load strictly


def test_published_sizes_and_quirks() -> None:
    with torch.device('meta'):
        big = rdn.RDN(scale=4, RDNkSize=5)
    # the dense layers stay 3x3 whatever --RDNkSize; x4 upsamples in two steps
    assert big.RDBs[0].convs[0].conv[0].kernel_size == (3, 3) and big.SFENet1.kernel_size == (5, 5)
    assert [type(m).__name__ for m in big.UPNet] == ['Conv2d', 'PixelShuffle', 'Conv2d', 'PixelShuffle', 'Conv2d']
    # published sizes: RDN 22.1M at x2, MDSR 8.0M
    assert json.loads(reference_path('rdn_layout.json').read_text())['params']['2'] == 22_123_395
    assert round(json.loads(reference_path('mdsr_layout.json').read_text())['params']['2+3+4'] / 1e6, 1) == 8.0


# ---- published outputs

@pytest.mark.parametrize('name', ['rdn', 'ddbpn', 'mdsr'])
def test_reproduces_published_outputs_at_every_scale(name: str) -> None:
    ref = load_reference(name)
    for scale in SCALES[name]:
        with torch.no_grad():
            out = small_net(name, scale)(ref['input'])
        assert_published(out, ref[f'x{scale}_output'], ref['small_args']['rgb_range'])


def test_reference_comparison_can_fail() -> None:
    """Another seed, or another MDSR branch, moves the output far beyond the tolerance."""
    ref = load_reference('rdn')
    net = small_net('rdn', 2)
    net.load_state_dict(seeded_state(net.state_dict(), 99, 1.0))
    with torch.no_grad():
        assert (net(ref['input']) - ref['x2_output']).abs().max().item() > 1
    ref = load_reference('mdsr')
    net = small_net('mdsr', 3)
    net.set_scale(0)  # the x2 branch
    with torch.no_grad():
        assert net(ref['input']).shape == ref['x2_output'].shape
        net.set_scale(2)
        assert (net(ref['input']) - ref['x4_output']).abs().max().item() < 0.03
        net.pre_process[2][0].body[0].weight.data.add_(0.01)
        assert (net(ref['input']) - ref['x4_output']).abs().max().item() > 0.1


# ---- the chop rule

@pytest.mark.parametrize('name,scale', [('rdn', 2), ('ddbpn', 2), ('mdsr', 3)])
def test_chop_is_the_published_forward_chop(name: str, scale: int) -> None:
    ref = load_reference(name)
    a = ref['small_args']
    scales = a['scale'] if name == 'mdsr' else [scale]
    wrapper = model.Model(_args('--model', MODEL[name], '--scale', '+'.join(map(str, scales)), '--chop',
                                '--rgb_range', str(a['rgb_range']), *_size_flags(name, a)), log=lambda s: None)
    wrapper.model.load_state_dict(small_net(name, scale).state_dict(), strict=True)
    wrapper.eval()
    assert wrapper.model.chop_rule(scale) == HSPAN_CHOP  # laoyangui/HSPAN's forward_chop, shared by its models
    x, expected = ref['chop_input'], ref[f'x{scale}_chop_output']
    with torch.no_grad():
        out = wrapper(x, scales.index(scale))
        whole = small_net(name, scale)(x)
    assert_published(out, expected, a['rgb_range'])
    assert (whole - expected).abs().max().item() > 0.1  # the cut matters: the whole image gives another output


def _size_flags(name: str, a: dict) -> list[str]:
    if name == 'rdn':
        return ['--G0', str(a['G0']), '--RDNkSize', str(a['RDNkSize']), '--RDNconfig', a['RDNconfig']]
    if name == 'mdsr':
        return ['--n_feats', str(a['n_feats']), '--n_resblocks', str(a['n_resblocks'])]
    return []


# ---- refused checkpoints and flags

def _refusal(net: torch.nn.Module, state: dict) -> str:
    with pytest.raises(UserError) as err:
        checkpoint.fit_into(net, state, None, '--pre_train f.pt')
    message = str(err.value)
    assert '\n' not in message and message.startswith('--pre_train f.pt does not fit')
    return message


def test_mismatched_checkpoints_are_refused_naming_the_keys() -> None:
    x2 = small_net('rdn', 2).state_dict()
    msg = _refusal(small_net('rdn', 4), x2)  # an x2 tail in an x4 model
    assert 'missing keys: UPNet.4.weight, UPNet.4.bias' in msg
    assert 'UPNet.2.weight checkpoint [3, 32, 5, 5] vs model [128, 32, 5, 5]' in msg
    assert 'likely cause: the checkpoint looks like --scale 2 (built with 4)' in msg
    msg = _refusal(small_net('ddbpn', 4), small_net('ddbpn', 2).state_dict())
    assert 'upmodules.0.conv_1.0.weight checkpoint [32, 32, 6, 6] vs model [32, 32, 8, 8]' in msg
    assert '--scale 2 (built with 4)' in msg
    damaged = {k: v for k, v in small_net('ddbpn', 2).state_dict().items() if k != 'downmodules.3.conv_2.1.weight'}
    assert '1 missing keys: downmodules.3.conv_2.1.weight' in _refusal(small_net('ddbpn', 2), damaged)
    # the published MDSR checkpoint (three branches) in an MDSR built for --scale 4 alone
    three = small_net('mdsr', 2).state_dict()
    a = load_reference('mdsr')['small_args']
    one = mdsr.MDSR(scales=[4], n_feats=a['n_feats'], n_resblocks=a['n_resblocks'])
    msg = _refusal(one, three)
    assert 'unexpected keys: pre_process.1.0.body.0.weight' in msg and '--scale 2+3+4 (built with 4)' in msg
    msg = _refusal(small_net('rdn', 2), three)
    assert 'not laid out like RDN' in msg


@pytest.mark.parametrize('argv,message', [
    (['--model', 'DDBPN', '--scale', '3'], '--scale 3: DDBPN upsamples by 2, 4 or 8'),
    (['--model', 'RDN', '--scale', '8'], '--scale 8: RDN upsamples by 2, 3 or 4'),
    (['--model', 'MDSR', '--scale', '2+5'], '--scale 5: MDSR upsamples by powers of 2 or by 3'),
    (['--model', 'DDBPN', '--n_feats', '32'], '--n_feats is not used by --model DDBPN'),
    (['--model', 'MDSR', '--res_scale', '0.1'], '--res_scale is not used by --model MDSR'),
])
def test_flag_errors_are_one_line(argv: list[str], message: str) -> None:
    args = _args(*argv)
    with pytest.raises(UserError) as err:
        model.registry.check_model_flags(args)
        model.make_network(args)
    assert str(err.value).startswith(message) and '\n' not in str(err.value)


def test_make_model_maps_args_and_infer_config_round_trip() -> None:
    net = model.make_network(_args('--model', 'RDN', '--scale', '3', '--G0', '8', '--RDNconfig', 'A'))
    assert net.config == dict(scale=3, n_colors=3, G0=8, RDNkSize=3, RDNconfig='A', rgb_range=255)
    assert rdn.RDN.infer_config(net.state_dict()) == {k: v for k, v in net.config.items() if k != 'rgb_range'}
    net = model.make_network(_args('--model', 'DDBPN', '--scale', '8', '--n_colors', '1'))
    assert ddbpn.DDBPN.infer_config(net.state_dict()) == {'n_colors': 1, 'scale': 8}
    net = model.make_network(_args('--model', 'MDSR', '--scale', '2+3+4', '--n_feats', '8', '--n_resblocks', '2'))
    assert net.multi_scale and net.config['scale'] == [2, 3, 4]
    assert mdsr.MDSR.infer_config(net.state_dict()) == {'n_feats': 8, 'n_colors': 3, 'scale': '2+3+4',
                                                        'n_resblocks': 2}
    with pytest.raises(IndexError, match='scale index 3'):
        net.set_scale(3)


def test_templates() -> None:
    args = _args('--template', 'MDSR')
    assert (args.model, args.scale, args.n_resblocks, args.n_feats, args.rgb_range) == ('MDSR', [2, 3, 4], 80, 64, 255)
    args = _args('--template', 'DDBPN')
    assert (args.model, args.scale, args.rgb_range) == ('DDBPN', [4], 255)
    args = _args('--template', 'RDN', '--scale', '2')
    assert (args.model, args.G0, args.RDNkSize, args.RDNconfig, args.rgb_range) == ('RDN', 64, 3, 'B', 255)
    assert not any(_args('--template', t).chop for t in ('RDN', 'DDBPN', 'MDSR'))  # published: whole images


# ---- the command line

def _to_png(t: torch.Tensor, rgb_range: float) -> np.ndarray:
    return (t[0].permute(1, 2, 0) * 255 / rgb_range).clamp(0, 255).round().to(torch.uint8).numpy()


def _demo(monkeypatch, tmp_path: Path, lr: torch.Tensor, rgb_range: float, *argv: str) -> Path:
    demo = tmp_path / 'demo'
    demo.mkdir(exist_ok=True)
    iio.imwrite(demo / 'crop.png', _to_png(lr, rgb_range))
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    assert main.main([*argv, '--test_only', '--data_test', 'Demo', '--dir_demo', str(demo), '--save_results',
                      '--n_threads', '0', '--save', 'ref', '--reset', '--rgb_range', str(rgb_range)]) == 0
    return tmp_path / 'experiment' / 'ref' / 'results-Demo'


def _assert_png(path: Path, expected: torch.Tensor, rgb_range: float) -> None:
    sr, ref = iio.imread(path).astype(int), _to_png(expected, rgb_range).astype(int)
    assert sr.shape == ref.shape
    diff = np.abs(sr - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.002


def test_cli_rdn_reproduces_the_published_output(monkeypatch, tmp_path: Path) -> None:
    ref = load_reference('rdn')
    a = ref['small_args']
    torch.save(small_net('rdn', 3).state_dict(), tmp_path / 'RDN_x3.pt')  # a bare, published-layout file
    out = _demo(monkeypatch, tmp_path, ref['input'], a['rgb_range'], '--model', 'RDN', '--scale', '3',
                '--pre_train', str(tmp_path / 'RDN_x3.pt'), *_size_flags('rdn', a))
    _assert_png(out / 'crop_x3_SR.png', ref['x3_output'], a['rgb_range'])


def test_cli_mdsr_serves_every_scale_from_one_checkpoint(monkeypatch, tmp_path: Path) -> None:
    ref = load_reference('mdsr')
    a = ref['small_args']
    torch.save(ref['state'], tmp_path / 'MDSR.pt')
    out = _demo(monkeypatch, tmp_path, ref['input'], a['rgb_range'], '--model', 'MDSR', '--scale', '2+3+4',
                '--pre_train', str(tmp_path / 'MDSR.pt'), *_size_flags('mdsr', a))
    for s in (2, 3, 4):
        _assert_png(out / f'crop_x{s}_SR.png', ref[f'x{s}_output'], a['rgb_range'])
    # a file this project writes records the scales: --pre_train alone rebuilds the three branches
    wrapper = model.Model(_args('--model', 'MDSR', '--scale', '2+3+4', *_size_flags('mdsr', a)), log=lambda s: None)
    wrapper.model.load_state_dict(ref['state'])
    wrapper.save(tmp_path / 'saved', epoch=1)
    saved = str(tmp_path / 'saved' / 'model' / 'model_latest.pt')
    args, configured = option.build(['--cpu', '--test_only', '--model', 'MDSR', '--pre_train', saved])
    assert args.scale == [2, 3, 4] and '--scale 2+3+4' in configured.adopted
    loaded = model.Model(args, log=lambda s: None, configured=configured)
    assert torch.equal(loaded.model.upsample[1][0].weight, ref['state']['upsample.1.0.weight'])
    with pytest.raises(UserError, match=r'^--scale 4 contradicts --pre_train .*saved with --scale 2\+3\+4$'):
        model.Model(_args('--model', 'MDSR', '--scale', '4', '--pre_train', saved), log=lambda s: None)


def test_mdsr_trains_every_branch_and_resumes(monkeypatch, tmp_path: Path) -> None:
    world = tiny_world(tmp_path)
    flags = ['--model', 'MDSR', '--scale', '2+3', '--n_feats', '8', '--n_resblocks', '1', '--patch_size', '12',
             '--batch_size', '2', '--test_every', '4', '--print_every', '2', '--n_threads', '0', '--data_train', 'Tiny',
             '--data_test', 'Mini', '--save', 'mdsr', '--save_models']
    run_main(world, monkeypatch, flags, '--epochs', '1', '--reset', '--seed', '3')
    run_main(world, monkeypatch, flags, '--epochs', '2', '--load', 'mdsr', '--resume', '-1')
    folder = world['exp'] / 'mdsr'
    first, _ = checkpoint.read_checkpoint(folder / 'model' / 'model_1.pt')
    second, config = checkpoint.read_checkpoint(folder / 'model' / 'model_2.pt')
    assert config['scale'] == [2, 3] and config['model'] == 'mdsr'
    for branch in ('upsample.0.0.weight', 'upsample.1.0.weight'):  # batches of both scales reached their branch
        assert not torch.equal(first[branch], second[branch]), branch
    log = (folder / 'log.txt').read_text()
    assert 'Mini x2' in log and 'Mini x3' in log
