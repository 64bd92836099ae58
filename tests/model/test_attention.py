"""--attention for EDSR and MSNLAN: published keys and defaults, placement, the soft-thresholding paths
against independent implementations, and training + evaluation through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_blocky_folders
from nlsr import main, model, option
from nlsr.model import checkpoint
from nlsr.model.attention import HSPA, NonLocalAttention, softmax_attention
from nlsr.model.checkpoint import read_state_dict
from nlsr.model.networks.edsr import EDSR
from nlsr.model.networks.hspan import HSPAN
from nlsr.model.networks.msnlan import MSNLAN
from oracles import entmax_sparsemax


def _published_edsr_keys(n_resblocks: int, scale: int) -> list[str]:
    """EDSR-PyTorch's state-dict keys, spelled out from its module names (upsampler: one conv + shuffle per
    factor 2, or one for x3)."""
    keys = ['sub_mean.weight', 'sub_mean.bias', 'add_mean.weight', 'add_mean.bias', 'head.0.weight', 'head.0.bias']
    for i in range(n_resblocks):
        keys += [f'body.{i}.body.0.weight', f'body.{i}.body.0.bias', f'body.{i}.body.2.weight', f'body.{i}.body.2.bias']
    keys += [f'body.{n_resblocks}.weight', f'body.{n_resblocks}.bias']
    ups = {2: [0], 3: [0], 4: [0, 2]}[scale]
    for j in ups:
        keys += [f'tail.0.{j}.weight', f'tail.0.{j}.bias']
    return keys + ['tail.1.weight', 'tail.1.bias']


def _net(*argv: str) -> torch.nn.Module:
    return model.make_network(option.parse(['--cpu', '--test_only', *argv]))


@pytest.mark.parametrize('scale', [2, 4])
@pytest.mark.parametrize('flags', [[], ['--attention', 'none']])
def test_edsr_without_attention_keeps_published_keys(flags: list[str], scale: int) -> None:
    net = _net('--template', 'EDSR', '--scale', str(scale), *flags)
    assert list(net.state_dict()) == _published_edsr_keys(16, scale)
    assert not any(isinstance(m, (HSPA, NonLocalAttention)) for m in net.modules())


def test_default_attention_is_each_models_published_one() -> None:
    small = ['--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16']
    assert any(isinstance(m, HSPA) for m in _net('--model', 'HSPAN', *small).modules())
    msnlan = _net('--model', 'MSNLAN', *small)
    assert {m.normalizer for m in msnlan.modules() if hasattr(m, 'normalizer')} == {'softmax'}
    hspa = _net('--model', 'MSNLAN', '--attention', 'hspa', *small)
    assert {m.normalizer for m in hspa.modules() if hasattr(m, 'normalizer')} == {'soft_threshold'}
    shapes = [(k, v.shape) for k, v in msnlan.state_dict().items()]
    assert [(k, v.shape) for k, v in hspa.state_dict().items()] == shapes


def test_edsr_attention_keys_and_placement() -> None:
    kw = dict(scale=2, n_feats=16, n_resblocks=5, res_scale=0.5, reduction=2)
    hspa = EDSR(attention='hspa', attention_every=2, topk=4, **kw)
    softmax = EDSR(attention='softmax', attention_every=2, **kw)
    assert isinstance(softmax.attention[0], NonLocalAttention) and isinstance(hspa.attention[1], HSPA)
    keys = list(hspa.state_dict())
    published = _published_edsr_keys(5, 2)
    assert keys[:len(published)] == published  # published names first, unchanged
    extra = keys[len(published):]
    assert {k.split('.')[1] for k in extra} == {'0', '1'}  # after blocks 2 and 4
    assert all(k.startswith('attention.') for k in extra)
    assert list(softmax.state_dict()) == keys
    # A published EDSR checkpoint names the cause when it is loaded into EDSR + HSPA.
    from nlsr.errors import UserError

    with pytest.raises(UserError, match='--attention none'):
        checkpoint.check_state_fits(hspa, EDSR(**kw).state_dict(), 'ckpt')


def _independent_edsr_hspa(net: EDSR, x: torch.Tensor) -> torch.Tensor:
    """EDSR + HSPA written out: blocks, and x + res_scale * sparsemax(q k^T) v after every N-th block."""
    h = net.head(net.sub_mean(x))
    res, j = h, 0
    for i in range(net.config['n_resblocks']):
        res = net.body[i](res)
        if (i + 1) % net.attention_every == 0:
            a = net.attention[j]
            q = a.conv_match1(res).flatten(2).transpose(1, 2)
            k = a.conv_match2(res).flatten(2).transpose(1, 2)
            v = a.conv_assembly(res).flatten(2).transpose(1, 2)
            out = entmax_sparsemax(q @ k.transpose(1, 2), -1) @ v
            res = res + a.res_scale * out.transpose(1, 2).reshape(res.shape)
            j += 1
    res = net.body[-1](res) + h
    return net.add_mean(net.tail(res))


@pytest.mark.parametrize('impl,block', [('dense', 0), ('fast', 7)])
def test_edsr_hspa_equals_independent_sparsemax(impl: str, block: int) -> None:
    torch.manual_seed(0)
    net = EDSR(scale=2, n_feats=16, n_resblocks=4, res_scale=1, rgb_range=1, attention='hspa', attention_every=2,
               reduction=2, topk=4, hspa_impl=impl, hspa_block=block).double()
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    want = _independent_edsr_hspa(net, x)
    got = net(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    g = torch.randn_like(got)
    params = [p for p in net.attention.parameters()]
    grads = torch.autograd.grad((got * g).sum(), params)
    want_grads = torch.autograd.grad((want * g).sum(), params)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert all(a.abs().sum() > 0 for a in grads)  # the attentions learn


def test_msnlan_hspa_blocked_equals_dense_and_differs_from_softmax() -> None:
    torch.manual_seed(1)
    kw = dict(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, res_scale=1, rgb_range=1, topk=4)
    dense = MSNLAN(attention='hspa', msnlab_impl='dense', **kw).double().eval()
    blocked = MSNLAN(attention='hspa', msnlab_impl='fast', msnlab_block=10, **kw).double().eval()
    softmax = MSNLAN(attention='softmax', **kw).double().eval()
    blocked.load_state_dict(dense.state_dict())
    softmax.load_state_dict(dense.state_dict())
    x = torch.rand(1, 3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(blocked(x), want, rtol=0, atol=1e-9)
        assert (softmax(x) - want).abs().max().item() > 1e-4


@pytest.mark.parametrize('argv, expected', [
    (['--model', 'MSNLAN', '--attention', 'none'], '--attention none'),
    (['--model', 'HSPAN', '--attention_every', '2'], '--attention_every 2'),
    (['--model', 'EDSR', '--attention_every', '2'], '--attention_every 2'),
    (['--model', 'EDSR', '--attention', 'hspa', '--n_resblocks', '4', '--attention_every', '5'], '--attention_every 5'),
    (['--model', 'Bicubic', '--attention', 'hspa', '--test_only'], '--attention hspa'),
])
def test_attention_flags_a_model_cannot_use(argv: list[str], expected: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path))
    assert main.main([*argv, '--cpu', '--n_feats', '16', '--save', 'refused']) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines


TINY = ['--scale', '2', '--patch_size', '16', '--batch_size', '2', '--test_every', '2', '--epochs', '1',
        '--print_every', '1', '--lr', '1e-3', '--n_threads', '0', '--data_train', 'Tiny', '--data_test', 'Mini',
        '--rgb_range', '1', '--res_scale', '1', '--topk', '8']
CLI_MODELS = {  # MSNLAN reads no --reduction (refused when given)
    'edsr_hspa': ['--model', 'EDSR', '--attention', 'hspa', '--n_resblocks', '2', '--attention_every', '1',
                  '--n_feats', '8', '--reduction', '2'],
    'msnlan_hspa': ['--model', 'MSNLAN', '--attention', 'hspa', '--n_resgroups', '2', '--n_resblocks', '1',
                    '--n_feats', '16'],
}


@pytest.mark.parametrize('name', sorted(CLI_MODELS))
def test_train_and_evaluate_through_the_cli(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_blocky_folders(tmp_path / 'data', (('Tiny', 2, (32, 32)), ('Mini', 1, (24, 28))))
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'exp'))
    argv = [*TINY, *CLI_MODELS[name], '--dir_data', str(tmp_path / 'data')]
    assert main.main([*argv, '--save', 'train']) == 0
    run = tmp_path / 'exp' / 'train'
    trained = json.loads((run / 'results.json').read_text())[0]
    state = read_state_dict(run / 'model' / 'model_latest.pt')
    net = model.make_network(option.parse(argv))
    assert list(state) == list(net.state_dict())
    if name == 'edsr_hspa':
        assert any(k.startswith('attention.1.conv_match1') for k in state)
    latest = str(run / 'model' / 'model_latest.pt')
    assert main.main([*argv, '--save', 'eval', '--test_only', '--pre_train', latest]) == 0
    evaluated = json.loads((tmp_path / 'exp' / 'eval' / 'results.json').read_text())[0]
    assert (evaluated['dataset'], evaluated['images']) == ('Mini', 1)
    assert evaluated['psnr'] == pytest.approx(trained['psnr'], abs=1e-9)


def test_hspan_attention_variants_unchanged() -> None:
    """HSPAN still builds each --attention variant (keys of 'none' lack only the attention embeddings)."""
    kw = ['--model', 'HSPAN', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '16', '--reduction', '2']
    nets = {a: _net(*kw, '--attention', a) for a in ('hspa', 'softmax', 'none')}
    assert isinstance(nets['hspa'], HSPAN)
    assert list(nets['hspa'].state_dict()) == list(nets['softmax'].state_dict())
    assert len(nets['none'].state_dict()) < len(nets['hspa'].state_dict())


@pytest.mark.parametrize('e,ev', [(4, 8), (8, 8), (8, 3), (1, 1)])
def test_softmax_attention_widths_and_memory_efficient_kernel(e: int, ev: int) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 50, e, dtype=torch.float64), torch.randn(2, 50, e, dtype=torch.float64)
    v = torch.randn(2, 50, ev, dtype=torch.float64)
    expected = F.softmax(q @ k.transpose(1, 2), -1) @ v
    torch.testing.assert_close(softmax_attention(q, k, v), expected, rtol=0, atol=1e-12)
    # non-contiguous rows (as the block's transposed embeddings are) still take the flash kernel
    qt = torch.randn(1, e, 64).transpose(1, 2)
    with torch.profiler.profile() as prof:
        softmax_attention(qt, qt, torch.randn(1, ev, 64).transpose(1, 2))
    names = {event.key for event in prof.key_averages()}
    assert not any('math' in name for name in names), names  # the math path holds the L x L scores
