"""Datasets, layouts, cache, loaders and data errors (tiny generated images; ../shared where noted)."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import data
import option
from conftest import shared_path
from errors import UserError
from imageops import color
from imageops.imresize import imresize


def quiet(_msg: str) -> None:
    pass


def make_args(dir_data: Path | str, *extra: str, dir_cache: Path | None = None):
    argv = ['--dir_data', str(dir_data), '--n_threads', '0', '--cpu', '--batch_size', '4', '--test_every', '3',
            '--patch_size', '24', '--scale', '2', '--seed', '1', '--data_test', 'Set5', *extra]
    args = option.parse(argv)
    if dir_cache is not None:
        args.dir_cache = str(dir_cache)
    return args


def rand_image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)
    return img[..., 0] if c == 1 else img


def write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, img)
    return path


def edsr_set(root: Path, name: str = 'Set5', n: int = 3, scales=(2,), size=(40, 36), lr=True) -> Path:
    """<root>/<name>/HR/img_k.png (+ LR_bicubic/X{s}/img_kx{s}.png made with imresize)."""
    base = root / name
    for k in range(n):
        hr = rand_image(*size, seed=k)
        write(base / 'HR' / f'img_{k}.png', hr)
        for s in scales if lr else ():
            h, w = size[0] // s, size[1] // s
            write(base / 'LR_bicubic' / f'X{s}' / f'img_{k}x{s}.png', imresize(hr[:h * s, :w * s], 1 / s))
    return base


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    h, w, c = arr.shape
    raw = b''.join(b'\x00' + arr[y].astype('>u2').tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body) & 0xffffffff)

    color = {1: 0, 3: 2, 4: 6}[c]
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def batches(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 >= n:
            break
    return out


# --- training sets ------------------------------------------------------------------------------------

def test_hr_folder_training_set_t91(tmp_path):
    train = shared_path('data', 'train')
    args = make_args(train, '--data_train', 'T91', '--patch_size', '48', dir_cache=tmp_path)
    ds = data.make_dataset('T91', args, train=True, log=quiet)
    assert ds.root == train / 'T91' and len(ds.hr_files) == 91  # all at least 78x78
    lr, hr, si = ds[(0, 0, 123)]
    assert lr.shape == (3, 24, 24) and hr.shape == (3, 48, 48) and si == 0
    assert lr.dtype == torch.float32 and 0 <= float(lr.min()) and float(hr.max()) <= 255
    made = list((tmp_path).glob('T91-*/LR_bicubic_made/X2/*.npy'))
    assert len(made) == len(ds.hr_files)
    assert not list(train.glob('T91/bin'))  # nothing written into the shared folder


def test_patches_are_aligned_and_seeded(tmp_path):
    write(tmp_path / 'Noise' / 'a.png', rand_image(60, 50, seed=3))
    args = make_args(tmp_path, '--data_train', 'Noise', '--no_augment', '--scale', '3', '--patch_size', '12')
    ds = data.make_dataset('Noise', args, train=True, log=quiet)
    hr_full = iio.imread(tmp_path / 'Noise' / 'a.png')
    lr_full = imresize(hr_full[:60, :48], 1 / 3)
    assert np.array_equal(np.load(tmp_path / 'Noise' / 'bin' / 'LR_bicubic_made' / 'X3' / 'ax3.npy'), lr_full)
    lr, hr, _ = ds[(0, 0, 7)]
    lr_np = lr.permute(1, 2, 0).numpy().astype(np.uint8)
    hits = [(y, x) for y in range(lr_full.shape[0] - 3) for x in range(lr_full.shape[1] - 3)
            if np.array_equal(lr_full[y:y + 4, x:x + 4], lr_np)]
    assert len(hits) == 1
    y, x = hits[0]
    assert np.array_equal(hr.permute(1, 2, 0).numpy().astype(np.uint8), hr_full[3 * y:3 * y + 12, 3 * x:3 * x + 12])
    assert torch.equal(ds[(0, 0, 7)][0], lr)  # same seed, same patch
    assert not torch.equal(ds[(0, 0, 8)][0], lr)


def test_multiscale_per_batch_and_epoch_length(tmp_path):
    for k in range(3):
        write(tmp_path / 'Tiny' / f'{k}.png', rand_image(50, 52, seed=k))
    args = make_args(tmp_path, '--data_train', 'Tiny', '--scale', '2+3+4', '--test_every', '12',
                     '--data_test', 'Tiny')
    d = data.Data(args, log=quiet)
    assert len(d.loader_train) == 12
    seen = set()
    for lr, hr, idx in d.loader_train:
        assert idx.dtype == torch.int64 and idx.shape == (4,) and len(set(idx.tolist())) == 1
        s = args.scale[int(idx[0])]
        seen.add(s)
        assert hr.shape == (4, 3, 24, 24) and lr.shape == (4, 3, 24 // s, 24 // s)
    assert seen == {2, 3, 4}
    assert sum(1 for _ in d.loader_train) == 12  # a second epoch has the same length
    test = d.loader_test[0].dataset
    assert test.name == 'Tiny' and test.scales == [2, 3, 4] and test.has_gt
    test.set_scale(2)
    lr, hr, name = next(iter(d.loader_test[0]))
    assert lr.shape == (1, 3, 12, 13) and hr.shape == (1, 3, 48, 52) and name == ('0',)


def test_workers_give_the_same_batches(tmp_path):
    for k in range(2):
        write(tmp_path / 'Tiny' / f'{k}.png', rand_image(40, 40, seed=k))
    args = make_args(tmp_path, '--data_train', 'Tiny', '--data_test', 'Tiny')
    ref = batches(data.Data(args, log=quiet).loader_train)
    first = ref[0][1]
    assert not any(torch.equal(first[0], first[j]) for j in range(1, 4))  # patches differ within a batch
    args.n_threads = 18
    d = data.Data(args, log=quiet)
    assert d.loader_train.num_workers == min(18, os.cpu_count() or 1)
    if d.loader_train.num_workers == 0:
        pytest.skip('one CPU: no worker processes to compare')
    got = batches(d.loader_train)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got, strict=True))


def test_spawn_workers(tmp_path):
    for k in range(2):
        write(tmp_path / 'Tiny' / f'{k}.png', rand_image(40, 40, seed=k))
    args = make_args(tmp_path, '--data_train', 'Tiny', '--data_test', 'Tiny', '--ext', 'sep')
    ref = batches(data.Data(args, log=quiet).loader_train, 2)
    args.n_threads = 1  # one spawned worker: each one re-imports torch (seconds on a busy machine)
    d = data.Data(args, log=quiet)
    d.loader_train.multiprocessing_context = 'spawn'  # workers re-import everything: no parse-at-import
    d.loader_train.batch_sampler.set_epoch(0)
    got = batches(d.loader_train, 2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(ref, got, strict=True))


def test_distributed_split(tmp_path):
    for k in range(5):
        write(tmp_path / 'Tiny' / f'{k}.png', rand_image(30, 30, seed=k))
    args = make_args(tmp_path, '--data_train', 'Tiny', '--data_test', 'Tiny')
    whole = list(data.Data(args, log=quiet).loader_train.batch_sampler)
    parts = [list(data.Data(args, rank=r, world_size=2, log=quiet).loader_train.batch_sampler) for r in (0, 1)]
    assert [a + b for a, b in zip(*parts, strict=True)] == whole
    tests = [list(data.Data(args, rank=r, world_size=2, log=quiet).loader_test[0].sampler) for r in (0, 1)]
    assert sorted(tests[0] + tests[1]) == list(range(5)) and not set(tests[0]) & set(tests[1])
    with pytest.raises(UserError, match='--batch_size 4'):
        data.Data(args, rank=0, world_size=3, log=quiet)


# --- layouts --------------------------------------------------------------------------------------------

def test_benchmark_shared_set5():
    root = shared_path('data', 'benchmark')
    args = make_args(root.parent, '--scale', '2+3+4', '--test_only')
    ds = data.make_dataset('Set5', args, train=False, log=quiet)
    assert ds.root == root / 'Set5' and len(ds) == 5
    for si, s in enumerate((2, 3, 4)):
        ds.set_scale(si)
        lr, hr, name = ds[0]
        lr_file = iio.imread(root / 'Set5' / 'LR_bicubic' / f'X{s}' / f'img_001x{s}.png')
        assert name == 'img_001' and np.array_equal(lr.permute(1, 2, 0).numpy(), lr_file)
        assert hr.shape[1:] == (lr.shape[1] * s, lr.shape[2] * s)


def test_lookup_order_and_case(tmp_path):
    edsr_set(tmp_path / 'benchmark', 'Set5', n=1)
    edsr_set(tmp_path / 'SrBenchmark', 'Set5', n=2)
    args = make_args(tmp_path, '--test_only')
    assert len(data.make_dataset('Set5', args, train=False, log=quiet)) == 2
    assert data.make_dataset('set5', args, train=False, log=quiet).root == tmp_path / 'SrBenchmark' / 'Set5'


def test_div2k_layout_with_lower_case_lr_folders(tmp_path):
    root = tmp_path / 'DIV2K'
    for k in range(1, 5):
        hr = rand_image(48, 40, seed=k)
        write(root / 'DIV2K_train_HR' / f'{k:04d}.png', hr)
        lr = imresize(hr, 0.5)
        lr[0, 0] = 255 - lr[0, 0]  # proves the LR file is read, not made
        write(root / 'DIV2K_train_LR_bicubic' / 'x2' / f'{k:04d}x2.png', lr)
    args = make_args(tmp_path, '--data_train', 'DIV2K', '--data_test', 'DIV2K', '--data_range', '1-3/4-4',
                     '--scale', '2+3', '--ext', 'sep')
    d = data.Data(args, log=quiet)
    train = d.loader_train.dataset.datasets[0]
    test = d.loader_test[0].dataset
    assert [p.name for p in train.hr_files] == ['0001.png', '0002.png', '0003.png']
    assert [p.name for p in test.hr_files] == ['0004.png'] and len(test) == 1
    lr, hr, name = test[0]
    expected = iio.imread(root / 'DIV2K_train_LR_bicubic' / 'x2' / '0004x2.png')
    assert name == '0004' and np.array_equal(lr.permute(1, 2, 0).numpy(), expected)
    test.set_scale(1)  # x3: absent, made from HR cropped to 48x39
    lr3, hr3, _ = test[0]
    assert lr3.shape == (3, 16, 13) and hr3.shape == (3, 48, 39)
    assert (root / 'bin' / 'LR_bicubic_made' / 'X3' / '0004x3.npy').is_file()
    assert (root / 'bin' / 'DIV2K_train_LR_bicubic' / 'x2' / '0001x2.npy').is_file()
    assert (root / 'bin' / 'DIV2K_train_HR' / '0001.npy').is_file()
    lr_b, hr_b, idx = next(iter(d.loader_train))
    assert hr_b.shape == (4, 3, 24, 24)


def test_msnlan_gtmod12_layout(tmp_path):
    base = tmp_path / 'Set5'
    hr = rand_image(36, 36, seed=1)
    write(base / 'GTmod12' / 'baby.png', hr)
    lr = imresize(hr, 0.5)
    lr[1, 1] = 255 - lr[1, 1]
    write(base / 'LRbicx2' / 'x2' / 'babyx2.png', lr)
    ds = data.make_dataset('Set5', make_args(tmp_path, '--test_only'), train=False, log=quiet)
    out, gt, name = ds[0]
    assert name == 'baby' and np.array_equal(out.permute(1, 2, 0).numpy(), lr) and gt.shape == (3, 36, 36)


def test_demo(tmp_path):
    write(tmp_path / 'demo' / 'b.png', rand_image(10, 12, seed=1))
    write(tmp_path / 'demo' / 'a.jpg', rand_image(8, 9, c=1, seed=2))
    (tmp_path / 'demo' / 'notes.txt').write_text('not an image')
    args = make_args(tmp_path, '--test_only', '--data_test', 'Demo', '--dir_demo', str(tmp_path / 'demo'),
                     '--scale', '2+4')
    d = data.Data(args, log=quiet)
    assert d.loader_train is None
    ds = d.loader_test[0].dataset
    assert ds.name == 'Demo' and not ds.has_gt and ds.scales == [2, 4]
    items = batches(d.loader_test[0])
    assert [b[2] for b in items] == [('a',), ('b',)] and ds.is_gray('a') and not ds.is_gray('b')
    assert items[0][0].shape == (1, 3, 8, 9) and items[0][1].numel() == 0
    with pytest.raises(UserError, match='--dir_demo'):
        args.dir_demo = str(tmp_path / 'missing')
        data.Data(args, log=quiet)


def test_pixel_conversions(tmp_path):
    base = tmp_path / 'Odd'
    write(base / 'gray.png', rand_image(30, 30, c=1, seed=1))
    rgba = np.dstack([rand_image(30, 30, seed=2), np.zeros((30, 30), np.uint8)])
    write(base / 'rgba.png', rgba)
    g16 = np.random.default_rng(3).integers(0, 65536, size=(30, 30, 1)).astype(np.uint16)
    png16(base / 'deep.png', g16)
    png16(base / 'deep_rgb.png', np.repeat(g16, 3, axis=2))
    args = make_args(tmp_path, '--test_only')
    ds = data.make_dataset('Odd', args, train=False, log=quiet)
    by_name = {ds.hr_files[i].stem: ds.test_item(i) for i in range(len(ds))}
    gray = by_name['gray'][1]
    assert ds.is_gray('gray') and ds.is_gray('deep') and not ds.is_gray('rgba') and not ds.is_gray('deep_rgb')
    assert gray.shape == (3, 30, 30) and torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert np.array_equal(by_name['rgba'][1].permute(1, 2, 0).numpy(), rgba[..., :3])
    deep = by_name['deep'][1][0].numpy()
    assert np.array_equal(deep, np.round(g16[..., 0] / 257.0))
    assert by_name['deep_rgb'][1].shape == (3, 30, 30)
    args = make_args(tmp_path, '--test_only', '--n_colors', '1', '--rgb_range', '1')
    ds = data.make_dataset('Odd', args, train=False, log=quiet)
    lr, hr, name = ds.test_item([p.stem for p in ds.hr_files].index('rgba'))
    assert lr.shape == (1, 15, 15) and hr.shape == (1, 30, 30)
    y = color.rgb_to_y(rgba[..., :3]) / 255
    np.testing.assert_allclose(hr[0].numpy(), y, atol=1e-6)


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
    args.ext = 'sep_reset'
    data.make_dataset('Set5', args, train=True, log=quiet)
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


def test_too_small_images_are_skipped(tmp_path, caplog):
    write(tmp_path / 'Mixed' / 'big.png', rand_image(30, 30))
    write(tmp_path / 'Mixed' / 'small.png', rand_image(20, 30))
    args = make_args(tmp_path, '--data_train', 'Mixed')
    with caplog.at_level(logging.WARNING):
        ds = data.make_dataset('Mixed', args, train=True, log=quiet)
    assert [p.name for p in ds.hr_files] == ['big.png']
    assert any('skipping 1 of 2' in r.getMessage() for r in caplog.records)
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
