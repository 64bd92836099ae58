"""Watching a run: loss_curve.csv by batch, the loss and PSNR plots, the progress line and --tensorboard.

Tiny CLI runs (as in test_end_to_end.py): 2 epochs of 4 batches with --print_every 2, so the curve has a
row at batches 2, 4, 6 and 8 and an evaluation follows batches 4 and 8. The event files are read back with
TensorBoard's own EventAccumulator, which applies purge_step as TensorBoard does.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_main, tiny_world
from nlsr import main

TINY = ['--model', 'HSPAN', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8', '--reduction', '2',
        '--topk', '8', '--res_scale', '0.1', '--rgb_range', '1', '--scale', '2', '--patch_size', '16',
        '--batch_size', '2', '--test_every', '4', '--print_every', '2', '--lr', '1e-3', '--decay', '1',
        '--gamma', '0.5', '--save_models', '--n_threads', '0', '--data_train', 'Tiny', '--data_test', 'Mini']


@pytest.fixture(scope='module')
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_world(tmp_path_factory.mktemp('watch'))


def _main(world: dict, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    run_main(world, monkeypatch, TINY, *argv)


def _csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / 'loss_curve.csv', newline='') as f:
        return list(csv.DictReader(f))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of folder/tb as (step, value) pairs, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / 'tb'))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def runs(world: dict) -> dict:
    """A 3-epoch run with --tensorboard, and the same run stopped after 2 epochs, given the leftovers of an
    interrupted epoch 3 (a CSV row and events at batches 10 and 12), then resumed to epoch 3."""
    pytest.importorskip('tensorboard')
    from torch.utils.tensorboard import SummaryWriter

    mp = pytest.MonkeyPatch()
    try:
        _main(world, mp, '--save', 'full', '--epochs', '3', '--tensorboard')
        _main(world, mp, '--save', 'part', '--epochs', '2', '--tensorboard')
        part = world['exp'] / 'part'
        two = {'csv': _csv(part), 'tb': _scalars(part)}
        with open(part / 'loss_curve.csv', 'a') as f:
            f.write('10,3,9.5,0.00025,0.1\n')
        stale = SummaryWriter(str(part / 'tb'))
        for step in (10, 12):
            stale.add_scalar('loss/L1', 9.5, step)
            stale.add_scalar('lr', 9.5, step)
        stale.close()
        _main(world, mp, '--load', 'part', '--resume', '-1', '--epochs', '3', '--tensorboard')
    finally:
        mp.undo()
    return {'full': world['exp'] / 'full', 'part': part, 'two': two}


@pytest.mark.slow
def test_two_epochs_log_every_printed_batch(runs: dict) -> None:
    rows, tb = runs['two']['csv'], runs['two']['tb']
    assert [int(r['batch']) for r in rows] == [2, 4, 6, 8]
    assert [int(r['epoch']) for r in rows] == [1, 1, 2, 2]
    assert list(rows[0]) == ['batch', 'epoch', 'L1', 'lr', 'seconds_per_batch']
    assert [float(r['lr']) for r in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])  # --decay 1 --gamma 0.5
    assert all(float(r['seconds_per_batch']) > 0 for r in rows)
    # The loss at every logged batch, the same values as the CSV.
    assert [s for s, _ in tb['loss/L1']] == [2, 4, 6, 8]
    assert [v for _, v in tb['loss/L1']] == pytest.approx([float(r['L1']) for r in rows], rel=1e-5)
    assert all(0 < v < 1 for _, v in tb['loss/L1'])
    assert tb['lr'] == [(2, pytest.approx(1e-3)), (4, pytest.approx(1e-3)), (6, pytest.approx(5e-4)),
                        (8, pytest.approx(5e-4))]
    assert [s for s, _ in tb['time/seconds_per_batch']] == [2, 4, 6, 8]
    # PSNR and SSIM at each evaluation (after batches 4 and 8), as in psnr_log.pt.
    psnr = torch.load(runs['part'] / 'psnr_log.pt')[:2, 0, 0].tolist()
    assert [s for s, _ in tb['psnr/Mini_x2']] == [4, 8]
    assert [v for _, v in tb['psnr/Mini_x2']] == pytest.approx(psnr, abs=1e-4)
    assert [s for s, _ in tb['ssim/Mini_x2']] == [4, 8]


@pytest.mark.slow
def test_resume_appends_without_repeating_a_batch(runs: dict) -> None:
    full, part = runs['full'], runs['part']
    rows = _csv(part)
    assert [int(r['batch']) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert rows[:4] == runs['two']['csv']  # the first run's rows are kept as they were
    assert '9.5' not in [r['L1'] for r in rows]  # the interrupted epoch's row is gone
    # The resumed run logs what an uninterrupted one does.
    assert [(r['batch'], r['L1'], r['lr']) for r in rows] == [(r['batch'], r['L1'], r['lr']) for r in _csv(full)]
    tb = _scalars(part)
    assert [s for s, _ in tb['loss/L1']] == [2, 4, 6, 8, 10, 12]
    assert [v for _, v in tb['loss/L1']] == pytest.approx([float(r['L1']) for r in rows], rel=1e-5)
    assert [s for s, v in tb['lr']] == [2, 4, 6, 8, 10, 12] and 9.5 not in [v for _, v in tb['lr']]
    assert [s for s, _ in tb['psnr/Mini_x2']] == [4, 8, 12]
    assert [v for _, v in tb['psnr/Mini_x2']] == pytest.approx([v for _, v in _scalars(full)['psnr/Mini_x2']],
                                                               abs=1e-4)


@pytest.mark.slow
def test_resume_from_an_earlier_epoch_cuts_the_curve_back(runs: dict, world: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    again = world['exp'] / 'again'
    shutil.copytree(runs['full'], again)
    _main(world, monkeypatch, '--load', 'again', '--resume', '1', '--epochs', '2', '--tensorboard')
    assert [int(r['batch']) for r in _csv(again)] == [2, 4, 6, 8]
    tb = _scalars(again)
    assert [s for s, _ in tb['loss/L1']] == [2, 4, 6, 8]
    assert [s for s, _ in tb['psnr/Mini_x2']] == [4, 8]


@pytest.mark.slow
def test_plots_by_batch(runs: dict) -> None:
    from nlsr.runs.curves import LossCurve, loss_figure

    part = runs['part']
    for name in ('loss_L1.png', 'psnr_Mini.png'):
        assert (part / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    points = LossCurve(part / 'loss_curve.csv', ['L1']).points()['L1']
    ax = loss_figure('L1', points).axes[0]
    raw, smoothed = ax.get_lines()
    assert list(raw.get_xdata()) == [2, 4, 6, 8, 10, 12]  # one point per logged batch
    assert len(smoothed.get_xdata()) == 6 and ax.get_xlabel() == 'Batch'


def test_one_evaluation_is_readable() -> None:
    """One PSNR value: a labelled point on an axis from batch 0 (integer ticks), at least 1 dB tall."""
    from nlsr.runs.curves import psnr_figure

    fig = psnr_figure('Set5', {'x2': [(900, 35.123)]}, batches_per_epoch=900)
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 900
    assert all(float(t).is_integer() for t in ax.get_xticks())
    low, high = ax.get_ylim()
    assert high - low >= 1 and low < 35.123 < high
    assert [t.get_text() for t in ax.texts] == ['35.12']
    assert 'last 35.12 dB' in ax.get_legend().get_texts()[0].get_text()


def test_smoothing() -> None:
    from nlsr.runs.curves import smooth

    assert smooth([2.0, 2.0, 2.0, 2.0]) == pytest.approx([2.0] * 4)  # bias-corrected: no pull towards 0
    out = smooth([1.0, 0.0, 0.0, 0.0, 0.0], span=3)
    assert 0.5 < out[0] < 1 and all(a > b > 0 for a, b in zip(out, out[1:], strict=False))
    assert smooth([1.0, float('nan'), 1.0], span=3) == pytest.approx([1.0, 1.0, 1.0])
    line = [float(i) for i in range(60)]
    assert smooth(line)[30] == pytest.approx(30.0, abs=1e-3)  # no lag behind a trend
    noisy = [(-1.0) ** i for i in range(60)]
    assert max(abs(v) for v in smooth(noisy)[10:50]) < 0.3


def test_progress_line_without_a_terminal(world: dict, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    _main(world, monkeypatch, '--save', 'plain', '--epochs', '1')
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith('[Epoch 1 batch')]
    assert [ln.split(']')[0] for ln in lines] == ['[Epoch 1 batch 2/4', '[Epoch 1 batch 4/4']
    pattern = r'\[Epoch 1 batch 2/4\]  loss \d\.\d{4}  lr 1\.00e-03  \d+\.\d{3} s/batch  \d+:\d\d left'
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert lines[1].endswith('0:00 left')
    # log.txt keeps EDSR's line: images so far, running means, model+data seconds.
    log = (world['exp'] / 'plain' / 'log.txt').read_text()
    assert re.search(r'^\[4/8\]\t\[L1: \d\.\d{4}\]\t\d+\.\d\+\d+\.\ds$', log, re.M)


def test_progress_bar_text() -> None:
    from tqdm import tqdm

    from nlsr.runs.watch import BAR_FORMAT, format_duration, progress_text

    assert [format_duration(s) for s in (0, 5.4, 125, 3723)] == ['0:00', '0:05', '2:05', '1:02:03']
    status = progress_text(0.03125, 4e-3, 0.2481, 210)
    assert status == 'loss 0.0312  lr 4.00e-03  0.248 s/batch  3:30 left'
    bar = tqdm.format_meter(2, 4, 1.0, ncols=110, prefix=status, bar_format=BAR_FORMAT.format(epoch=3))
    assert re.fullmatch(r'Epoch 3 batch 2/4 \|\S{10} {10}\| loss 0\.0312  lr 4\.00e-03  0\.248 s/batch  3:30 left', bar)


def test_tensorboard_missing_is_one_line(world: dict, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # as if it were not installed
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    assert main.main([*TINY, '--dir_data', str(world['data']), '--save', 'notb', '--tensorboard']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --tensorboard needs the tensorboard package: pip install tensorboard']
    assert not (world['exp'] / 'notb').exists()


def test_tensorboard_is_imported_only_with_the_flag(world: dict) -> None:
    code = ('import sys, main\n'
            f'assert main.main({[*TINY, "--dir_data", str(world["data"]), "--save", "noflag", "--epochs", "1"]!r})'
            ' == 0\n'
            "print(sorted(m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard'))))\n")
    env = dict(os.environ, SR_EXPERIMENT_ROOT=str(world['exp']), PYTHONPATH=str(ROOT / 'src'))
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == '[]'
    assert not (world['exp'] / 'noflag' / 'tb').exists()
