"""Checkpoint loading (wrapped dicts, 'module.' prefixes, strict refusal with one clear message) and saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nlsr import model, option
from nlsr.errors import UserError
from nlsr.model import attention, checkpoint
from nlsr.model.networks.edsr import EDSR
from nlsr.model.networks.hspan import HSPAN

HSPAN_SMALL = ['--model', 'HSPAN', '--scale', '2', '--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16',
               '--reduction', '2', '--topk', '8', '--rgb_range', '1', '--hspa_impl', 'dense']


def _args(*argv: str):
    return option.parse(['--cpu', '--test_only', *argv])


def _hspan_state(scale: int = 2, **overrides) -> dict[str, torch.Tensor]:
    kw = dict(scale=scale, n_feats=16, n_resgroups=2, n_resblocks=1, reduction=2, topk=8, rgb_range=1)
    kw.update(overrides)
    return HSPAN(**kw).state_dict()


def _build(tmp_path: Path, obj: object, *extra: str, logs: list[str] | None = None) -> model.Model:
    path = tmp_path / 'ckpt.pt'
    torch.save(obj, path)
    return model.Model(_args(*HSPAN_SMALL, '--pre_train', str(path), *extra),
                       log=(logs.append if logs is not None else lambda s: None))


def _assert_loaded(m: model.Model, state: dict[str, torch.Tensor]) -> None:
    own = m.model.state_dict()
    assert list(own) == list(checkpoint.unwrap_state_dict(state, 'x'))
    for k, v in checkpoint.unwrap_state_dict(state, 'x').items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize('wrapper', [None, 'state_dict', 'model', 'params', 'params_ema'])
@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_loads_bare_and_wrapped_with_or_without_module_prefix(tmp_path: Path, wrapper: str | None,
                                                               prefix: str) -> None:
    torch.manual_seed(1)
    state = _hspan_state()
    stored = {prefix + k: v for k, v in state.items()}
    obj = stored if wrapper is None else {wrapper: stored, 'epoch': 7}
    m = _build(tmp_path, obj)
    own = m.model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_params_ema_preferred_and_nested_wrappers(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ema, raw = _hspan_state(), _hspan_state()
    m = _build(tmp_path, {'params': raw, 'params_ema': ema})
    assert torch.equal(m.model.state_dict()['head.0.weight'], ema['head.0.weight'])
    m = _build(tmp_path, {'model': {'state_dict': {'module.' + k: v for k, v in raw.items()}}})
    assert torch.equal(m.model.state_dict()['head.0.weight'], raw['head.0.weight'])


def _refusal(tmp_path: Path, state: dict, *extra: str) -> str:
    with pytest.raises(UserError) as err:
        _build(tmp_path, state, *extra)
    message = str(err.value)
    assert '\n' not in message and 'ckpt.pt' in message and 'does not fit HSPAN' in message
    return message


def test_refuses_other_scale_and_names_it(tmp_path: Path) -> None:
    message = _refusal(tmp_path, _hspan_state(scale=4))  # x4 has a second upsampling conv
    assert 'unexpected keys: tail.0.2.weight, tail.0.2.bias' in message
    assert '--scale 4 (built with 2)' in message
    message = _refusal(tmp_path, _hspan_state(scale=3))  # x3: same keys, other shapes
    assert 'tail.0.0.weight checkpoint [144, 16, 3, 3] vs model [64, 16, 3, 3]' in message
    assert '--scale 3 (built with 2)' in message


def test_refuses_other_width_depth_reduction(tmp_path: Path) -> None:
    message = _refusal(tmp_path, _hspan_state(n_feats=24))
    assert 'shape mismatches' in message and 'head.0.weight checkpoint [24, 3, 3, 3] vs model [16, 3, 3, 3]' in message
    assert '--n_feats 24 (built with 16)' in message

    message = _refusal(tmp_path, _hspan_state(n_resgroups=3))
    assert 'unexpected keys: body.2.body.0.body.0.weight' in message  # a third group
    assert '2 missing keys: body.2.weight, body.2.bias' in message  # the final conv moved to body.3
    assert '--n_resgroups 3 (built with 2)' in message

    message = _refusal(tmp_path, _hspan_state(n_resgroups=1))
    assert 'missing keys' in message and '--n_resgroups 1 (built with 2)' in message

    message = _refusal(tmp_path, _hspan_state(n_resblocks=2))
    assert '--n_resblocks 2 (built with 1)' in message

    message = _refusal(tmp_path, _hspan_state(reduction=4))
    assert 'conv_match1.0.weight checkpoint [4, 16, 1, 1] vs model [8, 16, 1, 1]' in message
    assert '--reduction 4 (built with 2)' in message


def test_refuses_other_model_and_missing_key(tmp_path: Path) -> None:
    edsr = EDSR(scale=2, n_feats=16, n_resblocks=2).state_dict()
    message = _refusal(tmp_path, edsr)
    assert 'different --model' in message
    state = _hspan_state()
    del state['a']
    message = _refusal(tmp_path, state)
    assert '1 missing keys: a' in message


def test_refusal_happens_before_changing_weights(tmp_path: Path) -> None:
    net = HSPAN(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, reduction=2, topk=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = _hspan_state(scale=3)
    path = tmp_path / 'bad.pt'
    torch.save(bad, path)
    with pytest.raises(UserError):
        checkpoint.load_into(net, path)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_missing_unreadable_and_non_state_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match='--pre_train .*nope.pt: no such file'):
        model.Model(_args(*HSPAN_SMALL, '--pre_train', str(tmp_path / 'nope.pt')), log=lambda s: None)
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read it'):
        checkpoint.read_state_dict(junk)
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    with pytest.raises(UserError, match='no state dict found'):
        checkpoint.read_state_dict(tmp_path / 'list.pt')
    torch.save({'epoch': 3}, tmp_path / 'meta.pt')
    with pytest.raises(UserError, match='no state dict found'):
        checkpoint.read_state_dict(tmp_path / 'meta.pt')


def test_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / 'evil.pt'
    torch.save({'state_dict': _hspan_state(), 'opt': torch.optim.SGD}, path)  # a class: not allowed by weights_only
    with pytest.raises(UserError, match='cannot read it'):
        checkpoint.read_state_dict(path)


def test_no_pre_train(tmp_path: Path) -> None:
    for value in ('.', ''):
        m = model.Model(_args(*HSPAN_SMALL, '--pre_train', value), log=lambda s: None)
        assert isinstance(m.model, HSPAN)


def test_save_plain_atomic_and_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    m = model.Model(_args(*HSPAN_SMALL, '--save_models'), log=lambda s: None)
    # pretend it ran under DataParallel: saving must still write plain keys
    m.save(tmp_path, epoch=5, is_best=True)
    files = sorted(p.name for p in (tmp_path / 'model').iterdir())
    assert files == ['model_5.pt', 'model_best.pt', 'model_latest.pt']  # no temporary files left
    stored = torch.load(tmp_path / 'model' / 'model_latest.pt', weights_only=True)
    assert stored['config'] == {'model': 'hspan', **m.model.config}  # self-describing
    saved = stored['state_dict']
    assert list(saved) == list(m.model.state_dict())
    assert not any(k.startswith('module.') for k in saved)
    assert checkpoint.plain_state_dict(torch.nn.DataParallel(m.model)).keys() == saved.keys()

    other = model.Model(_args(*HSPAN_SMALL), log=lambda s: None)
    assert not torch.equal(other.model.state_dict()['head.0.weight'], saved['head.0.weight'])
    other.load_state(tmp_path / 'model' / 'model_latest.pt')
    for k, v in saved.items():
        assert torch.equal(other.model.state_dict()[k], v)


def test_several_scales_use_one_network_and_checkpoint_each(tmp_path: Path) -> None:
    torch.manual_seed(4)
    for s in (2, 3):
        torch.save(_hspan_state(scale=s), tmp_path / f'net_x{s}.pt')
    logs: list[str] = []
    m = model.Model(_args(*HSPAN_SMALL, '--scale', '2+3', '--pre_train', str(tmp_path / 'net_x{scale}.pt')),
                    log=logs.append)
    assert len(m.nets) == 2 and sum('Loading model from' in line for line in logs) == 2
    m.eval()
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        assert m(x, 0).shape == (1, 3, 12, 10)
        assert m(x, torch.tensor([1, 1])).shape == (1, 3, 18, 15)
    assert m.model is m.nets[1]
    m.save(tmp_path / 'exp', epoch=1)
    assert sorted(p.name for p in (tmp_path / 'exp' / 'model').iterdir()) == ['model_latest_x2.pt',
                                                                               'model_latest_x3.pt']
    m.load_state(tmp_path / 'exp' / 'model' / 'model_latest.pt')
    with pytest.raises(UserError, match=r'put \{scale\} in the path'):
        model.Model(_args(*HSPAN_SMALL, '--scale', '2+3', '--pre_train', str(tmp_path / 'net_x2.pt')),
                    log=lambda s: None)


def test_startup_log_line(tmp_path: Path) -> None:
    logs: list[str] = []
    m = model.Model(_args(*HSPAN_SMALL), log=logs.append)
    n = sum(p.numel() for p in m.model.parameters())
    line = next(line for line in logs if line.startswith('Model HSPAN'))
    assert f'{n:,} parameters' in line and 'n_feats=16' in line and 'n_resgroups=2' in line and 'cpu' in line


def test_safetensors_round_trip_with_configuration(tmp_path: Path) -> None:
    from safetensors import safe_open

    torch.manual_seed(7)
    m = model.Model(_args(*HSPAN_SMALL, '--save_format', 'safetensors'), log=lambda s: None)
    m.save(tmp_path, epoch=1)
    path = tmp_path / 'model' / 'model_latest.safetensors'
    assert sorted(p.name for p in (tmp_path / 'model').iterdir()) == ['model_latest.safetensors']
    with safe_open(str(path), framework='pt') as f:
        assert json.loads(f.metadata()['sr_config']) == {'model': 'hspan', **m.model.config}
    state, config = checkpoint.read_checkpoint(path)
    assert config == {'model': 'hspan', **m.model.config}
    for k, v in m.model.state_dict().items():
        assert torch.equal(state[k], v), k
    # --pre_train reads it (and its configuration supplies the architecture flags left out here)
    loaded = model.Model(_args('--model', 'HSPAN', '--hspa_impl', 'dense', '--pre_train', str(path)),
                         log=lambda s: None)
    assert loaded.model.config == m.model.config
    for k, v in m.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # --save_format bare_pt: the published layout (a bare state dict), read back with flags as before
    model.Model(_args(*HSPAN_SMALL, '--save_format', 'bare_pt'), log=lambda s: None).save(tmp_path / 'b', epoch=1)
    bare = torch.load(tmp_path / 'b' / 'model' / 'model_latest.pt', weights_only=True)
    assert list(bare) == list(m.model.state_dict()) and all(torch.is_tensor(v) for v in bare.values())
    assert checkpoint.read_checkpoint(tmp_path / 'b' / 'model' / 'model_latest.pt')[1] is None


def test_topk_is_how_not_what(tmp_path: Path) -> None:
    """topk (where HSPA's exact threshold search starts) is stored for information: --topk on the command
    line wins over the checkpoint's, and without it the stored value is used."""
    m = model.Model(_args(*HSPAN_SMALL), log=lambda s: None)
    m.save(tmp_path, epoch=1)
    path = str(tmp_path / 'model' / 'model_latest.pt')
    given = model.Model(_args('--model', 'HSPAN', '--topk', '4', '--pre_train', path), log=lambda s: None)
    assert {a.topk for a in given.model.modules() if isinstance(a, attention.HSPA)} == {4}
    stored = model.Model(_args('--model', 'HSPAN', '--pre_train', path), log=lambda s: None)
    assert {a.topk for a in stored.model.modules() if isinstance(a, attention.HSPA)} == {8}
    for k, v in m.model.state_dict().items():
        assert torch.equal(given.model.state_dict()[k], v), k


def test_checkpoint_configuration_contradicted_on_the_command_line(tmp_path: Path) -> None:
    m = model.Model(_args(*HSPAN_SMALL), log=lambda s: None)
    m.save(tmp_path, epoch=1)
    path = str(tmp_path / 'model' / 'model_latest.pt')
    with pytest.raises(UserError, match=r'^--n_feats 32 contradicts --pre_train .*, which was saved with --n_feats 16'):
        model.Model(_args('--model', 'HSPAN', '--n_feats', '32', '--pre_train', path), log=lambda s: None)
    with pytest.raises(UserError, match=r'^--model EDSR contradicts .* saved with --model hspan$'):
        model.Model(_args('--model', 'EDSR', '--pre_train', path), log=lambda s: None)
    with pytest.raises(UserError, match=r'^--scale 3 contradicts'):
        model.Model(_args('--model', 'HSPAN', '--scale', '3', '--pre_train', path), log=lambda s: None)


def test_published_unused_entries_are_dropped_by_name_and_nothing_else() -> None:
    from nlsr.model.contract import SRNetwork

    class WithUnused(SRNetwork):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def unused_keys(self) -> frozenset[str]:
            return frozenset({'gamma', 'twin.weight'})

    net = WithUnused()
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    # the named entries are accepted, present or not, and never loaded
    checkpoint.fit_into(net, {**state, 'gamma': torch.zeros(1), 'twin.weight': torch.zeros(2)}, None, 'f.pt')
    assert torch.equal(net.conv.weight, state['conv.weight'])
    checkpoint.fit_into(net, state, None, 'f.pt')
    # any other entry the network lacks is still refused, by name
    with pytest.raises(UserError, match=r'1 unexpected keys: twin\.bias'):
        checkpoint.fit_into(net, {**state, 'twin.bias': torch.zeros(2)}, None, 'f.pt')
