"""Networks as published: state-dict layouts, parameter counts, reference outputs; registry; ablations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_reference, reference_path
from nlsr import model, option
from nlsr.errors import UserError
from nlsr.model import checkpoint, common
from nlsr.model.networks.edsr import EDSR
from nlsr.model.networks.hspan import HSPAN
from nlsr.model.networks.msnlan import MSNLAN

HSPAN_DEFAULT = dict(n_feats=192, n_resgroups=10, n_resblocks=4, reduction=2, topk=128)
MSNLAN_DEFAULT = dict(n_feats=64, n_resgroups=8, n_resblocks=9)
IMPLS = ['dense', 'fast', 'auto']  # every HSPA algorithm the flag can select


def _layout(name: str) -> dict:
    return json.loads(Path(reference_path(f'{name}_layout.json')).read_text())


def _reference(name: str) -> dict:
    return load_reference(name)


@pytest.mark.parametrize('scale', [2, 3, 4])
@pytest.mark.parametrize('name,cls,kwargs', [('hspan', HSPAN, HSPAN_DEFAULT), ('msnlan', MSNLAN, MSNLAN_DEFAULT)])
def test_default_layout_keys_order_shapes_and_params(name: str, cls: type, kwargs: dict, scale: int) -> None:
    layout = _layout(name)
    with torch.device('meta'):  # 32M parameters: shapes only
        net = cls(scale=scale, **kwargs)
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert got == layout['keys'][str(scale)]
    assert sum(p.numel() for p in net.parameters()) == layout['params'][str(scale)]
    # a released checkpoint (exactly these keys and shapes) passes the strict check
    fake = {k: torch.empty(shape, device='meta') for k, shape in layout['keys'][str(scale)]}
    checkpoint.check_state_fits(net, fake, 'layout')


def _small_hspan(ref: dict, scale: int, impl: str) -> HSPAN:
    a = ref['small_args']
    return HSPAN(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resgroups=a['n_resgroups'],
                 n_resblocks=a['n_resblocks'], reduction=a['reduction'], topk=a['topk'],
                 res_scale=a['res_scale'], rgb_range=a['rgb_range'], hspa_impl=impl,
                 hspa_block=256 if impl == 'fast' else 0)  # an explicit block size forces the blocked path


@pytest.mark.parametrize('impl', IMPLS)
def test_hspan_reproduces_published_outputs(impl: str) -> None:
    ref = _reference('hspan')
    for scale in (2, 3, 4):
        net = _small_hspan(ref, scale, impl)
        net.load_state_dict(ref[f'x{scale}_state'], strict=True)
        net.eval()
        with torch.no_grad():
            out = net(ref['input'])
        expected = ref[f'x{scale}_output']
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() <= 1e-5, f'x{scale}'


def test_msnlan_reproduces_published_outputs() -> None:
    ref = _reference('msnlan')
    a = ref['small_args']
    for scale in (2, 3, 4):
        net = MSNLAN(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resgroups=a['n_resgroups'],
                     n_resblocks=a['n_resblocks'], res_scale=a['res_scale'], rgb_range=a['rgb_range'])
        assert list(net.state_dict()) == list(ref[f'x{scale}_state'])
        net.load_state_dict(ref[f'x{scale}_state'], strict=True)
        net.eval()
        with torch.no_grad():
            out = net(ref['input'])
        assert (out - ref[f'x{scale}_output']).abs().max().item() <= 1e-3, f'x{scale}'


def test_hspan_weights_change_output() -> None:
    """The reference comparison can fail: perturbing one attention weight moves the output."""
    ref = _reference('hspan')
    net = _small_hspan(ref, 2, 'dense')
    state = dict(ref['x2_state'])
    key = 'body.0.body.2.conv_assembly.0.weight'
    state[key] = state[key] + 0.05
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        assert (net(ref['input']) - ref['x2_output']).abs().max().item() > 1e-4


def _args(*argv: str):
    return option.parse(['--cpu', '--test_only', *argv])


def test_registry_case_insensitive_alias_and_discovery() -> None:
    names = model.registered_models()
    assert {'hspan', 'msnlan', 'edsr'} <= set(names)
    assert not {'common', 'attention', 'hspa', 'cross_scale'} & set(names)
    for text in ('HSPAN', 'hspan', 'HsPaN'):
        assert model.resolve_model_name(text) == 'hspan'
    assert model.resolve_model_name('MSDSN') == 'msnlan'
    assert model.resolve_model_name('msnlan') == 'msnlan'
    with pytest.raises(UserError) as err:
        model.resolve_model_name('RCAN_x4')
    message = str(err.value)
    assert '--model RCAN_x4' in message and '\n' not in message
    for n in names:  # every module with make_model is listed (e.g. bicubic once it exists)
        assert n in message


@pytest.mark.parametrize('name,cls', [('HSPAN', HSPAN), ('MSNLAN', MSNLAN), ('MSDSN', MSNLAN), ('edsr', EDSR)])
def test_make_model_maps_args(name: str, cls: type) -> None:
    args = _args('--model', name, '--scale', '3', '--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16',
                 *(['--hspa_impl', 'dense'] if name == 'HSPAN' else []))
    net = model.make_network(args)
    assert isinstance(net, cls)
    assert net.config['scale'] == 3 and net.config['n_feats'] == 16
    x = torch.rand(1, 3, 9, 7) * args.rgb_range
    with torch.no_grad():
        assert net(x).shape == (1, 3, 27, 21)


def test_edsr_configurations() -> None:
    with torch.device('meta'):
        baseline = EDSR(scale=2, n_feats=64, n_resblocks=16, res_scale=1)
        paper = EDSR(scale=4, n_feats=256, n_resblocks=32, res_scale=0.1)
    keys = list(baseline.state_dict())
    assert keys[:6] == ['sub_mean.weight', 'sub_mean.bias', 'add_mean.weight', 'add_mean.bias',
                        'head.0.weight', 'head.0.bias']
    assert keys[-6:] == ['body.16.weight', 'body.16.bias', 'tail.0.0.weight', 'tail.0.0.bias',
                         'tail.1.weight', 'tail.1.bias']
    # EDSR-PyTorch's documented sizes (trainable, i.e. without the frozen MeanShifts): baseline x2 1.37M
    # parameters, paper x4 43.1M
    assert sum(p.numel() for p in baseline.parameters() if p.requires_grad) == 1_369_859
    assert round(sum(p.numel() for p in paper.parameters() if p.requires_grad) / 1e6, 1) == 43.1
    assert EDSR.infer_config(paper.state_dict()) == {'n_feats': 256, 'n_colors': 3, 'scale': 4, 'n_resblocks': 32,
                                                     'attention': 'none'}


@pytest.mark.parametrize('cls,kwargs', [(HSPAN, HSPAN_DEFAULT), (MSNLAN, MSNLAN_DEFAULT)])
def test_infer_config_round_trip(cls: type, kwargs: dict) -> None:
    for scale in (2, 3, 4):
        with torch.device('meta'):
            state = cls(scale=scale, **kwargs).state_dict()
        cfg = cls.infer_config(state)
        assert cfg['scale'] == scale and cfg['n_feats'] == kwargs['n_feats']
        assert cfg['n_resgroups'] == kwargs['n_resgroups'] and cfg['n_resblocks'] == kwargs['n_resblocks']


def test_attention_ablation_keys() -> None:
    kw = dict(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, reduction=2, topk=8)
    hspa = HSPAN(attention='hspa', **kw).state_dict()
    softmax = HSPAN(attention='softmax', **kw).state_dict()
    none = HSPAN(attention='none', **kw).state_dict()
    assert [(k, v.shape) for k, v in softmax.items()] == [(k, v.shape) for k, v in hspa.items()]
    attention_keys = [k for k in hspa if '.conv_match' in k or '.conv_assembly' in k]
    assert attention_keys and list(none) == [k for k in hspa if k not in attention_keys]
    x = torch.rand(1, 3, 8, 6)
    for variant in ('hspa', 'softmax', 'none'):
        net = HSPAN(attention=variant, **kw).eval()
        with torch.no_grad():
            assert net(x).shape == (1, 3, 16, 12)
    with pytest.raises(ValueError):
        HSPAN(attention='bogus', **kw)


def test_softmax_attention_differs_from_hspa_with_same_weights() -> None:
    torch.manual_seed(0)
    kw = dict(scale=2, n_feats=16, n_resgroups=1, n_resblocks=1, reduction=2, topk=4, res_scale=1)
    a = HSPAN(attention='hspa', **kw).eval()
    b = HSPAN(attention='softmax', **kw).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() > 1e-6


def test_upsampler_rejects_unsupported_scale() -> None:
    with pytest.raises(ValueError, match='--scale 5'):  # layers raise ValueError; the CLI makes it one line
        common.Upsampler(common.default_conv, 5, 8)


def test_meanshift_frozen_and_values() -> None:
    shift = common.MeanShift(255, (0.4, 0.5, 0.6), sign=-1)
    assert not any(p.requires_grad for p in shift.parameters())
    x = torch.full((1, 3, 2, 2), 100.0)
    out = shift(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([100 - 102.0, 100 - 127.5, 100 - 153.0]))
    gray = common.MeanShift(1, (0.4, 0.5, 0.6), sign=1, n_colors=1)
    assert torch.allclose(gray(torch.zeros(1, 1, 1, 1)), torch.tensor(0.5))


def test_msnlan_attention_impl_and_block_from_the_flags() -> None:
    """--hspa_impl and --hspa_block reach MSNLAN's cross-scale attention (fast, the earlier name of blocked,
    read as blocked); dispatch.plan_cross_scale chooses from them."""
    from nlsr.model.networks.msnlan import CrossScaleAttention

    flags = ['--model', 'MSNLAN', '--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16']
    net = model.make_network(_args(*flags, '--hspa_impl', 'fast', '--hspa_block', '7'))
    found = [(m.impl, m.block_size) for m in net.modules() if isinstance(m, CrossScaleAttention)]
    assert found and set(found) == {('blocked', 7)}
    net = model.make_network(_args(*flags))
    assert {(m.impl, m.block_size) for m in net.modules() if isinstance(m, CrossScaleAttention)} == {('auto', 0)}
