"""Data errors (missing sets, size mismatches, unreadable images, in workers too) and the decode cache (fresh,
stale, truncated, damaged while running, read-only data sets), on tiny generated images."""

from __future__ import annotations

import logging
import os

import imageio.v3 as iio
import numpy as np
import pytest

from dataset_files import batches, edsr_set, make_args, quiet, rand_image, write
from nlsr import data
from nlsr.errors import UserError

# --- errors ---------------------------------------------------------------------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert '\n' not in msg and 'Traceback' not in msg
    return msg


def test_missing_dataset_names_every_path(tmp_path):
    args = make_args(tmp_path, '--data_test', 'Urban100', '--test_only')
    with pytest.raises(UserError) as exc:
        data.Data(args, log=quiet)
    msg = one_line(exc)
    for p in ('SrBenchmark/Urban100', 'benchmark/Urban100', f'{tmp_path}/Urban100', 'LR_bicubic', 'GTmod12'):
        assert p in msg
    args = make_args(tmp_path, '--data_train', 'DIV2K')
    with pytest.raises(UserError) as exc:
        data.Data(args, log=quiet)
    assert 'DIV2K_train_HR' in one_line(exc) and '--data_train DIV2K' in str(exc.value)


def test_lr_size_mismatch(tmp_path):
    base = edsr_set(tmp_path, n=1, size=(40, 36))
    bad = base / 'LR_bicubic' / 'X2' / 'img_0x2.png'
    write(bad, rand_image(19, 18))
    with pytest.raises(UserError) as exc:
        data.make_dataset('Set5', make_args(tmp_path, '--test_only'), train=False, log=quiet)
    msg = one_line(exc)
    assert str(bad) in msg and str(base / 'HR' / 'img_0.png') in msg and '18x19' in msg and '36x40' in msg


def test_unreadable_image(tmp_path):
    base = edsr_set(tmp_path, n=2, lr=False)
    (base / 'HR' / 'img_1.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    with pytest.raises(UserError) as exc:
        data.make_dataset('Set5', make_args(tmp_path, '--test_only'), train=False, log=quiet)
    assert str(base / 'HR' / 'img_1.png') in one_line(exc)


def test_corrupt_pixels_in_a_worker_are_one_line(tmp_path):
    base = edsr_set(tmp_path, n=1)
    hr = base / 'HR' / 'img_0.png'
    hr.write_bytes(hr.read_bytes()[:200])  # header intact, pixel data cut
    args = make_args(tmp_path, '--test_only', '--ext', 'img', '--n_threads', '2')
    d = data.Data(args, log=quiet)
    loader = d.loader_test[0]
    if (os.cpu_count() or 1) > 1:
        assert loader.num_workers > 0
    with pytest.raises(UserError) as exc:
        batches(loader)
    assert str(hr) in one_line(exc)


# --- cache ----------------------------------------------------------------------------------------------

def test_sep_cache_layout_fresh_stale_truncated_reset(tmp_path, caplog):
    base = edsr_set(tmp_path, n=2, scales=(2,))
    args = make_args(tmp_path, '--data_train', 'Set5', '--ext', 'sep', '--scale', '2+3')
    logs: list[str] = []
    ds = data.make_dataset('Set5', args, train=True, log=logs.append)
    hr_cache = base / 'bin' / 'HR' / 'img_0.npy'
    lr_cache = base / 'bin' / 'LR_bicubic' / 'X2' / 'img_0x2.npy'
    made = base / 'bin' / 'LR_bicubic_made' / 'X3' / 'img_0x3.npy'
    for p in (hr_cache, lr_cache, made):
        assert p.is_file()
    assert isinstance(ds._hr(0), np.memmap)
    assert np.array_equal(np.load(hr_cache), iio.imread(base / 'HR' / 'img_0.png'))
    assert not list(base.glob('bin/**/*.tmp')) and len(logs) == 1

    logs.clear()
    data.make_dataset('Set5', args, train=True, log=logs.append)
    assert logs == []  # everything fresh: nothing rewritten

    hr_cache.write_bytes(hr_cache.read_bytes()[:100])  # truncated (a killed non-atomic writer)
    src = base / 'LR_bicubic' / 'X2' / 'img_0x2.png'
    later = lr_cache.stat().st_mtime + 10
    os.utime(src, (later, later))  # source newer than its cache
    with caplog.at_level(logging.WARNING):
        ds = data.make_dataset('Set5', args, train=True, log=quiet)
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(hr_cache) in m and 'unreadable' in m for m in warned)
    assert any(str(lr_cache) in m and 'older than' in m for m in warned)
    assert all('\n' not in m for m in warned)
    assert np.array_equal(ds._hr(0), iio.imread(base / 'HR' / 'img_0.png'))

    inode = made.stat().st_ino
    data.make_dataset('Set5', args.replace(ext='sep_reset'), train=True, log=quiet)
    assert made.stat().st_ino != inode  # rewritten (atomic rename gives a new file)


def test_cache_damaged_while_running_is_rebuilt(tmp_path, caplog):
    base = edsr_set(tmp_path, n=1, size=(30, 30))
    args = make_args(tmp_path, '--test_only', '--data_test', 'Set5', '--scale', '3')
    ds = data.make_dataset('Set5', args, train=False, log=quiet)
    made = base / 'bin' / 'LR_bicubic_made' / 'X3' / 'img_0x3.npy'
    good = np.load(made)
    made.write_bytes(b'\x93NUMPY garbage')
    with caplog.at_level(logging.WARNING):
        lr, _, _ = ds[0]
    assert np.array_equal(lr.permute(1, 2, 0).numpy(), good)
    assert any('rebuilding' in r.getMessage() for r in caplog.records)
    assert np.array_equal(np.load(made), good)


def test_img_mode_caches_only_made_lr(tmp_path):
    base = edsr_set(tmp_path, n=1, scales=(2,))
    args = make_args(tmp_path, '--data_train', 'Set5', '--ext', 'img', '--scale', '2+4')
    data.make_dataset('Set5', args, train=True, log=quiet)
    files = sorted(p.relative_to(base / 'bin').as_posix() for p in (base / 'bin').rglob('*.npy'))
    assert files == ['LR_bicubic_made/X4/img_0x4.npy']


def test_too_small_images_are_skipped(tmp_path):
    write(tmp_path / 'Mixed' / 'big.png', rand_image(30, 30))
    write(tmp_path / 'Mixed' / 'small.png', rand_image(20, 30))
    args = make_args(tmp_path, '--data_train', 'Mixed')
    logs: list[str] = []
    ds = data.make_dataset('Mixed', args, train=True, log=logs.append)
    assert [p.name for p in ds.hr_files] == ['big.png']
    assert any('skipped 1 of 2 images smaller than --patch_size 24' in line and 'small.png (30x20)' in line
               for line in logs)
    write(tmp_path / 'Small' / 'small.png', rand_image(20, 30))
    with pytest.raises(UserError, match='--patch_size 24'):
        data.make_dataset('Small', make_args(tmp_path, '--data_train', 'Small'), train=True, log=quiet)


def test_read_only_dataset_caches_in_user_cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / 'data' / 'RO'
    write(folder / 'a.png', rand_image(30, 30))
    folder.chmod(0o555)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    try:
        logs: list[str] = []
        ds = data.make_dataset('RO', make_args(tmp_path / 'data', '--data_train', 'RO'), train=True, log=logs.append)
        assert not (folder / 'bin').exists()
        assert ds.bin_dir.parent == tmp_path / 'xdg' / 'sr-data-cache' and 'read-only' in logs[0]
        assert list(ds.bin_dir.glob('LR_bicubic_made/X2/ax2.npy'))
    finally:
        folder.chmod(0o755)
