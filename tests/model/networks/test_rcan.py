"""RCAN as published (yulunzhang/RCAN; laoyangui/HSPAN's copy with its unused `a`): state-dict layout, outputs at
x2/x3/x4/x8, the published forward_chop, checkpoints refused in one line, flags, and one CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import load_reference, reference_path
from nlsr import main, model, option
from nlsr.errors import UserError
from nlsr.model import checkpoint
from nlsr.model.contract import ChopRule
from nlsr.model.networks.rcan import RCAN
from oracles import assert_published, to_uint8

SCALES = (2, 3, 4, 8)
RANGE = 255


def _layout() -> dict:
    return json.loads(Path(reference_path('rcan_layout.json')).read_text())


def _small(ref: dict, scale: int) -> RCAN:
    a = ref['small_args']
    return RCAN(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resgroups=a['n_resgroups'],
                n_resblocks=a['n_resblocks'], reduction=a['reduction'], rgb_range=a['rgb_range']).eval()






@pytest.mark.parametrize('scale', SCALES)
def test_published_layout_keys_shapes_and_params(scale: int) -> None:
    layout = _layout()
    with torch.device('meta'):  # 15.4M parameters: shapes only
        net = RCAN(scale=scale)
    keys = layout['keys'][str(scale)]
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == keys
    assert sum(p.numel() for p in net.parameters()) == layout['params'][str(scale)]
    released = {k: torch.empty(shape, device='meta') for k, shape in keys}
    checkpoint.check_state_fits(net, released, 'RCAN_BIX.pt')
    # HSPAN's copy: the same keys with its unused `a` in front, dropped by name
    hspan = {k: torch.empty(shape, device='meta') for k, shape in layout['hspan_copy']['keys_in_front']}
    assert net.unused_keys() == frozenset(hspan)
    checkpoint.check_state_fits(net, {**hspan, **released}, 'HSPAN-trained RCAN')
    assert layout['hspan_copy']['params'][str(scale)] == layout['params'][str(scale)] + 1


@pytest.mark.parametrize('scale', SCALES)
def test_reproduces_published_outputs(scale: int) -> None:
    ref = load_reference('rcan')
    net = _small(ref, scale)
    assert list(net.state_dict()) == list(ref[f'x{scale}_state'])
    checkpoint.fit_into(net, ref[f'x{scale}_state'], None, f'x{scale}')
    with torch.no_grad():
        assert_published(net(ref['input']), ref[f'x{scale}_output'], RANGE, f'x{scale}')


def test_hspan_copy_checkpoint_loads_strictly_with_the_same_output(tmp_path: Path) -> None:
    ref = load_reference('rcan')
    net = _small(ref, 2)
    torch.save({'a': torch.tensor([0.25]), **ref['x2_state']}, tmp_path / 'hspan_rcan.pt')
    checkpoint.load_into(net, tmp_path / 'hspan_rcan.pt')
    assert 'a' not in net.state_dict()
    with torch.no_grad():
        assert_published(net(ref['input']), ref['x2_output'], RANGE, 'with a')


def test_weights_change_the_output() -> None:
    """The comparison can fail: one perturbed channel-attention weight moves the output."""
    ref = load_reference('rcan')
    net = _small(ref, 2)
    state = dict(ref['x2_state'])
    key = 'body.1.body.0.body.3.conv_du.2.bias'
    state[key] = state[key] + 0.5
    net.load_state_dict(state)
    with torch.no_grad():
        assert (net(ref['input']) - ref['x2_output']).abs().max().item() > 1e-4 * RANGE


def _wrapper(tmp_path: Path, ref: dict, *extra: str) -> model.Model:
    a = ref['small_args']
    torch.save(ref['x2_state'], tmp_path / 'x2.pt')
    args = option.parse(['--cpu', '--test_only', '--model', 'RCAN', '--scale', '2', '--n_resgroups',
                         str(a['n_resgroups']), '--n_resblocks', str(a['n_resblocks']), '--n_feats', str(a['n_feats']),
                         '--reduction', str(a['reduction']), '--rgb_range', str(a['rgb_range']),
                         '--pre_train', str(tmp_path / 'x2.pt'), *extra])
    return model.Model(args, log=lambda line: None).eval()


def test_chop_is_the_published_forward_chop(tmp_path: Path) -> None:
    ref = load_reference('rcan')
    m = _wrapper(tmp_path, ref, '--chop')
    assert m.chop_rule() == ChopRule(shave=10, min_size=160000)  # EDSR's, no rounding
    x = ref['chop_input']
    with torch.no_grad():
        chopped = m(x, 0)
        deeper = m.forward_chop(x, min_size=ref['chop_small_min_size'])  # quarters split once more
        plain = m.model(x)
    # same arithmetic on the same quarters: float32 rounding only, well below the seams' effect
    assert (chopped - ref['x2_chop_output']).abs().max().item() <= 1e-3
    assert (deeper - ref['x2_chop_small_output']).abs().max().item() <= 1e-3
    assert (plain - ref['x2_chop_output']).abs().max().item() > 1e-2
    assert (deeper - ref['x2_chop_output']).abs().max().item() > 1e-2


def test_x2_tail_in_x4_model_is_refused_in_one_line(tmp_path: Path) -> None:
    """The published loader skips a tail that does not fit ('Replace pre-trained upsampler'); here it is an
    error naming the keys."""
    ref = load_reference('rcan')
    net = _small(ref, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(ref['x2_state'], tmp_path / 'RCAN_BIX2.pt')
    with pytest.raises(UserError) as err:
        checkpoint.load_into(net, tmp_path / 'RCAN_BIX2.pt')
    message = str(err.value)
    assert '\n' not in message
    assert 'tail.0.2.weight' in message and 'tail.0.2.bias' in message
    assert '--scale 2 (built with 4)' in message
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_damaged_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    ref = load_reference('rcan')
    net = _small(ref, 2)
    state = dict(ref['x2_state'])
    cases = {}
    cases['missing'] = {k: v for k, v in state.items() if k != 'body.0.body.1.body.3.conv_du.0.bias'}
    cases['shape'] = {**state, 'head.0.weight': state['head.0.weight'][:, :, :2]}
    cases['foreign'] = {**state, 'b': torch.zeros(1)}  # only `a` is a published unused entry
    cases['nan'] = {**state, 'tail.1.bias': torch.full_like(state['tail.1.bias'], float('nan'))}
    expected = {'missing': 'body.0.body.1.body.3.conv_du.0.bias', 'shape': 'head.0.weight checkpoint',
                'foreign': '1 unexpected keys: b', 'nan': 'tail.1.bias'}
    for name, bad in cases.items():
        torch.save(bad, tmp_path / f'{name}.pt')
        with pytest.raises(UserError) as err:
            checkpoint.load_into(net, tmp_path / f'{name}.pt')
        assert '\n' not in str(err.value) and expected[name] in str(err.value), name
    torch.save(state, tmp_path / 'whole.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'whole.pt').read_bytes()[:4000])
    with pytest.raises(UserError, match='cannot read it as a weights file') as err:
        checkpoint.load_into(net, tmp_path / 'cut.pt')
    assert '\n' not in str(err.value)


def test_make_model_flags() -> None:
    args = option.parse(['--cpu', '--test_only', '--template', 'RCAN', '--scale', '3', '--n_resgroups', '2',
                         '--n_resblocks', '1', '--n_feats', '16', '--reduction', '4'])
    assert (args.rgb_range, args.chop, args.reduction) == (255, True, 4)
    net = model.make_network(args)
    assert isinstance(net, RCAN) and net.config == dict(scale=3, n_colors=3, n_feats=16, n_resgroups=2,
                                                        n_resblocks=1, reduction=4, rgb_range=255)
    assert RCAN.infer_config(net.state_dict()) == dict(n_feats=16, n_colors=3, scale=3, n_resgroups=2,
                                                       n_resblocks=1, reduction=4)
    with torch.no_grad():
        assert net(torch.rand(1, 3, 7, 5) * 255).shape == (1, 3, 21, 15)
    with pytest.raises(UserError, match=r'^--reduction 32 with --n_feats 16'):
        model.make_network(option.parse(['--cpu', '--model', 'RCAN', '--n_feats', '16', '--reduction', '32']))
    with pytest.raises(UserError, match=r'^--scale 5'):
        model.make_network(option.parse(['--cpu', '--test_only', '--model', 'RCAN', '--scale', '5', '--n_feats',
                                         '8', '--reduction', '4']))
    with pytest.raises(UserError, match='--res_scale is not used by --model RCAN'):
        model.check_model_flags(option.parse(['--cpu', '--model', 'RCAN', '--res_scale', '0.1']))


def test_cli_reproduces_published_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """python src/main.py --model RCAN ... --pre_train F --test_only --data_test Demo: the saved x3 SR image is
    the published output within one grey level."""
    ref = load_reference('rcan')
    a = ref['small_args']
    demo = tmp_path / 'demo'
    demo.mkdir()
    iio.imwrite(demo / 'crop.png', to_uint8(ref['input'], RANGE))
    assert torch.equal(torch.from_numpy(iio.imread(demo / 'crop.png')).permute(2, 0, 1)[None].float(), ref['input'])
    torch.save(ref['x3_state'], tmp_path / 'RCAN_BIX3.pt')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = ['--template', 'RCAN', '--no_chop', '--scale', '3', '--test_only', '--data_test', 'Demo',
            '--dir_demo', str(demo), '--pre_train', str(tmp_path / 'RCAN_BIX3.pt'), '--save_results',
            '--n_threads', '0', '--save', 'rcan', '--reset', '--n_resgroups', str(a['n_resgroups']),
            '--n_resblocks', str(a['n_resblocks']), '--n_feats', str(a['n_feats']), '--reduction', str(a['reduction'])]
    assert main.main(argv) == 0
    sr = iio.imread(tmp_path / 'experiment' / 'rcan' / 'results-Demo' / 'crop_x3_SR.png')
    expected = to_uint8(ref['x3_output'], RANGE)
    assert sr.shape == expected.shape
    diff = np.abs(sr.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.002
