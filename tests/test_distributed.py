"""Distributed training under torchrun (2 CPU processes, gloo) against single-process runs.

The runs use a tiny HSPAN on generated HR folders: Tiny (4 training images) and Set5 (3 test images, so
the two processes evaluate an uneven share: 2 and 1). Every run is a subprocess (`python src/main.py` or
`python -m torch.distributed.run --standalone --nproc_per_node 2 src/main.py`) with OMP_NUM_THREADS=1,
so a single process and a DDP process compute each image's forward alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_blocky_folders
from nlsr import cli, distributed, main, option
from nlsr.errors import UserError
from nlsr.training import seeding

TINY = ['--model', 'HSPAN', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8', '--reduction', '2',
        '--topk', '8', '--res_scale', '0.1', '--rgb_range', '1', '--scale', '2', '--patch_size', '16',
        '--batch_size', '4', '--test_every', '3', '--print_every', '1', '--lr', '1e-3', '--decay', '1-2',
        '--gamma', '0.5', '--n_threads', '0', '--cpu', '--data_train', 'Tiny', '--data_test', 'Set5']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
RESULT_IMAGES = sorted(f'im{i}_x2_{t}.png' for i in range(3) for t in ('SR', 'LR', 'HR'))


@pytest.fixture(scope='module')
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp('ddp')
    write_blocky_folders(base / 'data', (('Tiny', 4, (40, 48)), ('Set5', 3, (24, 28))))
    return {'data': base / 'data', 'exp': base / 'experiment', 'cache': base / 'cache'}


def _run(world: dict, *argv: str, ddp: bool, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, SR_EXPERIMENT_ROOT=str(world['exp']), OMP_NUM_THREADS='1')
    for k in distributed.TORCHRUN_VARS:  # a pytest itself started by torchrun must not leak its rank
        env.pop(k, None)
    cmd = [*(TORCHRUN if ddp else [sys.executable]), str(ROOT / 'src' / 'main.py'), *TINY,
           '--dir_data', str(world['data']), '--dir_cache', str(world['cache']), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f'{" ".join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def _weights(path: Path) -> dict:
    """The state dict of a model file (which also carries the network's configuration)."""
    from nlsr.model.checkpoint import read_state_dict

    return read_state_dict(path)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _results(folder: Path) -> list[dict]:
    return json.loads((folder / 'results.json').read_text())


def _lines(folder: Path, prefix: str) -> list[str]:
    return [ln for ln in (folder / 'log.txt').read_text().splitlines() if ln.startswith(prefix)]


@pytest.fixture(scope='module')
def trained(world: dict) -> dict:
    """The same 2-epoch training (global batch 4, same data order) in one process and in two."""
    _run(world, '--save', 'single', '--epochs', '2', '--save_results', ddp=False)
    _run(world, '--save', 'ddp', '--epochs', '2', '--save_results', '--save_gt', ddp=True)
    return {'single': world['exp'] / 'single', 'ddp': world['exp'] / 'ddp'}


@pytest.mark.slow
def test_multi_scale_network_trains_under_torchrun(world: dict) -> None:
    """MDSR trains one scale's branches per batch; DDP must not wait for the other branches' gradients."""
    env = dict(os.environ, SR_EXPERIMENT_ROOT=str(world['exp']), OMP_NUM_THREADS='1')
    for k in distributed.TORCHRUN_VARS:
        env.pop(k, None)
    cmd = [*TORCHRUN, str(ROOT / 'src' / 'main.py'), '--model', 'MDSR', '--n_resblocks', '1', '--n_feats', '8',
           '--scale', '2+3', '--patch_size', '12', '--batch_size', '2', '--test_every', '4', '--epochs', '1',
           '--n_threads', '0', '--cpu', '--data_train', 'Tiny', '--data_test', 'Set5', '--dir_data',
           str(world['data']), '--dir_cache', str(world['cache']), '--save', 'mdsr_ddp']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {(r['dataset'], r['scale']) for r in _results(world['exp'] / 'mdsr_ddp')} == {('Set5', 2), ('Set5', 3)}


@pytest.mark.slow
def test_ddp_training_equals_single_process(trained: dict, world: dict) -> None:
    single, ddp = trained['single'], trained['ddp']
    diff = _max_diff(_weights(ddp / 'model' / 'model_latest.pt'), _weights(single / 'model' / 'model_latest.pt'))
    print(f'max |w_ddp - w_single| after 2 epochs x 3 steps: {diff:.3g}')
    assert diff <= 1e-5
    # The logged losses are the global batch's (averaged over the processes), as in one process.
    torch.testing.assert_close(torch.load(ddp / 'loss_log.pt'), torch.load(single / 'loss_log.pt'),
                               rtol=0, atol=1e-6)
    for a, b in zip(_results(ddp), _results(single), strict=True):
        assert (a['dataset'], a['scale'], a['images'], a['epoch']) == (b['dataset'], b['scale'], 3, 2)
        assert a['psnr'] == pytest.approx(b['psnr'], abs=1e-3) and a['ssim'] == pytest.approx(b['ssim'], abs=1e-4)

    # Evaluation alone, same weights: 2 processes (uneven shares) give exactly the single-process numbers
    # and rank 0 writes every image, identical to the single process's.
    _run(world, '--save', 'eval_ddp', '--test_only', '--save_results',
         '--pre_train', str(single / 'model' / 'model_latest.pt'), ddp=True)
    evaluated = world['exp'] / 'eval_ddp'
    mine, ref = _results(evaluated), _results(single)
    assert [(r['psnr'], r['ssim'], r['images']) for r in mine] == [(r['psnr'], r['ssim'], r['images']) for r in ref]
    import imageio.v3 as iio

    names = sorted(p.name for p in (evaluated / 'results-Set5').iterdir())
    assert names == [f'im{i}_x2_SR.png' for i in range(3)]
    for name in names:
        assert np.array_equal(iio.imread(evaluated / 'results-Set5' / name), iio.imread(single / 'results-Set5' / name))


@pytest.mark.slow
def test_torchrun_logs_each_evaluation_once(trained: dict) -> None:
    ddp = trained['ddp']
    assert len(_lines(ddp, '[Set5 x2]')) == 2  # one per epoch
    assert [ln.split('\t')[0] for ln in _lines(ddp, '[Epoch')] == ['[Epoch 1]', '[Epoch 2]']
    assert len(_lines(ddp, 'Experiment folder:')) == 1
    assert _lines(ddp, 'Distributed: 2 processes (gloo); global batch 4 = 2 per process')
    assert (ddp / 'config.txt').read_text().count('\n# ') + 1 == 1  # one config block
    assert sorted(p.name for p in (ddp / 'model').iterdir()) == ['model_best.pt', 'model_latest.pt']
    assert sorted(p.name for p in (ddp / 'results-Set5').iterdir()) == RESULT_IMAGES
    assert not list(ddp.rglob('*.tmp'))
    results = _results(ddp)
    assert len(results) == 1 and results[0]['images'] == 3 and results[0]['epoch'] == 2
    assert torch.load(ddp / 'psnr_log.pt').shape == (2, 1, 1)
    state = torch.load(ddp / 'training_state.pt', map_location='cpu', weights_only=True)
    assert state['epoch'] == 2 and not [k for k in state['model'] if k.startswith('module.')]


@pytest.mark.slow
def test_killed_ddp_run_resumes_at_same_epoch_and_lr(trained: dict, world: dict) -> None:
    _run(world, '--save', 'part', '--epochs', '1', ddp=True)
    part = world['exp'] / 'part'
    with open(part / 'log.txt', 'a') as f:  # what a run killed early in epoch 2 leaves behind
        f.write('[Epoch 2]\tLearning rate: 5.00e-04\n[4/12]\t[L1: 0.1234]\t0.0+0.0s\n')
    _run(world, '--load', 'part', '--resume', '-1', '--epochs', '2', ddp=True)

    assert _lines(part, 'Resumed') == ['Resumed at epoch 1 (learning rate 5.00e-04)']
    assert _lines(part, '[Epoch') == ['[Epoch 1]\tLearning rate: 1.00e-03', '[Epoch 2]\tLearning rate: 5.00e-04']
    assert '[L1: 0.1234]' in (part / 'log_discarded.txt').read_text()
    assert _lines(part, '[Set5 x2]') == _lines(trained['ddp'], '[Set5 x2]')
    full = trained['ddp']
    diff = _max_diff(_weights(part / 'model' / 'model_latest.pt'), _weights(full / 'model' / 'model_latest.pt'))
    print(f'max |w_resumed - w_uninterrupted| (2 processes): {diff:.3g}')
    assert diff <= 1e-6
    state = torch.load(part / 'training_state.pt', map_location='cpu', weights_only=True)
    assert state['epoch'] == 2
    assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(2.5e-4)  # milestone 2 passed


@pytest.mark.slow
def test_ddp_checkpoint_loads_in_single_process(trained: dict, world: dict) -> None:
    ddp = trained['ddp']
    _run(world, '--save', 'from_ddp', '--test_only', '--pre_train', str(ddp / 'model' / 'model_latest.pt'),
         ddp=False)
    got, ref = _results(world['exp'] / 'from_ddp'), _results(ddp)
    assert [(r['psnr'], r['ssim'], r['images']) for r in got] == [(r['psnr'], r['ssim'], r['images']) for r in ref]


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_training_step_on_cpu(amp: str, world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import nlsr.model as model_pkg

    seen: list[torch.dtype] = []
    forward = model_pkg.Model.forward

    def spy(self: model_pkg.Model, lr: torch.Tensor, idx_scale: int = 0, seed: int | None = None) -> torch.Tensor:
        out = forward(self, lr, idx_scale, seed)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(model_pkg.Model, 'forward', spy)
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    for k in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    argv = [*TINY, '--dir_data', str(world['data']), '--dir_cache', str(world['cache']), '--save', f'amp_{amp}',
            '--epochs', '1', '--test_every', '2', '--amp', amp]
    assert main.main(argv) == 0
    folder = world['exp'] / f'amp_{amp}'
    assert seen == [{'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]] * 2
    losses = torch.load(folder / 'loss_log.pt')
    assert losses.shape == (1, 1) and torch.isfinite(losses).all() and losses.item() > 0
    assert _lines(folder, 'Mixed precision:')
    state = torch.load(folder / 'training_state.pt', map_location='cpu', weights_only=True)
    assert bool(state['scaler']) == (amp == 'fp16')  # the GradScaler's state rides in the checkpoint
    assert all(torch.isfinite(v).all() for v in _weights(folder / 'model' / 'model_latest.pt').values())


@pytest.mark.parametrize(('flags', 'expect'), [
    (['--batch_size', '3'], '--batch_size 3 is the global batch: it must be divisible by the 2 torchrun'),
    (['--n_GPUs', '2'], '--n_GPUs 2 is DataParallel inside one process and cannot be combined with torchrun'),
])
def test_torchrun_refuses_bad_flags_before_joining(flags: list[str], expect: str, world: dict,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The environment torchrun gives rank 0 of 2: the check runs before any rendezvous, so no peer is needed.
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '0')
    argv = [*TINY, '--dir_data', str(world['data']), '--save', 'refused', *flags]
    assert main.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {expect}')
    assert not torch.distributed.is_initialized()
    # Rank 1 fails alike but stays silent: the job reports the error once.
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setattr(cli, 'RANK_ZERO_GRACE', 0.0)
    assert main.main(argv) == 1
    assert capsys.readouterr().err == ''


def test_torchrun_env_and_help() -> None:
    assert distributed.torchrun_env({}) is None
    assert distributed.torchrun_env({'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1'}) == distributed.DistEnv(3, 8, 1)
    with pytest.raises(UserError):
        distributed.torchrun_env({'RANK': '2', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0'})
    assert seeding.rank_seed(7, 0) == 7 and seeding.rank_seed(7, 1) != 7
    assert 'global batch size' in ' '.join(option.build_parser().format_help().split())


def test_shard_sampler_balances_test_images_by_size() -> None:
    from nlsr.data import ShardSampler

    set5 = [256 * 256, 144 * 144, 128 * 128, 140 * 140, 114 * 114]  # LR pixels of Set5 x2
    shards = [ShardSampler(5, r, 2, set5).indices for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(5))  # each image exactly once
    assert shards == [[0], [1, 2, 3, 4]]  # the large image alone: loads 65,536 vs 69,732 pixels
    # Round robin (i mod N) without costs; every image once for any process count.
    assert [ShardSampler(5, r, 2).indices for r in range(2)] == [[0, 2, 4], [1, 3]]
    costs = list(np.random.default_rng(0).integers(1, 1000, 23))
    for n in (1, 3, 4):
        parts = [ShardSampler(23, r, n, costs).indices for r in range(n)]
        assert sorted(i for p in parts for i in p) == list(range(23))
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(costs)  # LPT: within one image of balanced


def test_test_sets_know_their_image_sizes(world: dict) -> None:
    from nlsr.data import make_dataset

    args = option.parse([*TINY, '--dir_data', str(world['data']), '--dir_cache', str(world['cache'])])
    ds = make_dataset('Set5', args, train=False, log=lambda _: None)
    assert ds.hr_sizes == [(24, 28)] * 3
