"""Runs of a tiny HSPAN (3 epochs of 3 batches, CPU) as subprocesses, in one process or in two under
`torchrun --max-restarts 2`, that can be killed (SIGKILL at a moment, or inside a checkpoint write through
SR_FAULT=<file>:<step>:kill, see src/nlsr/fileio.py) and resumed, and the check of a finished run's folder against
an uninterrupted run. Used by tests/training/ and by benchmarks/faults.py (kills at random moments)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT, write_blocky_folders

EPOCHS = 3
TINY = ['--model', 'HSPAN', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8', '--reduction', '2',
        '--topk', '8', '--res_scale', '0.1', '--rgb_range', '1', '--scale', '2', '--patch_size', '16',
        '--batch_size', '4', '--test_every', '3', '--print_every', '1', '--lr', '1e-3', '--decay', '1-2',
        '--gamma', '0.5', '--n_threads', '0', '--cpu', '--data_train', 'Tiny', '--data_test', 'Set5',
        '--dist_timeout', '60']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
            '--max-restarts', '2']
# The files an epoch's evaluation and checkpoint write, in order (the training state last).
CHECKPOINT_FILES = ('results.json', 'model_latest.pt', 'loss_log.pt', 'loss_L1.png', 'psnr_log.pt', 'psnr_Set5.png',
                    'training_state.pt')
STEPS = ('open', 'written', 'renamed')
TIMEOUT = 300


def make_world(base: Path) -> dict:
    """Tiny data sets under `base` (4 training images, 3 test images) and an experiment root."""
    if not (base / 'data').exists():
        write_blocky_folders(base / 'data', (('Tiny', 4, (40, 48)), ('Set5', 3, (24, 28))))
    return {'data': base / 'data', 'exp': base / 'experiment', 'cache': base / 'cache'}


def command(world: dict, argv: list[str], ddp: bool) -> list[str]:
    return [*(TORCHRUN if ddp else [sys.executable]), str(ROOT / 'src' / 'main.py'), *TINY,
            '--dir_data', str(world['data']), '--dir_cache', str(world['cache']), *argv]


def environment(world: dict, fault: str = '') -> dict:
    env = dict(os.environ, SR_EXPERIMENT_ROOT=str(world['exp']), OMP_NUM_THREADS='1', SR_FAULT=fault)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'TORCHELASTIC_RESTART_COUNT'):
        env.pop(k, None)
    return env


def children(pid: int) -> list[int]:
    """The process ids whose parent is `pid` (Linux /proc)."""
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                stat = Path(f'/proc/{d}/stat').read_text()
            except OSError:
                continue
            if int(stat.rsplit(')', 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def run(world: dict, argv: list[str], ddp: bool, fault: str = '', kill_after: float | None = None,
        rng: random.Random | None = None) -> tuple[int, str, str, float]:
    """Run main.py to the end; with kill_after, SIGKILL it (torchrun: one random worker) that many seconds
    after its first epoch began. Returns (exit status, output, where the kill hit from the log: '' when the
    run ended first, seconds from the start of epoch 1 to the end)."""
    name = argv[argv.index('--save') + 1] if '--save' in argv else argv[argv.index('--load') + 1]
    log = world['exp'] / name / 'log.txt'
    proc = subprocess.Popen(command(world, argv, ddp), cwd=ROOT, env=environment(world, fault),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_box: list[str] = []
    reader = threading.Thread(target=lambda: out_box.append(proc.stdout.read()), daemon=True)
    reader.start()
    killed, started = '', None
    t0 = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t0 < TIMEOUT:
        if started is None and log.exists() and '[Epoch 1]' in log.read_text(errors='replace'):
            started = time.perf_counter()
        if kill_after is not None and started is not None and time.perf_counter() - started >= kill_after:
            targets = children(proc.pid) if ddp else [proc.pid]
            if targets:
                os.kill((rng or random).choice(targets), signal.SIGKILL)
                killed = log_point(world['exp'] / name)
            kill_after = None
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        reader.join()
        return -1, ''.join(out_box) + '\nHUNG: killed after the timeout', killed, 0.0
    reader.join()
    return proc.returncode, ''.join(out_box), killed, time.perf_counter() - (started or t0)


def log_point(folder: Path) -> str:
    """Where a run was, from its log: 'epoch E train' / 'epoch E eval' ('start' before the first epoch)."""
    path = folder / 'log.txt'
    lines = path.read_text(errors='replace').splitlines() if path.exists() else []
    epoch, phase = 0, 'start'
    for ln in lines:
        if ln.startswith('[Epoch '):
            epoch, phase = int(ln.split(']')[0][7:]), 'train'
        elif ln.startswith('Evaluation:'):
            phase = 'eval'
    return 'start' if epoch == 0 else f'epoch {epoch} {phase}'


def recover(world: dict, name: str, ddp: bool) -> tuple[int, str]:
    """Continue a killed run: --load --resume -1 from its training state, or --reset when it has none."""
    folder = world['exp'] / name
    if (folder / 'training_state.pt').exists():
        argv = ['--load', name, '--resume', '-1', '--epochs', str(EPOCHS)]
    else:
        argv = ['--save', name, '--reset', '--epochs', str(EPOCHS)]
    rc, out, _, _ = run(world, argv, ddp)
    return rc, out


def _weights(path: Path) -> dict:
    from nlsr.model.checkpoint import read_state_dict

    return read_state_dict(path)


def _train_lines(folder: Path) -> list[str]:
    """The log lines of the epochs, evaluations and training batches (timings dropped)."""
    keep = []
    for ln in (folder / 'log.txt').read_text().splitlines():
        if ln.startswith(('[Epoch', '[Set5')) or (ln.startswith('[') and '/12]' in ln):
            keep.append(ln.rsplit('\t', 1)[0] if '/12]' in ln else ln)
    return keep


def check(folder: Path, reference: Path, ddp: bool) -> list[str]:
    """What differs from the uninterrupted run in `reference` (an empty list when nothing does)."""
    import imageio.v3 as iio
    import torch

    problems = []
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        try:
            if path.name.endswith('.tmp'):
                problems.append(f'temporary file left: {path.name}')
            elif path.suffix == '.pt':
                torch.load(path, map_location='cpu', weights_only=True)
            elif path.suffix == '.json':
                json.loads(path.read_text())
            elif path.suffix == '.png':
                iio.imread(path)
            elif path.suffix == '.txt':
                path.read_text(encoding='utf-8')
        except Exception as e:  # noqa: BLE001 (any failure to read is the finding)
            problems.append(f'unreadable {path.name}: {type(e).__name__}: {e}')
    try:
        got, ref = _weights(folder / 'model' / 'model_latest.pt'), _weights(reference / 'model' / 'model_latest.pt')
        diff = max((got[k].double() - ref[k].double()).abs().max().item() for k in ref)
        if diff > (1e-6 if ddp else 0.0):
            problems.append(f'final weights differ by {diff:.3g}')
        state = torch.load(folder / 'training_state.pt', map_location='cpu', weights_only=True)
        if state['epoch'] != EPOCHS:
            problems.append(f'training state at epoch {state["epoch"]}')
        tol = 1e-6 if ddp else 0.0
        for log in ('loss_log.pt', 'psnr_log.pt'):
            a, b = torch.load(folder / log), torch.load(reference / log)
            if a.shape != b.shape or (a.double() - b.double()).abs().max().item() > max(tol, 1e-4 if 'psnr' in log
                                                                                        and ddp else tol):
                problems.append(f'{log} is not the uninterrupted run\'s ({tuple(a.shape)} vs {tuple(b.shape)})')
        lines, ref_lines = _train_lines(folder), _train_lines(reference)
        epochs = [ln.split(']')[0] for ln in lines if ln.startswith('[Epoch')]
        if epochs != [f'[Epoch {e}' for e in range(1, EPOCHS + 1)]:
            problems.append(f'epoch lines {epochs}')
        if not ddp and lines != ref_lines:
            problems.append('log lines differ from the uninterrupted run (duplicated or missing)')
        if ddp and len(lines) != len(ref_lines):
            problems.append(f'{len(lines)} epoch/batch/evaluation log lines, uninterrupted: {len(ref_lines)}')
    except Exception as e:  # noqa: BLE001
        problems.append(f'{type(e).__name__}: {e}')
    return problems


def reference_run(world: dict, ddp: bool) -> tuple[Path, float]:
    """The uninterrupted run of one mode, and how long it trained (from the start of epoch 1)."""
    name = 'reference_ddp' if ddp else 'reference'
    rc, out, _, duration = run(world, ['--save', name, '--reset', '--epochs', str(EPOCHS)], ddp)
    if rc != 0:
        raise SystemExit(f'the uninterrupted run failed:\n{out[-3000:]}')
    return world['exp'] / name, duration
