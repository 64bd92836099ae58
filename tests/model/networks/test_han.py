"""HAN as published (wwlCape/HAN): state-dict layout, outputs at x2/x3/x4/x8, its layer attention and 3-D
channel-spatial attention on their own, the published forward_chop, checkpoints refused in one line, flags.
(The CLI run of this family is RCAN's, tests/model/networks/test_rcan.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_reference, reference_path
from nlsr import model, option
from nlsr.errors import UserError
from nlsr.model import checkpoint
from nlsr.model.contract import ChopRule
from nlsr.model.networks.han import HAN, ChannelSpatialAttention, LayerAttention
from nlsr.model.networks.rcan import RCAN
from oracles import assert_published

SCALES = (2, 3, 4, 8)
RANGE = 255


def _small(ref: dict, scale: int) -> HAN:
    a = ref['small_args']
    return HAN(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resgroups=a['n_resgroups'],
               n_resblocks=a['n_resblocks'], reduction=a['reduction'], rgb_range=a['rgb_range']).eval()






@pytest.mark.parametrize('scale', SCALES)
def test_published_layout_keys_shapes_and_params(scale: int) -> None:
    layout = json.loads(Path(reference_path('han_layout.json')).read_text())
    with torch.device('meta'):  # 15.9M parameters: shapes only
        net = HAN(scale=scale)
    keys = layout['keys'][str(scale)]
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == keys
    assert sum(p.numel() for p in net.parameters()) == layout['params'][str(scale)]
    checkpoint.check_state_fits(net, {k: torch.empty(shape, device='meta') for k, shape in keys}, 'HAN_BIX.pt')


@pytest.mark.parametrize('scale', SCALES)
def test_reproduces_published_outputs(scale: int) -> None:
    ref = load_reference('han')
    net = _small(ref, scale)
    checkpoint.fit_into(net, ref[f'x{scale}_state'], None, f'x{scale}')
    state = ref[f'x{scale}_state']
    assert state['la.gamma'].item() != 0 and state['csa.gamma'].item() != 0  # both attentions take part
    with torch.no_grad():
        assert_published(net(ref['input']), ref[f'x{scale}_output'], RANGE, f'x{scale}')


def test_attention_modules_reproduce_published_arithmetic() -> None:
    """The layer attention on a stack whose softmax is not one-hot, and the 3-D convolution attention."""
    ref = load_reference('han')
    la = LayerAttention()
    la.load_state_dict({'gamma': ref['lam_gamma']})
    x = ref['lam_input']
    with torch.no_grad():
        out = la(x)
        assert (out - ref['lam_output']).abs().max().item() <= 1e-6
        flat = x.flatten(2)
        energy = flat @ flat.transpose(1, 2)
        weights = torch.softmax(energy.amax(-1, keepdim=True) - energy, -1)
        assert 0.05 < weights.max().item() < 0.95  # a soft mixture: the arithmetic shows
    csa = ChannelSpatialAttention()
    csa.load_state_dict(ref['csam_state'])
    with torch.no_grad():
        assert (csa(ref['csam_input']) - ref['csam_output']).abs().max().item() <= 1e-6


@pytest.mark.parametrize('key', ['la.gamma', 'csa.gamma', 'csa.conv.weight', 'last_conv.weight'])
def test_attention_weights_change_the_output(key: str) -> None:
    """The comparison can fail: perturbing either attention (or the fusion of the layer stack) moves the output."""
    ref = load_reference('han')
    net = _small(ref, 2)
    state = dict(ref['x2_state'])
    if key == 'last_conv.weight':  # swap the first and last maps of the stack: its order matters
        n = ref['small_args']['n_feats']
        w = state[key].clone()
        w[:, :n], w[:, -n:] = state[key][:, -n:], state[key][:, :n]
        state[key] = w
    else:
        state[key] = state[key] + 0.5
    net.load_state_dict(state)
    with torch.no_grad():
        assert (net(ref['input']) - ref['x2_output']).abs().max().item() > 1e-4 * RANGE


def test_chop_is_the_published_forward_chop(tmp_path: Path) -> None:
    ref = load_reference('han')
    a = ref['small_args']
    torch.save(ref['x2_state'], tmp_path / 'x2.pt')
    args = option.parse(['--cpu', '--test_only', '--chop', '--model', 'HAN', '--scale', '2', '--n_resgroups',
                         str(a['n_resgroups']), '--n_resblocks', str(a['n_resblocks']), '--n_feats', str(a['n_feats']),
                         '--reduction', str(a['reduction']), '--rgb_range', str(a['rgb_range']),
                         '--pre_train', str(tmp_path / 'x2.pt')])
    m = model.Model(args, log=lambda line: None).eval()
    assert m.chop_rule() == ChopRule(shave=10, min_size=160000)  # EDSR's, no rounding
    x = ref['chop_input']
    with torch.no_grad():
        chopped = m(x, 0)
        plain = m.model(x)
    # same arithmetic on the same quarters (the recursion below min_size is tested with RCAN: same code)
    assert (chopped - ref['x2_chop_output']).abs().max().item() <= 1e-3
    assert (plain - ref['x2_chop_output']).abs().max().item() > 1e-1


def test_mismatched_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    ref = load_reference('han')
    a = ref['small_args']
    net = _small(ref, 4)
    cases = {
        'x2_tail': ref['x2_state'],
        'no_layer_attention': {k: v for k, v in ref['x4_state'].items() if not k.startswith('la.')},
        'rcan': RCAN(scale=4, n_feats=a['n_feats'], n_resgroups=a['n_resgroups'], n_resblocks=a['n_resblocks'],
                     reduction=a['reduction']).state_dict(),
        'damaged': {**ref['x4_state'], 'csa.conv.weight': ref['x4_state']['csa.conv.weight'][:, :, :2]},
    }
    expected = {'x2_tail': ('tail.0.2.weight', '--scale 2 (built with 4)'), 'no_layer_attention': ('la.gamma',),
                'rcan': ('csa.gamma', 'last_conv.weight', 'not laid out like HAN'),
                'damaged': ('csa.conv.weight checkpoint [1, 1, 2, 3, 3] vs model [1, 1, 3, 3, 3]',)}
    for name, state in cases.items():
        torch.save(state, tmp_path / f'{name}.pt')
        with pytest.raises(UserError) as err:
            checkpoint.load_into(net, tmp_path / f'{name}.pt')
        message = str(err.value)
        assert '\n' not in message and all(part in message for part in expected[name]), (name, message)
    # and the other way: a HAN checkpoint is not an RCAN's
    rcan = RCAN(scale=4, n_feats=a['n_feats'], n_resgroups=a['n_resgroups'], n_resblocks=a['n_resblocks'],
                reduction=a['reduction'])
    torch.save(ref['x4_state'], tmp_path / 'han.pt')
    with pytest.raises(UserError, match='unexpected keys: csa.gamma.*not laid out like RCAN'):
        checkpoint.load_into(rcan, tmp_path / 'han.pt')


def test_make_model_flags() -> None:
    args = option.parse(['--cpu', '--test_only', '--template', 'HAN', '--scale', '2', '--n_resgroups', '3',
                         '--n_resblocks', '1', '--n_feats', '8', '--reduction', '2'])
    assert (args.rgb_range, args.chop) == (255, True)
    net = model.make_network(args)
    assert isinstance(net, HAN) and net.config == dict(scale=2, n_colors=3, n_feats=8, n_resgroups=3,
                                                       n_resblocks=1, reduction=2, rgb_range=255)
    assert net.last_conv.in_channels == 8 * 4  # n_resgroups + 1 maps (published: 11, fixed)
    assert HAN.infer_config(net.state_dict()) == dict(n_feats=8, n_colors=3, scale=2, n_resgroups=3,
                                                      n_resblocks=1, reduction=2)
    with torch.no_grad():
        assert net(torch.rand(1, 3, 6, 5) * 255).shape == (1, 3, 12, 10)
    with pytest.raises(UserError, match=r'^--reduction 16 with --n_feats 8'):
        model.make_network(option.parse(['--cpu', '--model', 'HAN', '--n_feats', '8']))
    with pytest.raises(UserError, match='--topk is not used by --model HAN'):
        model.check_model_flags(option.parse(['--cpu', '--model', 'HAN', '--topk', '4']))
