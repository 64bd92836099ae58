"""The training recipe: --ema_decay/--ema_start, --accumulate, --optimizer ADAMW, the Charbonnier loss and
--compile, on a tiny HSPAN (in this process through main.main, or as subprocesses, torchrun included,
through tests/training/faults_harness.py)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import faults_harness as faults
from conftest import ROOT
from nlsr import main, option
from nlsr.loss import Loss
from nlsr.loss.charbonnier import Charbonnier
from nlsr.model.checkpoint import read_state_dict
from nlsr.training.ema import WeightAverage
from nlsr.training.trainer import make_optimizer


@pytest.fixture(scope='module')
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return faults.make_world(tmp_path_factory.mktemp('recipe'))


def _main(world: dict, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """main.main with the fault tests' tiny HSPAN, one thread (as their subprocesses)."""
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main.main([*faults.TINY, '--dir_data', str(world['data']), '--dir_cache', str(world['cache']), *argv])
    finally:
        torch.set_num_threads(threads)


def _state(folder: Path) -> dict:
    return torch.load(folder / 'training_state.pt', map_location='cpu', weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _net_keys(state: dict) -> dict:
    """The wrapper's 'nets.0.' keys as the model files' keys."""
    return {k.removeprefix('nets.0.'): v for k, v in state.items()}


def _curve(folder: Path) -> list[dict]:
    with open(folder / 'loss_curve.csv', newline='') as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- EMA

def test_ema_update_matches_hand_computation() -> None:
    """decay 0.75, --ema_start 1: step 0 copies, later steps average; buffers and frozen weights are copied."""
    net = nn.Linear(2, 1)
    net.register_buffer('count', torch.tensor([5.0]))
    net.bias.requires_grad_(False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.bias.fill_(3.0)
    ema = WeightAverage(net, decay=0.75, start=1)

    def set_weights(w: list[float], b: float, count: float) -> None:
        with torch.no_grad():
            net.weight.copy_(torch.tensor([w]))
            net.bias.fill_(b)
            net.count.fill_(count)

    set_weights([5.0, -2.0], 7.0, 6.0)
    ema.update(0)  # before --ema_start: the average is the weights
    assert ema.weights['weight'].tolist() == [[5.0, -2.0]]
    set_weights([9.0, 2.0], 1.0, 7.0)
    ema.update(1)  # 0.75 * 5 + 0.25 * 9 = 6, 0.75 * -2 + 0.25 * 2 = -1
    assert ema.weights['weight'].tolist() == [[6.0, -1.0]]
    assert ema.weights['bias'].tolist() == [1.0] and ema.weights['count'].tolist() == [7.0]  # copied
    set_weights([2.0, 3.0], 1.0, 7.0)
    ema.update(2)  # 0.75 * 6 + 0.25 * 2 = 5, 0.75 * -1 + 0.25 * 3 = 0
    assert ema.weights['weight'].tolist() == [[5.0, 0.0]]
    with ema.applied():
        assert net.weight.tolist() == [[5.0, 0.0]]
    assert net.weight.tolist() == [[2.0, 3.0]]  # the raw weights back, exactly


@pytest.fixture(scope='module')
def ema_runs(world: dict) -> dict:
    """Uninterrupted single-process runs of 3 epochs with --ema_decay 0.5 (pt and bare_pt files) and without."""
    runs = {}
    for name, extra in (('ema', ['--ema_decay', '0.5']), ('raw', []),
                        ('ema_bare', ['--ema_decay', '0.5', '--save_format', 'bare_pt'])):
        rc, out, _, _ = faults.run(world, ['--save', name, '--reset', '--epochs', '3', *extra], ddp=False)
        assert rc == 0, out[-3000:]
        runs[name] = world['exp'] / name
    return runs


@pytest.mark.slow
def test_ema_is_evaluated_and_saved(ema_runs: dict, world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ema_runs['ema']
    log = (folder / 'log.txt').read_text()
    assert 'EMA of the weights: decay 0.5; evaluation and the model files use the average' in log
    assert log.count('Evaluation: EMA weights') == 3
    state = _state(folder)
    ema, raw = _net_keys(state['ema']['weights']), _net_keys(state['model'])
    assert state['ema']['decay'] == 0.5 and _max_diff(ema, raw) > 1e-4  # an average, not the weights
    # The training is the run without EMA's (the average never feeds back): same raw weights, bit for bit.
    assert _max_diff(raw, _net_keys(_state(ema_runs['raw'])['model'])) == 0
    for stem in ('model_latest', 'model_best'):  # the model files carry the average as their weights
        assert _max_diff(read_state_dict(folder / 'model' / f'{stem}.pt'), ema) == 0
    bare = torch.load(ema_runs['ema_bare'] / 'model' / 'model_latest.pt', weights_only=True)
    assert 'config' not in bare and _max_diff(bare, ema) == 0
    # results.json holds the average's scores; --pre_train of the model file (no flag) reproduces them.
    assert _main(world, monkeypatch, '--save', 'ema_eval', '--reset', '--test_only', '--pre_train',
                 str(folder / 'model' / 'model_latest.pt')) == 0
    got = json.loads((world['exp'] / 'ema_eval' / 'results.json').read_text())
    want = json.loads((folder / 'results.json').read_text())
    assert [(r['psnr'], r['ssim']) for r in got] == [(r['psnr'], r['ssim']) for r in want]
    raw_psnr = json.loads((ema_runs['raw'] / 'results.json').read_text())[0]['psnr']
    assert want[0]['psnr'] != raw_psnr
    # --load --test_only evaluates the run's average too (on a copy: the other tests compare against the run).
    shutil.copytree(folder, world['exp'] / 'ema_copy')
    assert _main(world, monkeypatch, '--load', 'ema_copy', '--test_only') == 0
    again = json.loads((world['exp'] / 'ema_copy' / 'results.json').read_text())
    assert [(r['psnr'], r['ssim']) for r in again] == [(r['psnr'], r['ssim']) for r in want]


@pytest.mark.slow
def test_ema_resume_after_kill_mid_epoch_is_bit_identical(ema_runs: dict, world: dict) -> None:
    """SIGKILL after the first batch of epoch 2, then --load --resume -1: raw weights, EMA, model files and
    logs equal the uninterrupted run's bit for bit."""
    name = 'ema_killed'
    log = world['exp'] / name / 'log.txt'
    proc = subprocess.Popen(faults.command(world, ['--save', name, '--reset', '--epochs', '3', '--ema_decay', '0.5'],
                                           ddp=False), cwd=ROOT, env=faults.environment(world),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (log.exists() and '[Epoch 2]' in (text := log.read_text()) and '[4/12]' in text.split('[Epoch 2]')[1]):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert _state(world['exp'] / name)['epoch'] == 1  # killed inside epoch 2
    rc, out, _, _ = faults.run(world, ['--load', name, '--resume', '-1', '--epochs', '3', '--ema_decay', '0.5'],
                               ddp=False)
    assert rc == 0, out[-3000:]
    folder = world['exp'] / name
    assert faults.check(folder, ema_runs['ema'], ddp=False) == []  # model_latest (the EMA), logs, losses, PSNR
    got, want = _state(folder), _state(ema_runs['ema'])
    assert _max_diff(got['model'], want['model']) == 0
    assert _max_diff(got['ema']['weights'], want['ema']['weights']) == 0


@pytest.mark.slow
def test_ema_under_torchrun_equals_one_process(ema_runs: dict, world: dict) -> None:
    rc, out, _, _ = faults.run(world, ['--save', 'ema_ddp', '--reset', '--epochs', '3', '--ema_decay', '0.5'],
                               ddp=True)
    assert rc == 0, out[-3000:]
    got, want = _state(world['exp'] / 'ema_ddp'), _state(ema_runs['ema'])
    diff = _max_diff(got['ema']['weights'], want['ema']['weights'])
    print(f'max |EMA 2 processes - EMA 1 process| after 3 epochs x 3 steps: {diff:.3g}')
    assert diff <= 1e-6
    assert _max_diff(read_state_dict(world['exp'] / 'ema_ddp' / 'model' / 'model_latest.pt'),
                     _net_keys(got['ema']['weights'])) == 0


# ---------------------------------------------------------------- --accumulate

ACCUMULATE = ['--batch_size', '16', '--epochs', '1', '--optimizer', 'ADAM']


@pytest.mark.slow
def test_accumulate_equals_one_batch(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of batch 16 with --accumulate 2 and 4 (in one process and in two) against plain batch 16."""
    runs = {}
    for name, extra in (('acc1', []), ('acc2', ['--accumulate', '2']), ('acc4', ['--accumulate', '4'])):
        assert _main(world, monkeypatch, '--save', name, '--reset', *ACCUMULATE, *extra) == 0
        runs[name] = world['exp'] / name
    rc, out, _, _ = faults.run(world, ['--save', 'acc2_ddp', '--reset', *ACCUMULATE, '--accumulate', '2'], ddp=True)
    assert rc == 0, out[-3000:]
    runs['acc2_ddp'] = world['exp'] / 'acc2_ddp'
    ref = read_state_dict(runs['acc1'] / 'model' / 'model_latest.pt')
    ref_curve = _curve(runs['acc1'])
    assert len(ref_curve) == 3  # --print_every 1: one row per optimizer step
    for name in ('acc2', 'acc4', 'acc2_ddp'):
        diff = _max_diff(read_state_dict(runs[name] / 'model' / 'model_latest.pt'), ref)
        print(f'{name}: max |w - w(batch 16)| = {diff:.3g}')
        assert diff <= 1e-5
        curve = _curve(runs[name])  # steps, learning rates and the step's loss as without accumulation
        assert [(r['batch'], r['lr']) for r in curve] == [(r['batch'], r['lr']) for r in ref_curve]
        assert [float(r['L1']) for r in curve] == pytest.approx([float(r['L1']) for r in ref_curve], abs=1e-6)


def test_accumulate_refuses_uneven_micro_batches(world: dict, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(Exception, match=r'--batch_size 10 is not divisible by --accumulate 4'):
        option.parse(['--batch_size', '10', '--accumulate', '4'])
    assert main.main(['--batch_size', '10', '--accumulate', '4']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --batch_size 10 is not divisible by --accumulate 4: each optimizer step needs equal '
                   'micro-batches']
    # Rank 0 of 2 (torchrun's environment): refused before any rendezvous.
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert _main(world, monkeypatch, '--save', 'acc_bad', '--batch_size', '12', '--accumulate', '4') == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --batch_size 12 is not divisible by --accumulate 4 x 2 torchrun processes: each optimizer '
                   'step needs equal micro-batches']
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------- AdamW, Charbonnier

def test_adamw_is_torch_adamw_with_decoupled_weight_decay() -> None:
    args = option.parse(['--optimizer', 'ADAMW', '--lr', '0.01', '--weight_decay', '0.1', '--betas', '0.8', '0.9',
                         '--epsilon', '1e-6'])
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    mine = nn.Parameter(start.clone())
    theirs = nn.Parameter(start.clone())
    adam_l2 = nn.Parameter(start.clone())
    opt = make_optimizer(args, [mine])
    assert type(opt) is torch.optim.AdamW
    ref = torch.optim.AdamW([theirs], lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    l2 = torch.optim.Adam([adam_l2], lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(5, 3) * (step + 1)
        for p, o in ((mine, opt), (theirs, ref), (adam_l2, l2)):
            p.grad = grad.clone()
            o.step()
    assert torch.equal(mine, theirs)
    assert (mine - adam_l2).abs().max() > 1e-4  # decoupled: not Adam's L2 penalty


def test_charbonnier_against_hand_computation() -> None:
    # eps 3: sqrt(4^2 + 9) = 5, sqrt(0 + 9) = 3, sqrt((-4)^2 + 9) = 5; mean 13/3
    sr, hr = torch.tensor([4.0, 1.0, -2.0]), torch.tensor([0.0, 1.0, 2.0])
    assert Charbonnier(3.0)(sr, hr).item() == pytest.approx(13 / 3, rel=1e-7)
    args = option.parse(['--loss', '1*Charbonnier'])
    assert args.charbonnier_eps == 1e-3
    loss = Loss(args)
    assert loss.describe() == '1 * Charbonnier' and loss.columns == ['Charbonnier']
    # eps 1e-3 on differences 0 and 0.002: (1e-3 + sqrt(5) * 1e-3) / 2
    value = loss(torch.tensor([0.5, 0.3]), torch.tensor([0.5, 0.302])).total.item()
    assert value == pytest.approx((1e-3 + 5 ** 0.5 * 1e-3) / 2, rel=1e-5)
    with pytest.raises(Exception, match='--charbonnier_eps'):
        option.parse(['--charbonnier_eps', '0'])


def test_adamw_charbonnier_training_run(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _main(world, monkeypatch, '--save', 'adamw', '--reset', '--epochs', '1', '--optimizer', 'ADAMW',
                 '--weight_decay', '0.01', '--loss', 'Charbonnier', '--charbonnier_eps', '1e-2') == 0
    folder = world['exp'] / 'adamw'
    assert 'Loss: 1 * Charbonnier' in (folder / 'log.txt').read_text()
    assert _state(folder)['optimizer_name'] == 'ADAMW'
    assert (folder / 'loss_Charbonnier.png').is_file()


# ---------------------------------------------------------------- --compile

@pytest.mark.slow
def test_compile_trains_and_evaluates_as_uncompiled(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of 3 steps and an evaluation with --compile against the same run without it: weights and
    scores within float rounding, model files and training state with the plain network's keys; the compiled
    network's output on a test image equals the uncompiled one's within 1e-5."""
    flags = ['--reset', '--epochs', '1', '--hspa_impl', 'fast']
    assert _main(world, monkeypatch, '--save', 'plain', *flags) == 0
    assert _main(world, monkeypatch, '--save', 'compiled', '--compile', *flags) == 0
    plain, compiled = world['exp'] / 'plain', world['exp'] / 'compiled'
    diff = _max_diff(read_state_dict(compiled / 'model' / 'model_latest.pt'),
                     read_state_dict(plain / 'model' / 'model_latest.pt'))
    print(f'--compile: max |w - w(uncompiled)| after 3 steps = {diff:.3g}')
    assert diff <= 1e-5
    assert _state(compiled)['model'].keys() == _state(plain)['model'].keys()
    a, b = (json.loads((f / 'results.json').read_text())[0] for f in (compiled, plain))
    assert a['psnr'] == pytest.approx(b['psnr'], abs=1e-3)

    import nlsr.model as model_pkg

    args = option.parse([*faults.TINY, '--hspa_impl', 'fast', '--pre_train',
                         str(compiled / 'model' / 'model_latest.pt')])
    uncompiled_net = model_pkg.Model(args, log=lambda *_: None).eval()
    compiled_net = model_pkg.Model(argparse.Namespace(**{**vars(args), 'compile': True}), log=lambda *_: None).eval()
    x = torch.rand(1, 3, 12, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (compiled_net(x) - uncompiled_net(x)).abs().max().item()
    print(f'--compile: max |output - output(uncompiled)| = {diff:.3g}')
    assert diff <= 1e-5
