"""CSNLN as published (SHI-Labs/Cross-Scale-Non-Local-Attention): state-dict layouts, published outputs at
x2, x3, x4 and through its forward_chop, checkpoint refusals, flags, and one run through the command line.

The reference (tests/reference/csnln_reference.pt, see its README) is the published code's output at a
tiny width (n_feats 8, depth 3); the layout file is the published default configuration (128, depth 12).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import ROOT, load_reference, reference_path
from nlsr import main, model, option
from nlsr.errors import UserError
from nlsr.model import checkpoint
from nlsr.model.contract import ChopRule
from nlsr.model.networks.csnln import CSNLN
from oracles import assert_published, to_uint8

SCALES = (2, 3, 4)


def _ref() -> dict:
    return load_reference('csnln')


def _small(scale: int) -> CSNLN:
    a = _ref()['small_args']
    return CSNLN(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], depth=a['depth'],
                 rgb_range=a['rgb_range'])


def _small_flags(scale: int) -> list[str]:
    a = _ref()['small_args']
    return ['--model', 'CSNLN', '--scale', str(scale), '--n_feats', str(a['n_feats']), '--depth', str(a['depth']),
            '--rgb_range', str(a['rgb_range'])]






@pytest.mark.parametrize('scale', SCALES)
def test_default_layout_keys_order_shapes_and_params(scale: int) -> None:
    layout = json.loads(Path(reference_path('csnln_layout.json')).read_text())
    with torch.device('meta'):
        net = CSNLN(scale=scale)  # the published defaults: 128 features, depth 12
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert got == layout['keys'][str(scale)]
    assert sum(p.numel() for p in net.parameters()) == layout['params'][str(scale)]
    fake = {k: torch.empty(shape, device='meta') for k, shape in layout['keys'][str(scale)]}
    checkpoint.check_state_fits(net, fake, 'layout')
    assert CSNLN.infer_config(fake) == {'n_feats': 128, 'n_colors': 3, 'scale': scale, 'depth': 12}


@pytest.mark.parametrize('scale', SCALES)
def test_reproduces_published_outputs(scale: int) -> None:
    ref = _ref()
    net = _small(scale)
    assert list(net.state_dict()) == list(ref[f'x{scale}_state'])
    net.load_state_dict(ref[f'x{scale}_state'], strict=True)
    with torch.no_grad():
        out = net.eval()(ref['input'])
    assert_published(out, ref[f'x{scale}_output'], 1, f'x{scale}')


def test_weights_change_the_output() -> None:
    """The comparison has teeth: the cross-scale matching and the in-scale assembly embeddings, changed by
    10% and 2%, move the output. (The in-scale scores are nearly flat at this width: the published blocks
    are compared alone on random maps in tests/model/blocks/test_csnln_attention.py.)"""
    ref = _ref()
    for key, factor in (('SEM.multi_source_projection.up_attention.conv_match_1.0.weight', 1.1),
                        ('SEM.multi_source_projection.down_attention.conv_assembly.0.weight', 1.02)):
        state = dict(ref['x2_state'])
        state[key] = state[key] * factor
        net = _small(2)
        net.load_state_dict(state)
        with torch.no_grad():
            assert (net.eval()(ref['input']) - ref['x2_output']).abs().max().item() > 1.5e-4, key


@pytest.mark.parametrize('scale', SCALES)
def test_chop_rule_is_the_published_one(scale: int) -> None:
    assert _small(scale).chop_rule(scale) == ChopRule(shave=10, min_size=3600, h_mult=scale, w_mult=scale)


@pytest.mark.parametrize('scale,key', [(2, 'chop_input'), (3, 'x3_chop_input')])
def test_wrapper_chop_reproduces_published_forward_chop(tmp_path: Path, scale: int, key: str) -> None:
    """--chop through the Model wrapper: quarters rounded to multiples of the scale (x2: split twice)."""
    ref = _ref()
    torch.save(ref[f'x{scale}_state'], tmp_path / 'w.pt')
    args = option.parse(['--cpu', '--test_only', *_small_flags(scale), '--chop', '--pre_train', str(tmp_path / 'w.pt')])
    m = model.Model(args, log=lambda line: None).eval()
    with torch.no_grad():
        out = m(ref[key], 0)
        if scale == 3:  # (once: the whole x2 input is slow) the quarters matter, the unchopped output differs
            assert (m.model(ref[key]) - ref['x3_chop_output']).abs().max().item() > 1e-3
    assert_published(out, ref[f'x{scale}_chop_output'], 1, f'x{scale} chop')


@pytest.mark.parametrize('scale', SCALES)
def test_sizes_off_the_attention_grid_are_padded(scale: int) -> None:
    """The published network needs LR sides that are multiples of its attention's factor; other sizes are
    padded by edge replication and the output cropped (the published code fails on them)."""
    torch.manual_seed(0)
    net = _small(scale).eval()
    x = torch.rand(1, 3, 13, 11)
    m = net.size_multiple
    padded = torch.nn.functional.pad(x, (0, -11 % m, 0, -13 % m), mode='replicate')
    with torch.no_grad():
        out = net(x)
        expected = net(padded)[:, :, :13 * scale, :11 * scale]
    assert out.shape == (1, 3, 13 * scale, 11 * scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_mismatched_checkpoint_refused_in_one_line(tmp_path: Path) -> None:
    ref = _ref()
    path = tmp_path / 'x2.pt'
    torch.save(ref['x2_state'], path)  # an x2 checkpoint into an x4 network
    args = option.parse(['--cpu', '--test_only', *_small_flags(4), '--pre_train', str(path)])
    with pytest.raises(UserError) as err:
        model.Model(args, log=lambda line: None)
    message = str(err.value)
    assert '\n' not in message and str(path) in message and 'does not fit CSNLN' in message
    assert 'unexpected keys: SEM.down_sample_2.0.weight' in message
    assert 'missing keys: SEM.multi_source_projection_2.up_attention.escape_NaN' in message
    assert '--scale 2 (built with 4)' in message

    damaged = dict(ref['x3_state'])
    damaged['tail.0.weight'] = damaged['tail.0.weight'][:, :16]  # another depth
    del damaged['SEM.post_conv.1.weight']
    torch.save(damaged, path)
    args = option.parse(['--cpu', '--test_only', *_small_flags(3), '--pre_train', str(path)])
    with pytest.raises(UserError) as err:
        model.Model(args, log=lambda line: None)
    message = str(err.value)
    assert '\n' not in message and '1 missing keys: SEM.post_conv.1.weight' in message
    assert 'tail.0.weight checkpoint [3, 16, 3, 3] vs model [3, 24, 3, 3]' in message
    assert '--depth 2 (built with 3)' in message


@pytest.mark.parametrize('flags,expected', [
    (['--scale', '8'], '--scale 8: CSNLN is built for x2, x3 and x4'),
    (['--n_feats', '1'], '--n_feats 1: CSNLN needs at least 2'),
    (['--depth', '0'], '--depth 0: expected an integer >= 1'),
    (['--reduction', '4'], '--reduction is not used by --model CSNLN'),
])
def test_make_model_flag_errors(flags: list[str], expected: str) -> None:
    with pytest.raises(UserError) as err:
        args = option.parse(['--cpu', '--test_only', '--model', 'CSNLN', '--n_feats', '8', '--depth', '1', *flags])
        model.check_model_flags(args)
        model.make_network(args)
    assert expected in str(err.value) and '\n' not in str(err.value)


def test_template_is_the_published_configuration() -> None:
    args = option.parse(['--template', 'CSNLN', '--scale', '2', '--cpu', '--test_only'])
    assert (args.model, args.n_feats, args.depth, args.rgb_range, args.chop) == ('CSNLN', 128, 12, 1, True)
    with torch.device('meta'):
        net = model.make_network(args)
    assert net.config == {'scale': 2, 'n_colors': 3, 'n_feats': 128, 'depth': 12, 'rgb_range': 1}


def test_cli_demo_reproduces_published_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """python src/main.py --model CSNLN ... --pre_train F --test_only --data_test Demo: the saved x3 SR image
    is the published output up to one grey level on rounding boundaries."""
    ref = _ref()
    demo = tmp_path / 'demo'
    demo.mkdir()
    iio.imwrite(demo / 'crop.png', to_uint8(ref['input'], 1))
    torch.save(ref['x3_state'], tmp_path / 'weights.pt')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = [*_small_flags(3), '--test_only', '--data_test', 'Demo', '--dir_demo', str(demo), '--pre_train',
            str(tmp_path / 'weights.pt'), '--save_results', '--n_threads', '0', '--save', 'ref', '--reset', '--cpu']
    assert main.main(argv) == 0
    sr = iio.imread(tmp_path / 'experiment' / 'ref' / 'results-Demo' / 'crop_x3_SR.png')
    expected = to_uint8(ref['x3_output'], 1)  # the input is the reference crop, already on the uint8 grid
    diff = np.abs(sr.astype(int) - expected.astype(int))
    assert sr.shape == expected.shape and diff.max() <= 1 and (diff > 0).mean() < 0.002


PEAK_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from nlsr.model.networks.csnln import CSNLN
torch.manual_seed(0)
net = CSNLN(scale=2, n_feats=128, depth=1).eval()
with torch.no_grad():
    net(torch.rand(1, 3, 160, 160))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_whole_160_image_at_published_width_in_bounded_memory() -> None:
    """One recurrent unit of the published width on a 160x160 LR image at x2, in a fresh process: the
    published attentions alone would hold 25600 x 25600 and 6400 x 25600 score maps (5.81 GiB peak for the
    whole published network); memory here does not grow with depth (the tail is summed as it goes)."""
    proc = subprocess.run([sys.executable, '-c', PEAK_SCRIPT, str(ROOT / 'src')], capture_output=True, text=True,
                          check=True)
    peak_gib = int(proc.stdout.split()[-1]) / 2**20
    assert peak_gib < 2.0, peak_gib
