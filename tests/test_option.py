"""Option parsing: published defaults, templates, normalised types, one-line errors."""

from __future__ import annotations

import pytest

import option
from errors import UserError

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


def test_gan_under_torchrun_is_refused_when_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GAN term trains a discriminator per process: refused for a torchrun job before anything starts,
    once (by rank 0); a single process and evaluation-only runs are fine."""
    from distributed import RankZeroError

    argv = ['--loss', '1*L1+0.01*GAN']
    assert option.parse(argv).loss == '1*L1+0.01*GAN'
    for k, v in (('RANK', '0'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '0')):
        monkeypatch.setenv(k, v)
    with pytest.raises(RankZeroError, match='--loss 1\\*L1\\+0.01\\*GAN: the GAN term'):
        option.parse(argv)
    assert option.parse([*argv, '--test_only']).test_only
    assert option.parse(['--loss', '1*L1']).loss == '1*L1'
