"""The configuration is built once, in one order (the command line, the --template preset, the --pre_train
checkpoint's configuration), then frozen; the experiment decides the resume point without changing it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from nlsr import model, option
from nlsr.config import Config
from nlsr.errors import UserError
from nlsr.runs.experiment import Experiment, ResumePoint, read_config
from nlsr.training.training_state import TrainingState

SMALL = ['--scale', '2', '--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16', '--reduction', '2',
         '--topk', '8', '--rgb_range', '1', '--hspa_impl', 'dense']


def test_the_configuration_is_frozen() -> None:
    config = option.parse(['--template', 'HSPAN', '--scale', '2'])
    with pytest.raises(AttributeError, match=r"built once and frozen: cannot set 'n_feats'"):
        config.n_feats = 8
    with pytest.raises(AttributeError, match='frozen'):
        del config.scale
    with pytest.raises(AttributeError, match='frozen'):
        setattr(config, 'load', 'x')  # noqa: B010 (the call a layer would write)
    changed = config.replace(n_feats=8)
    assert (changed.n_feats, config.n_feats) == (8, 192) and isinstance(changed, Config)
    assert pickle.loads(pickle.dumps(config)) == config  # data-loader workers started with spawn get a copy


def _saved_hspan(tmp_path: Path) -> str:
    """A model file of a small HSPAN, with its configuration (n_feats 16, topk 8, ...)."""
    net = model.Model(option.parse(['--cpu', '--test_only', '--model', 'HSPAN', *SMALL]), log=lambda s: None)
    net.save(tmp_path, epoch=1)
    return str(tmp_path / 'model' / 'model_latest.pt')


def test_build_order_flags_then_template_then_checkpoint(tmp_path: Path) -> None:
    """Given flags win; the checkpoint's configuration overrides the template's values; the template fills in
    what neither states (HSPAN's --chop); the file is read once and handed on."""
    path = _saved_hspan(tmp_path)
    config, configured = option.build(['--cpu', '--test_only', '--template', 'HSPAN', '--topk', '4',
                                       '--hspa_impl', 'dense', '--pre_train', path])
    assert (config.model, config.n_feats, config.n_resgroups, config.n_resblocks, config.scale) == (
        'HSPAN', 16, 2, 1, [2])  # the template said 192, 10, 4 and --scale 4 is the default
    assert config.topk == 4  # given: a flag of how the network computes, the command line wins
    assert config.chop and config.rgb_range == 1  # the template's, which the checkpoint agrees with or leaves
    assert config.cli_flags >= {'template', 'topk', 'pre_train'} and 'n_feats' not in config.cli_flags
    assert '--n_feats 16' in configured.adopted and not any('topk' in a for a in configured.adopted)
    assert list(configured.files) == [path]
    net = model.Model(config, log=lambda s: None, configured=configured)
    assert configured.files == {} and net.model.config['n_feats'] == 16  # taken by the wrapper, not read again


def test_given_flags_that_contradict_the_checkpoint_are_refused(tmp_path: Path) -> None:
    path = _saved_hspan(tmp_path)
    with pytest.raises(UserError, match=r'^--n_feats 32 contradicts --pre_train .*saved with --n_feats 16$'):
        option.build(['--cpu', '--test_only', '--template', 'HSPAN', '--n_feats', '32', '--pre_train', path])
    # A given flag that agrees is kept, and parse_flags alone reads no file.
    assert option.build(['--cpu', '--test_only', '--model', 'HSPAN', '--n_feats', '16',
                         '--pre_train', path])[0].n_feats == 16
    assert option.parse_flags(['--pre_train', str(tmp_path / 'missing.pt')]).pre_train.endswith('missing.pt')


def test_a_stored_value_the_flag_cannot_take_is_refused(tmp_path: Path) -> None:
    path = tmp_path / 'odd.pt'
    net = model.make_network(option.parse(['--cpu', '--test_only', '--model', 'HSPAN', *SMALL]))
    torch.save({'config': {'model': 'hspan', 'n_feats': 'sixteen'}, 'state_dict': net.state_dict()}, path)
    with pytest.raises(UserError, match=r"configuration entry 'n_feats' = 'sixteen' is not a value --n_feats"):
        option.build(['--cpu', '--test_only', '--model', 'HSPAN', '--pre_train', str(path)])


def _experiment(tmp_path: Path, *argv: str, restart: int = 0) -> Experiment:
    return Experiment(option.parse(['--cpu', *argv]), root=tmp_path, is_main=True, restart=restart)


def test_the_experiment_returns_the_resume_point(tmp_path: Path) -> None:
    exp = _experiment(tmp_path, '--save', 'a')
    assert exp.resume_point is None
    exp.done()
    TrainingState(epoch=2, model={'w': torch.ones(2)}).save(tmp_path / 'a')
    for argv, point in ((('--load', 'a', '--resume', '-1'), ResumePoint('a', -1)),
                        (('--load', 'a', '--resume', '3'), ResumePoint('a', 3)),
                        (('--load', 'a', '--test_only'), ResumePoint('a', 0))):
        exp = _experiment(tmp_path, *argv)
        assert exp.resume_point == point and exp.args.load == 'a'
        exp.done()
    exp = _experiment(tmp_path, '--load', 'a', '--reset')  # starts afresh: the folder is emptied
    assert exp.resume_point is None and exp.args.load == 'a' and exp.args.reset
    assert not (tmp_path / 'a' / 'training_state.pt').exists()
    exp.done()


def test_a_restarted_group_resumes_its_run_without_changing_the_flags(tmp_path: Path) -> None:
    _experiment(tmp_path, '--save', 'r').done()
    TrainingState(epoch=2, model={'w': torch.ones(2)}).save(tmp_path / 'r')
    exp = _experiment(tmp_path, '--save', 'r', restart=1)
    assert exp.resume_point == ResumePoint('r', -1)
    assert (exp.args.load, exp.args.resume, exp.args.reset) == ('', 0, False)  # as parsed
    assert read_config(tmp_path / 'r' / 'config.txt')['load'] == ''
    exp.done()
    # Another configuration in the folder: refused, as without a restart.
    with pytest.raises(UserError, match='another configuration'):
        _experiment(tmp_path, '--save', 'r', '--lr', '0.001', restart=2)


def test_build_refuses_a_model_flag_the_model_does_not_read() -> None:
    with pytest.raises(UserError, match='^--res_scale is not used by --model RCAN'):
        option.build(['--model', 'RCAN', '--res_scale', '0.1'])
    config = option.parse(['--model', 'RCAN', '--res_scale', '0.1'])  # the flags only; model.Model checks
    with pytest.raises(UserError, match='^--res_scale is not used by --model RCAN'):
        model.Model(config, log=lambda s: None)
