"""End to end on tiny data with the real data, model, loss and trainer: train, stop, resume, test_only.

A tiny HSPAN learns from a folder of HR images (LR made by the project) and is scored on another.
The learning rate halves every epoch (--decay 1-2-3-4), so a resume that restores the wrong LR, epoch or
optimizer state shows up both in log.txt and in the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_main, tiny_world
from nlsr import main

TINY = ['--model', 'HSPAN', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8', '--reduction', '2',
        '--topk', '8', '--res_scale', '0.1', '--rgb_range', '1', '--scale', '2', '--patch_size', '16',
        '--batch_size', '2', '--test_every', '2', '--print_every', '1', '--lr', '1e-3', '--decay', '1-2-3-4',
        '--gamma', '0.5', '--save_models', '--n_threads', '0', '--data_train', 'Tiny', '--data_test', 'Mini']


@pytest.fixture(scope='module')
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_world(tmp_path_factory.mktemp('e2e'))


def _main(world: dict, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    run_main(world, monkeypatch, TINY, *argv)


def _content(log: Path) -> list[str]:
    """Training and evaluation lines of log.txt without timings (the only part that differs between equal
    runs), and resume notes; each run's header (folder, model, loss) is left out."""
    lines = log.read_text().splitlines()
    return [re.sub(r'\t[0-9.]+\+[0-9.]+s$', '', ln) for ln in lines
            if ln.startswith(('[', 'Evaluation:', 'Resumed', 'Skip'))]


def _weights(path: Path) -> dict:
    """The state dict of a model file (which also carries the network's configuration)."""
    from nlsr.model.checkpoint import read_state_dict

    return read_state_dict(path)


@pytest.fixture(scope='module')
def runs(world: dict) -> dict:
    """An uninterrupted 3-epoch run, and a 2-epoch run killed early in epoch 3, then resumed."""
    mp = pytest.MonkeyPatch()
    try:
        _main(world, mp, '--save', 'full', '--epochs', '3')
        _main(world, mp, '--save', 'part', '--epochs', '2')
        part = world['exp'] / 'part'
        # What a run killed early in epoch 3 leaves behind: lines after its last checkpoint.
        with open(part / 'log.txt', 'a') as f:
            f.write('[Epoch 3]\tLearning rate: 2.50e-04\n[2/4]\t[L1: 0.1234]\t0.0+0.0s\n')
        _main(world, mp, '--load', 'part', '--resume', '-1', '--epochs', '3')
    finally:
        mp.undo()
    return {'full': world['exp'] / 'full', 'part': world['exp'] / 'part'}


@pytest.mark.slow
def test_resume_continues_exactly(runs: dict) -> None:
    full, part = runs['full'], runs['part']
    part_lines = _content(part / 'log.txt')
    assert part_lines.count('Resumed at epoch 2 (learning rate 2.50e-04)') == 1
    part_lines.remove('Resumed at epoch 2 (learning rate 2.50e-04)')
    # Same lines as the uninterrupted run: same LR per epoch, same losses and scores, nothing twice.
    assert part_lines == _content(full / 'log.txt')
    epochs = [ln for ln in part_lines if ln.startswith('[Epoch')]
    assert epochs == ['[Epoch 1]\tLearning rate: 1.00e-03', '[Epoch 2]\tLearning rate: 5.00e-04',
                      '[Epoch 3]\tLearning rate: 2.50e-04']
    assert '[2/4]\t[L1: 0.1234]' in (part / 'log_discarded.txt').read_text()
    headers = [ln for ln in (part / 'log.txt').read_text().splitlines() if ln.startswith('Experiment folder:')]
    assert len(headers) == 2  # one per run
    for name in ('model_latest.pt', 'model_3.pt'):
        a, b = _weights(full / 'model' / name), _weights(part / 'model' / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    state = torch.load(part / 'training_state.pt', map_location='cpu', weights_only=True)
    assert state['epoch'] == 3
    assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(1.25e-4)  # for epoch 4 (milestone 3 passed)
    assert torch.load(part / 'loss_log.pt').shape == (3, 1)
    assert torch.allclose(torch.load(part / 'psnr_log.pt'), torch.load(full / 'psnr_log.pt'), atol=1e-6)


@pytest.mark.slow
def test_experiment_folder_and_results_json(runs: dict) -> None:
    full = runs['full']
    for rel in ('config.txt', 'log.txt', 'training_state.pt', 'psnr_log.pt', 'loss_log.pt', 'loss_L1.png',
                'psnr_Mini.png', 'results.json', 'model/model_latest.pt', 'model/model_best.pt',
                'model/model_1.pt', 'model/model_2.pt', 'model/model_3.pt'):
        assert (full / rel).is_file(), rel
    assert not list(full.rglob('*.tmp')), 'a temporary file was left behind'
    assert torch.load(full / 'psnr_log.pt').shape == (3, 1, 1)

    results = json.loads((full / 'results.json').read_text())
    assert isinstance(results, list) and len(results) == 1
    r = results[0]
    assert {'dataset', 'scale', 'psnr', 'ssim', 'images', 'seconds'} <= r.keys()
    assert (r['dataset'], r['scale'], r['images']) == ('Mini', 2, 2)
    assert 5 < r['psnr'] < 60 and 0 < r['ssim'] <= 1 and r['seconds'] >= 0
    last = [ln for ln in (full / 'log.txt').read_text().splitlines() if ln.startswith('[Mini x2]')][-1]
    assert re.fullmatch(r'\[Mini x2\]  PSNR: \d+\.\d{3}  SSIM: \d\.\d{4}  \(Best: \d+\.\d{3} @epoch [123]\)', last)
    assert f"PSNR: {r['psnr']:.3f}  SSIM: {r['ssim']:.4f}" in last


@pytest.mark.slow
def test_resume_from_numbered_checkpoint(runs: dict, world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    part = runs['part']
    _main(world, monkeypatch, '--load', 'part', '--resume', '2', '--epochs', '3')
    lines = _content(part / 'log.txt')
    assert [ln for ln in lines if ln.startswith('[Epoch')] == [
        '[Epoch 1]\tLearning rate: 1.00e-03', '[Epoch 2]\tLearning rate: 5.00e-04',
        '[Epoch 3]\tLearning rate: 2.50e-04']
    assert any(ln.startswith('Resumed at epoch 2 from model_2.pt with fresh ADAM moments') for ln in lines)
    assert len(torch.load(part / 'psnr_log.pt')) == 3


@pytest.mark.slow
def test_resume_reads_an_older_optimizer_pt(runs: dict, world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder whose training state is the older optimizer.pt (format 1, with a MultiStepLR state)."""
    import shutil

    old = world['exp'] / 'old_format'
    shutil.copytree(runs['full'], old)
    state = torch.load(old / 'training_state.pt', map_location='cpu', weights_only=True)
    (old / 'training_state.pt').unlink()
    state.update(format=1, scheduler={'milestones': {1: 1, 2: 1, 3: 1, 4: 1}, 'gamma': 0.5, 'last_epoch': 3})
    torch.save(state, old / 'optimizer.pt')
    _main(world, monkeypatch, '--load', 'old_format', '--resume', '-1', '--epochs', '4')
    lines = _content(old / 'log.txt')
    assert 'Resumed at epoch 3 (learning rate 1.25e-04)' in lines
    assert [ln for ln in lines if ln.startswith('[Epoch')][-1] == '[Epoch 4]\tLearning rate: 1.25e-04'
    assert torch.load(old / 'training_state.pt', weights_only=True)['epoch'] == 4


@pytest.mark.slow
def test_test_only_with_pre_train(runs: dict, world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    full = runs['full']
    _main(world, monkeypatch, '--save', 'eval', '--test_only', '--save_results', '--save_gt',
          '--pre_train', str(full / 'model' / 'model_latest.pt'))
    ev = world['exp'] / 'eval'
    got = json.loads((ev / 'results.json').read_text())
    want = json.loads((full / 'results.json').read_text())
    assert [(e['dataset'], e['scale'], e['images']) for e in got] == [('Mini', 2, 2)]
    assert got[0]['psnr'] == pytest.approx(want[0]['psnr'], abs=1e-9)
    assert got[0]['ssim'] == pytest.approx(want[0]['ssim'], abs=1e-9)
    for stem in ('im0', 'im1'):
        for tag in ('SR', 'LR', 'HR'):
            assert (ev / 'results-Mini' / f'{stem}_x2_{tag}.png').is_file()
    assert not (ev / 'training_state.pt').exists() and not (ev / 'model').exists()


@pytest.mark.slow
def test_checkpoint_rebuilds_its_network_without_architecture_flags(
        runs: dict, world: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The model files carry the network's configuration: --test_only --model HSPAN --pre_train <it> scores
    what the training run's evaluation scored; a contradicting flag is refused in one line naming it."""
    full = runs['full']
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    bare = ['--model', 'HSPAN', '--test_only', '--pre_train', str(full / 'model' / 'model_latest.pt'),
            '--data_test', 'Mini', '--dir_data', str(world['data']), '--n_threads', '0']
    assert main.main([*bare, '--save', 'rebuilt']) == 0
    got = json.loads((world['exp'] / 'rebuilt' / 'results.json').read_text())
    want = json.loads((full / 'results.json').read_text())
    assert [(e['dataset'], e['scale']) for e in got] == [('Mini', 2)]
    assert got[0]['psnr'] == pytest.approx(want[0]['psnr'], abs=1e-9)
    assert got[0]['ssim'] == pytest.approx(want[0]['ssim'], abs=1e-9)
    capsys.readouterr()
    assert main.main([*bare, '--save', 'refused', '--n_feats', '32']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --n_feats 32 contradicts') and '--n_feats 8' in err[0]


@pytest.mark.slow
def test_existing_run_is_not_overwritten(runs: dict, world: dict, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    assert main.main([*TINY, '--dir_data', str(world['data']), '--save', 'full']) == 1
    assert '--reset' in capsys.readouterr().err


def test_batch_lr_cosine_and_warmup() -> None:
    from argparse import Namespace

    from nlsr.training.schedule import lr_at as batch_lr

    cos = Namespace(lr_schedule='cosine', lr=1e-3, min_lr=1e-5, epochs=2, test_every=50, warmup=0,
                    decay_milestones=[], gamma=0.5)
    assert batch_lr(cos, 0) == pytest.approx(1e-3)
    assert batch_lr(cos, 50) == pytest.approx((1e-3 + 1e-5) / 2)  # half way: cos(pi/2) = 0
    assert batch_lr(cos, 100) == pytest.approx(1e-5) and batch_lr(cos, 150) == pytest.approx(1e-5)
    step = Namespace(lr_schedule='step', lr=1e-3, min_lr=0, epochs=4, test_every=10, warmup=5,
                     decay_milestones=[1, 3], gamma=0.5)
    assert [batch_lr(step, i) for i in (0, 4, 9, 10, 29, 30)] == pytest.approx(
        [2e-4, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


@pytest.mark.slow
def test_cosine_warmup_resume_matches_uninterrupted(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-batch LRs depend on the batch number only: a 3-epoch run killed after epoch 2 and resumed ends
    where the uninterrupted one does (the curve spans the planned --epochs, so the kill is simulated)."""
    from nlsr.training import trainer

    cosine = ['--lr_schedule', 'cosine', '--warmup', '3', '--min_lr', '1e-5', '--epochs', '3']
    _main(world, monkeypatch, '--save', 'cos_full', *cosine)
    with monkeypatch.context() as m:
        m.setattr(trainer.Trainer, 'terminate', lambda self: self.epoch >= 2)
        _main(world, m, '--save', 'cos_part', *cosine)
    _main(world, monkeypatch, '--load', 'cos_part', '--resume', '-1', *cosine)
    full, part = world['exp'] / 'cos_full', world['exp'] / 'cos_part'
    epochs = [ln for ln in _content(full / 'log.txt') if ln.startswith('[Epoch')]
    # 6 batches over 3 epochs; warm-up over the first 3: batch 0 -> lr/3, batch 2 -> on the cosine, batch 4 too.
    want = [1e-3 / 3, 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 2 / 6)),
            1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 4 / 6))]
    assert epochs == [f'[Epoch {i + 1}]\tLearning rate: {lr:.2e}' for i, lr in enumerate(want)]
    a, b = _weights(full / 'model' / 'model_latest.pt'), _weights(part / 'model' / 'model_latest.pt')
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert torch.allclose(torch.load(part / 'psnr_log.pt'), torch.load(full / 'psnr_log.pt'), atol=1e-6)


def test_gan_discriminator_follows_the_one_schedule(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The discriminator's optimizer gets the network's learning rate, batch by batch (here cosine with
    warm-up, which its own MultiStepLR used to ignore)."""
    from nlsr import option
    from nlsr.training import trainer
    from nlsr.training.schedule import lr_at

    flags = ['--loss', '1*L1+0.01*GAN', '--lr_schedule', 'cosine', '--warmup', '1', '--epochs', '3']
    with monkeypatch.context() as m:
        m.setattr(trainer.Trainer, 'terminate', lambda self: self.epoch >= 1)
        _main(world, m, '--save', 'gan', *flags)
    state = torch.load(world['exp'] / 'gan' / 'training_state.pt', map_location='cpu', weights_only=True)
    args = option.parse([*TINY, *flags])
    next_lr = lr_at(args, args.test_every)  # the optimizers hold the LR of the next batch: 1e-3 * 0.75
    assert next_lr not in (args.lr, args.lr * args.gamma)  # neither the base LR nor the step schedule's
    assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(next_lr)
    dis = state['loss']['modules']['1._extra_state']['optimizer']
    assert [g['lr'] for g in dis['param_groups']] == pytest.approx([next_lr])
