"""Atomic writes give the mode a plain open() gives: a new file 0666 less the umask, a replaced file its
previous mode; for single files, and for everything a run, its image cache and upscale write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SRC, write_blocky_folders

SCRIPT = f'''
import os, sys
sys.path.insert(0, {str(SRC)!r})
from nlsr.fileio import atomic_write_text
atomic_write_text(sys.argv[1], 'new')
atomic_write_text(sys.argv[2], 'replaced')
'''


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path: Path, umask: int) -> None:
    kept = tmp_path / 'kept.txt'
    kept.write_text('old')
    kept.chmod(0o640)
    subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path / 'new.txt'), str(kept)], check=True,
                   preexec_fn=lambda: os.umask(umask))
    assert _mode(tmp_path / 'new.txt') == 0o666 & ~umask
    assert _mode(kept) == 0o640 and kept.read_text() == 'replaced'
    assert not list(tmp_path.glob('.*.tmp'))


@pytest.mark.slow
@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_a_run_its_cache_and_upscale_write_what_the_umask_gives(tmp_path: Path, umask: int) -> None:
    write_blocky_folders(tmp_path / 'data', (('Tiny', 2, (32, 32)), ('Mini', 1, (24, 24))))
    env = {**os.environ, 'SR_EXPERIMENT_ROOT': str(tmp_path / 'exp'), 'PYTHONPATH': str(SRC)}
    run = [sys.executable, str(SRC / 'main.py'), '--cpu', '--model', 'EDSR', '--n_resblocks', '1', '--n_feats', '8',
           '--scale', '2', '--patch_size', '16', '--batch_size', '2', '--epochs', '1', '--test_every', '2',
           '--data_train', 'Tiny', '--data_test', 'Mini', '--dir_data', str(tmp_path / 'data'), '--n_threads', '0',
           '--save', 'run', '--save_results', '--save_gt']
    subprocess.run(run, check=True, env=env, capture_output=True, preexec_fn=lambda: os.umask(umask))
    model_file = tmp_path / 'exp' / 'run' / 'model' / 'model_latest.pt'
    subprocess.run([sys.executable, '-m', 'nlsr.tools.upscale', '--pre_train', str(model_file), '--cpu',
                    str(tmp_path / 'data' / 'Mini'), '--out', str(tmp_path / 'up')],
                   check=True, env=env, capture_output=True, preexec_fn=lambda: os.umask(umask), cwd=ROOT)
    written = [*(tmp_path / 'exp' / 'run').rglob('*'), *(tmp_path / 'data').rglob('*.npy'),
               *(tmp_path / 'up').glob('*')]
    files = [p for p in written if p.is_file() and p.suffix != '.lock']
    kinds = {p.suffix for p in files}
    assert {'.pt', '.png', '.txt', '.json', '.npy'} <= kinds, kinds
    wrong = [f'{p.relative_to(tmp_path)} {oct(_mode(p))}' for p in files if _mode(p) != 0o666 & ~umask]
    assert not wrong, wrong
