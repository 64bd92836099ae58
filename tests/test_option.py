"""Option parsing: published defaults, templates, normalised types, one-line errors."""

from __future__ import annotations

import pytest

from nlsr import option
from nlsr.errors import UserError

SEED_TRAIN = (
    '--dir_data ../../SrTrainingData --data_range 1-800/1-5 --n_GPUs 1 --rgb_range 1 --save_models --lr 1e-4 '
    '--decay 200-400-600-800 --epochs 1000 --chop --save_results --data_test Set5 --n_resgroups 10 '
    '--n_resblocks 4 --n_feats 192 --reduction 2 --topk 128 --res_scale 0.1 --batch_size 16 --model HSPAN '
    '--scale 2 --patch_size 96 --save HSPAN_x2 --data_train DIV2K'
)


def test_seed_training_command_parses():
    a = option.parse(SEED_TRAIN.split())
    assert a.model == 'HSPAN' and a.scale == [2] and a.data_test == ['Set5'] and a.data_train == ['DIV2K']
    assert a.decay_milestones == [200, 400, 600, 800] and a.chop and a.save_models
    assert (a.n_resgroups, a.n_resblocks, a.n_feats, a.reduction, a.topk, a.res_scale) == (10, 4, 192, 2, 128, 0.1)


def test_published_defaults():
    a = option.parse([])
    assert (a.model, a.scale, a.patch_size, a.rgb_range, a.ext, a.lr, a.gamma) == ('EDSR', [4], 192, 255, 'sep',
                                                                                  1e-4, 0.5)
    assert a.data_range == '1-800/801-810' and a.betas == (0.9, 0.999) and a.loss == '1*L1'


@pytest.mark.parametrize('template, model, feats', [('HSPAN', 'HSPAN', 192), ('MSDSN', 'MSNLAN', 64),
                                                    ('MSNLAN', 'MSNLAN', 64), ('EDSR_paper', 'EDSR', 256),
                                                    ('edsr', 'EDSR', 64), ('PAEDSR', 'PAEDSR', 256),
                                                    ('RCAN', 'RCAN', 64), ('CSNLN', 'CSNLN', 128)])
def test_templates(template, model, feats):
    a = option.parse(['--template', template])
    assert a.model == model and a.n_feats == feats


def test_multi_scale_and_zero_epochs():
    a = option.parse(['--scale', '2+3+4', '--epochs', '0', '--patch_size', '96', '--data_test', 'Set5+Set14'])
    assert a.scale == [2, 3, 4] and a.epochs > 10**7 and a.data_test == ['Set5', 'Set14']


@pytest.mark.parametrize('argv, words', [
    (['--scale', '2+x'], '--scale'),
    (['--decay', '100-abc'], '--decay'),
    (['--patch_size', '97', '--scale', '2'], '--patch_size 97'),
    (['--resume', '-1'], '--load'),
    (['--model', 'Bicubic'], '--test_only'),
    (['--batch_size', '0'], '--batch_size'),
    (['--warmup', '-1'], '--warmup'),
    (['--lr_schedule', 'cosine', '--epochs', '0'], '--lr_schedule cosine'),
    (['--topk', '0'], '--topk 0'),
    (['--reduction', '0'], '--reduction 0'),
    (['--n_resgroups', '0'], '--n_resgroups 0'),
    (['--epochs', '-3'], '--epochs -3'),
    (['--load', 'x', '--resume', '-2'], '--resume -2'),
    (['--lr', '0'], '--lr 0'),
    (['--gclip', '-1'], '--gclip -1'),
    (['--betas', '0.9', '1.5'], '--betas 0.9 1.5'),
    (['--min_lr', '1', '--lr', '1e-3'], '--min_lr 1'),
    (['--tile', '16', '--tile_overlap', '16'], '--tile_overlap 16'),
    (['--template', 'HSPAN', '--tile', '64'], '--chop and --tile'),
    (['--template', 'nope'], '--template nope'),
])
def test_bad_values_name_the_flag(argv, words):
    with pytest.raises(UserError, match=words):
        option.parse(argv)


# Values no run can use, refused when parsed although an evaluation (--test_only) or this model never reads them.
@pytest.mark.parametrize('argv, expected', [
    (['--decay', 'x'], "--decay 'x': expected integers separated by '-'"),
    (['--decay', '0-100'], "--decay 0-100: expected epochs from 1"),
    (['--loss', '1*L2'], "--loss '1*L2': unknown term 'L2'"),
    (['--loss', '1e999*L1'], 'the weight of L1 must be a finite positive number'),
    (['--loss', '1*L1+0.1*GAN', '--accumulate', '2'], '--accumulate 2: the GAN term'),
    (['--data_range', '5-1'], "--data_range '5-1': expected 'first-last'"),
    (['--data_range', '1-2/3-4/5-6'], "--data_range '1-2/3-4/5-6'"),
    (['--data_test', 'Set5', '--data_range', '0-10'], "--data_range '0-10'"),
    (['--data_train', 'Demo'], '--data_train Demo: Demo images have no ground truth'),
    (['--data_train', '+'], '--data_train: expected at least one dataset name'),
    (['--betas', 'nan', '0.9'], '--betas nan 0.9: expected finite numbers'),
    (['--betas', '0.9', '1'], '--betas 0.9 1.0: expected two numbers in [0, 1)'),
    (['--charbonnier_eps', '0'], '--charbonnier_eps 0.0: expected a positive number'),
    (['--charbonnier_eps', 'inf'], '--charbonnier_eps inf: expected a finite number'),
    (['--skip_threshold', 'inf'], '--skip_threshold inf: expected a finite number'),
    (['--gclip', 'nan'], '--gclip nan: expected a finite number'),
    (['--momentum', '-0.5'], '--momentum -0.5: expected 0 or a positive number'),
    (['--epsilon=-inf'], '--epsilon -inf: expected a finite number'),
    (['--ema_decay', '1'], '--ema_decay 1.0: expected a number in [0, 1)'),
    (['--tile_overlap', '-1'], '--tile_overlap -1: expected an integer >= 0'),
    (['--tile', '8', '--tile_overlap', '8'], '--tile_overlap 8: expected less than --tile 8'),
    (['--scale', '2+2'], '--scale 2+2: expected each scale once'),
    (['--scale', '0'], '--scale'),
    (['--patch_size', '97', '--scale', '2'], '--patch_size 97 is not a multiple of --scale 2'),
    (['--lr_schedule', 'cosine', '--epochs', '0'], '--lr_schedule cosine needs --epochs > 0'),
    (['--G0', '0'], '--G0 0: expected an integer >= 1'),
    (['--RDNkSize', '4'], '--RDNkSize 4: expected an odd kernel size'),
    (['--depth', '0'], '--depth 0'),
    (['--chunk_size', '-1'], '--chunk_size -1'),
    (['--n_hashes', '0'], '--n_hashes 0'),
    (['--attention', 'hspa', '--attention_every', '0'], '--attention_every 0: expected an integer >= 1'),
    (['--n_feats', str(2**40)], f'--n_feats {2**40}: expected an integer <= 2147483647'),
    (['--patch_size', '-96'], '--patch_size -96: expected an integer >= 1'),
    (['--seed', '-1'], '--seed -1: expected an integer >= 0'),
    (['--seed', str(2**64)], '--seed 18446744073709551616: expected an integer <= '),
    (['--dist_timeout', '0'], '--dist_timeout 0'),
    (['--model', 'Nope'], '--model Nope: unknown model'),
    (['--dir_demo', ''], "--dir_demo '': expected a folder path"),
    (['--dir_data', ''], "--dir_data '': expected a folder path"),
    (['--save', '../x'], "--save '../x': expected a plain folder name"),
    (['--save', ''], "--save '': expected a plain folder name"),
    (['--load', 'a/b'], "--load 'a/b': expected a plain folder name"),
])
def test_values_no_run_can_use_are_refused_even_unread(argv, expected):
    with pytest.raises(UserError) as err:
        option.parse(['--test_only', *argv])
    assert expected in str(err.value) and '\n' not in str(err.value), str(err.value)


def test_paths_that_are_files_or_folders_of_the_wrong_kind(tmp_path):
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('x')
    for flag in ('--dir_data', '--dir_demo', '--dir_cache'):
        with pytest.raises(UserError, match=f'{flag} {a_file}: exists and is not a folder'):
            option.parse(['--test_only', flag, str(a_file)])
    (tmp_path / 'x2').mkdir()
    with pytest.raises(UserError, match=f'--pre_train {tmp_path}/x2: is a folder; expected a checkpoint file'):
        option.parse(['--test_only', '--scale', '2', '--pre_train', str(tmp_path / 'x{scale}')])
    assert option.parse(['--test_only', '--dir_cache', str(tmp_path / 'new'), '--dir_demo', str(tmp_path)])


def test_usable_values_stay_accepted():
    # an evaluation at a scale the default --patch_size does not divide: the patch size was not written
    assert option.parse(['--test_only', '--model', 'Bicubic', '--scale', '5']).scale == [5]
    a = option.parse(['--decay', '', '--loss', 'L1', '--seed', '0', '--dir_cache', '', '--load', '',
                      '--betas', '0', '0'])
    assert a.decay_milestones == [] and a.betas == (0.0, 0.0)
    assert option.parse(['--model', 'RDN', '--RDNkSize', '5', '--tile', '0', '--tile_overlap', '100']).RDNkSize == 5


def test_every_flag_has_a_value_check():
    """Each flag is a switch, takes a fixed set of choices, or has its rule in option.py."""
    for action in option.build_parser()._actions:
        if action.nargs == 0 or action.choices is not None or action.dest in ('help', 'template'):
            continue
        table = {int: option.AT_LEAST, float: option.FLOAT_RANGE}.get(action.type, option.TEXT_CHECKS)
        assert action.dest in table, f'--{action.dest} has no value check'


def test_gan_under_torchrun_is_refused_when_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GAN term trains a discriminator per process: refused for a torchrun job before anything starts,
    once (by rank 0); a single process and evaluation-only runs are fine."""
    from nlsr.distributed import RankZeroError

    argv = ['--loss', '1*L1+0.01*GAN']
    assert option.parse(argv).loss == '1*L1+0.01*GAN'
    for k, v in (('RANK', '0'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '0')):
        monkeypatch.setenv(k, v)
    with pytest.raises(RankZeroError, match='--loss 1\\*L1\\+0.01\\*GAN: the GAN term'):
        option.parse(argv)
    assert option.parse([*argv, '--test_only']).test_only
    assert option.parse(['--loss', '1*L1']).loss == '1*L1'
