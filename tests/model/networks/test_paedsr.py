"""PA-EDSR as published (SHI-Labs/Pyramid-Attention-Networks): state-dict layout with the attention saved
twice, published outputs and forward_chop (tests/reference), a refused checkpoint, the flags, the CLI; the
tiled pyramid attention against an unfold formulation (softmax and, for --attention hspa, the sort-based
sparsemax), its gradients and a training step; whole-image memory at the published width (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SRC, load_reference, reference_path, run_main, tiny_world
from nlsr import main, model, option, template
from nlsr.errors import UserError
from nlsr.model import checkpoint, tiling
from nlsr.model.blocks.pyramid import PYRAMID_FACTORS, PyramidAttention, level_sizes
from nlsr.model.contract import ChopRule
from nlsr.model.networks.paedsr import PAEDSR
from oracles import assert_published, sparsemax_ref, to_uint8

PUBLISHED = dict(n_feats=256, n_resblocks=32, res_scale=0.1)


def _layout() -> dict:
    return json.loads(Path(reference_path('paedsr_layout.json')).read_text())


def _small(scale: int, **kwargs: object) -> PAEDSR:
    a = load_reference('paedsr')['small_args']
    return PAEDSR(scale=scale, n_colors=a['n_colors'], n_feats=a['n_feats'], n_resblocks=a['n_resblocks'],
                  res_scale=a['res_scale'], rgb_range=a['rgb_range'], **kwargs)






@pytest.mark.parametrize('scale', [2, 3, 4])
def test_published_layout_with_the_attention_saved_twice(scale: int) -> None:
    layout = _layout()
    published = layout['keys'][str(scale)]
    with torch.device('meta'):  # 41-44M parameters: shapes only
        net = PAEDSR(scale=scale, **PUBLISHED)
    twice = [k for k, _ in published if k.startswith('msa.')]
    assert net.unused_keys() == frozenset(twice) and len(twice) == 10
    held = [[k, shape] for k, shape in published if not k.startswith('msa.')]
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == held
    # each msa.* entry is the body's attention under another name (the published width: 256, 256 // 8)
    shapes = dict((k, s) for k, s in published)
    for k in twice:
        assert shapes[k] == shapes[k.replace('msa.', 'body.16.')]
    assert shapes['msa.conv_match_L_base.0.weight'] == [32, 256, 1, 1]
    assert sum(p.numel() for p in net.parameters()) == layout['params'][str(scale)]
    fake = {k: torch.empty(shape, device='meta') for k, shape in published}
    checkpoint.check_state_fits(net, fake, 'layout')
    assert PAEDSR.infer_config(fake) == {'n_feats': 256, 'n_colors': 3, 'scale': scale, 'n_resblocks': 32}


@pytest.mark.parametrize('scale,block', [(2, 0), (3, 0), (4, 0), (2, 40)])  # 40: the attention in 24 tiles
def test_reproduces_published_outputs(scale: int, block: int) -> None:
    ref = load_reference('paedsr')
    net = _small(scale, block_size=block).eval()
    checkpoint.fit_into(net, ref[f'x{scale}_state'], None, 'reference')  # strict; msa.* dropped
    with torch.no_grad():
        assert_published(net(ref['input']), ref[f'x{scale}_output'], 1, f'x{scale}')


def test_weights_change_output() -> None:
    """The comparison has teeth: one attention weight moved moves the output."""
    ref = load_reference('paedsr')
    state = dict(ref['x2_state'])
    state['body.1.conv_match.0.weight'] = state['body.1.conv_match.0.weight'] + 0.1
    net = _small(2).eval()
    checkpoint.fit_into(net, state, None, 'moved')
    with torch.no_grad():
        assert (net(ref['input']) - ref['x2_output']).abs().max().item() > 1e-3


def _wrapper(tmp_path: Path, scale: int, *flags: str) -> model.Model:
    ref = load_reference('paedsr')
    a = ref['small_args']
    torch.save(ref[f'x{scale}_state'], tmp_path / f'x{scale}.pt')
    args = option.parse(['--cpu', '--test_only', '--model', 'PAEDSR', '--scale', str(scale),
                         '--n_resblocks', str(a['n_resblocks']), '--n_feats', str(a['n_feats']),
                         '--res_scale', str(a['res_scale']), '--rgb_range', str(a['rgb_range']),
                         '--pre_train', str(tmp_path / f'x{scale}.pt'), *flags])
    return model.Model(args, log=lambda line: None).eval()


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_chop_reproduces_published_forward_chop(tmp_path: Path, scale: int) -> None:
    ref = load_reference('paedsr')
    m = _wrapper(tmp_path, scale, '--chop')
    assert m.chop_rule() == ChopRule(shave=10, min_size=6400, h_mult=scale, w_mult=scale, add_remainder=True)
    with torch.no_grad():
        out = m(ref['chop_input'], 0)
        assert_published(out, ref[f'x{scale}_chop_output'], 1, f'x{scale} chop')
        # the quarters change the attention: the whole image gives another output
        assert (m.model(ref['chop_input']) - out).abs().max().item() > 1e-3
        if scale == 3:  # two levels of quarters, sizes grown by their remainder (not to a multiple)
            deep = m.forward_chop(ref['chop_input'], min_size=ref['chop_deep_min_size'])
            assert_published(deep, ref['x3_chop_deep_output'], 1, 'x3 deep chop')


def test_chop_grows_quarters_by_their_remainder() -> None:
    sizes = []

    def run(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[2:]))
        return x.repeat_interleave(3, 2).repeat_interleave(3, 3)

    x = torch.rand(1, 3, 32, 28)
    rule = PAEDSR(scale=3, n_feats=8, n_resblocks=0).chop_rule(3)
    out = tiling.chop(x, 3, rule, run)
    # 16 + 10 = 26 -> 26 + 26 % 3 = 28; 14 + 10 = 24 stays (EDSR-style rounding would give 27 and 27)
    assert sizes == [(28, 24)] * 4
    assert torch.equal(out, x.repeat_interleave(3, 2).repeat_interleave(3, 3))


def test_mismatched_or_damaged_checkpoint_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ref = load_reference('paedsr')
    net = _small(4)
    with pytest.raises(UserError) as err:  # an x2 tail in an x4 model (the published loader skips tails)
        checkpoint.fit_into(net, ref['x2_state'], None, 'x2.pt')
    message = str(err.value)
    assert '\n' not in message and '2 missing keys: tail.0.2.weight, tail.0.2.bias' in message
    assert '--scale 2 (built with 4)' in message
    damaged = {k: v for k, v in ref['x4_state'].items() if k != 'body.1.conv_assembly.0.bias'}
    with pytest.raises(UserError) as err:  # the msa.* copy does not stand in for the body's attention
        checkpoint.fit_into(net, damaged, None, 'damaged.pt')
    assert '\n' not in str(err.value) and '1 missing keys: body.1.conv_assembly.0.bias' in str(err.value)
    torch.save(ref['x2_state'], tmp_path / 'x2.pt')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    a = ref['small_args']
    assert main.main(['--model', 'PAEDSR', '--scale', '4', '--n_resblocks', str(a['n_resblocks']),
                      '--n_feats', str(a['n_feats']), '--test_only', '--data_test', 'Demo', '--dir_demo', str(tmp_path),
                      '--pre_train', str(tmp_path / 'x2.pt'), '--cpu', '--save', 'refused']) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and 'tail.0.2.weight' in err_lines[0], err_lines


def _args(*argv: str):
    return option.parse(['--cpu', '--test_only', '--model', 'PAEDSR', *argv])


@pytest.mark.parametrize('argv,flag', [
    (('--n_resblocks', '3'), '--n_resblocks 3'),
    (('--n_feats', '4'), '--n_feats 4'),
    (('--attention', 'none'), '--attention none'),
    (('--n_resgroups', '2'), '--n_resgroups'),
])
def test_make_model_flag_errors(argv: tuple[str, ...], flag: str) -> None:
    with pytest.raises(UserError) as err:
        args = _args('--n_resblocks', '2', '--n_feats', '16', *argv)
        model.check_model_flags(args)
        model.make_network(args)
    assert str(err.value).startswith(flag) and '\n' not in str(err.value)


def test_template_is_the_published_one() -> None:
    assert template.template_values('PAEDSR') == {'model': 'PAEDSR', 'n_resblocks': 32, 'n_feats': 256,
                                                  'res_scale': 0.1, 'rgb_range': 1, 'chop': True}
    net = model.make_network(_args('--template', 'PAEDSR', '--n_resblocks', '2', '--n_feats', '16', '--scale', '3'))
    assert isinstance(net, PAEDSR) and net.config['rgb_range'] == 1 and net.config['attention'] == 'softmax'


def test_cli_reproduces_published_forward_chop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--template PAEDSR (rgb_range 1, --chop) with the small flags and published weights (msa.* included)."""
    ref = load_reference('paedsr')
    a = ref['small_args']
    (tmp_path / 'demo').mkdir()
    iio.imwrite(tmp_path / 'demo' / 'crop.png', to_uint8(ref['chop_input'], 1))
    torch.save(ref['x2_state'], tmp_path / 'weights.pt')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    assert main.main(['--template', 'PAEDSR', '--scale', '2', '--n_resblocks', str(a['n_resblocks']),
                      '--n_feats', str(a['n_feats']), '--test_only', '--data_test', 'Demo',
                      '--dir_demo', str(tmp_path / 'demo'), '--pre_train', str(tmp_path / 'weights.pt'),
                      '--save_results', '--n_threads', '0', '--save', 'ref', '--reset', '--cpu']) == 0
    sr = iio.imread(tmp_path / 'experiment' / 'ref' / 'results-Demo' / 'crop_x2_SR.png')
    diff = np.abs(sr.astype(int) - to_uint8(ref['x2_chop_output'], 1).astype(int))
    assert sr.shape == (64, 56, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.002


# ---- the pyramid attention against an independent formulation


def _unfold_scores(block: PyramidAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (N, H W, L), value patches (N, C 9, L)) over every 3 x 3 patch of every level, the levels
    made by F.interpolate with its size-ratio grid."""
    levels = [x if f == 1 else F.interpolate(x, scale_factor=f, mode='bicubic', recompute_scale_factor=True)
              for f in block.factors]
    keys = torch.cat([F.unfold(block.conv_match(v), 3, padding=1) for v in levels], dim=2)  # (N, C' 9, L)
    keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-4)
    values = torch.cat([F.unfold(block.conv_assembly(v), 3, padding=1) for v in levels], dim=2)
    queries = F.unfold(block.conv_match_L_base(x), 3, padding=1)  # (N, C' 9, H W)
    return 10 * queries.transpose(1, 2) @ keys, values


def _unfold_oracle(block: PyramidAttention, x: torch.Tensor, normalize) -> torch.Tensor:
    """The block with unfold/fold: the scores normalised jointly over all levels, the value patches
    folded back, / 4, plus res_scale * x."""
    scores, values = _unfold_scores(block, x)
    weights = normalize(scores)  # (N, H W, L)
    return F.fold(values @ weights.transpose(1, 2), x.shape[2:], 3, padding=1) / 4 + block.res_scale * x


NORMALIZE = {'softmax': lambda s: F.softmax(s, dim=-1), 'soft_threshold': sparsemax_ref}


def _block(normalizer: str, seed: int = 0) -> tuple[PyramidAttention, torch.Tensor]:
    torch.manual_seed(seed)
    block = PyramidAttention(16, res_scale=0.5, normalizer=normalizer, topk=4).double()
    return block, 3 * torch.randn(2, 16, 13, 11, dtype=torch.float64)


@pytest.mark.parametrize('normalizer', ['softmax', 'soft_threshold'])
def test_tiled_pyramid_attention_equals_unfold_oracle(normalizer: str) -> None:
    block, x = _block(normalizer)
    assert level_sizes(13, 11) == [(13, 11), (11, 9), (10, 8), (9, 7), (7, 6)]
    assert PYRAMID_FACTORS == (1.0, 0.9, 0.8, 0.7, 0.6)
    with torch.no_grad():
        oracle = _unfold_oracle(block, x, NORMALIZE[normalizer])
        for size in (0, 1, 7, 30):
            block.block_size = size
            torch.testing.assert_close(block(x), oracle, rtol=0, atol=1e-10, msg=f'block {size}')
    if normalizer == 'soft_threshold':  # sparse weights over the patches of all levels: the test has teeth
        with torch.no_grad():
            weights = sparsemax_ref(_unfold_scores(block, x)[0])
        zeros = (weights == 0).double().mean().item()
        assert 0.5 < zeros < 1


@pytest.mark.parametrize('normalizer', ['softmax', 'soft_threshold'])
def test_tiled_pyramid_attention_gradients_equal_oracle(normalizer: str) -> None:
    block, x = _block(normalizer, seed=1)
    weight = torch.randn_like(x)
    grads = {}
    for name in ('oracle', 'tiled'):
        for size in ((0, 9) if name == 'tiled' else (0,)):
            block.block_size = size
            xi = x.clone().requires_grad_()
            block.zero_grad()
            out = _unfold_oracle(block, xi, NORMALIZE[normalizer]) if name == 'oracle' else block(xi)
            (out * weight).sum().backward()
            grads[name, size] = [xi.grad] + [p.grad.clone() for p in block.parameters()]
    for key in (('tiled', 0), ('tiled', 9)):
        for got, want in zip(grads[key], grads['oracle', 0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_hspa_attention_trains() -> None:
    """--attention hspa: a gradient step reaches the attention's weights and lowers the loss."""
    torch.manual_seed(0)
    net = model.make_network(_args('--n_resblocks', '2', '--n_feats', '16', '--scale', '2', '--rgb_range', '1',
                                   '--attention', 'hspa', '--topk', '8'))
    assert net.body[1].normalizer == 'soft_threshold'
    lr, hr = torch.rand(2, 3, 12, 10), torch.rand(2, 3, 24, 20)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = F.l1_loss(net(lr), hr)
        loss.backward()
        losses.append(loss.item())
        grads = [p.grad for p in net.body[1].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
    assert net.body[1].conv_match[0].weight.grad.abs().sum() > 0
    assert losses[1] < losses[0]


def test_hspa_trains_resumes_and_evaluates_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = tiny_world(tmp_path)
    flags = ['--model', 'PAEDSR', '--attention', 'hspa', '--topk', '8', '--n_resblocks', '2', '--n_feats', '8',
             '--rgb_range', '1', '--scale', '2', '--patch_size', '16', '--batch_size', '2', '--n_threads', '0',
             '--data_train', 'Tiny', '--data_test', 'Mini', '--print_every', '1', '--test_every', '2']
    run_main(world, monkeypatch, flags, '--save', 'pa', '--epochs', '1')
    run_main(world, monkeypatch, flags, '--load', 'pa', '--resume', '-1', '--epochs', '2')
    folder = world['exp'] / 'pa'
    assert 'Resumed at epoch 1' in (folder / 'log.txt').read_text()
    saved, config = checkpoint.read_checkpoint(folder / 'model' / 'model_latest.pt')
    assert config['attention'] == 'hspa' and not any(k.startswith('msa.') for k in saved)
    # --pre_train alone rebuilds the hspa network from the file's configuration
    run_main(world, monkeypatch, ['--model', 'PAEDSR', '--data_test', 'Mini', '--n_threads', '0', '--scale', '2'],
             '--test_only', '--pre_train', str(folder / 'model' / 'model_latest.pt'), '--save', 'pa_test')
    assert '[Mini x2]' in (world['exp'] / 'pa_test' / 'log.txt').read_text()


@pytest.mark.slow
def test_published_width_whole_image_in_bounded_memory() -> None:
    """The published configuration (32 x 256) at x2 on a 160 x 160 LR image, whole (no chop): the
    published score map alone would be 25600 x 84480 floats (8.6 GB)."""
    code = ('import resource, sys, torch\n'
            f'sys.path.insert(0, {str(SRC)!r})\n'
            'from nlsr.model.networks.paedsr import PAEDSR\n'
            'torch.manual_seed(0)\n'
            'net = PAEDSR(scale=2, n_feats=256, n_resblocks=32, res_scale=0.1, rgb_range=1).eval()\n'
            'with torch.no_grad():\n'
            '    y = net(torch.rand(1, 3, 160, 160))\n'
            'assert y.shape == (1, 3, 320, 320) and bool(torch.isfinite(y).all())\n'
            'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    peak_gib = int(done.stdout.split()[-1]) * 1024 / 2**30  # ru_maxrss: KiB on Linux
    assert peak_gib < 4, f'peak RSS {peak_gib:.2f} GiB'
