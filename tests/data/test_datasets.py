"""Datasets and loaders: training sets (patches, multiscale batches, workers, the distributed split), the
benchmark and DIV2K layouts, the Demo set and pixel conversions (tiny generated images; ../shared where
noted)."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import shared_path
from dataset_files import batches, edsr_set, make_args, png16, quiet, rand_image, write
from nlsr import data
from nlsr.errors import UserError
from nlsr.imageops import color
from nlsr.imageops.imresize import imresize

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
    args = args.replace(n_threads=18)
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
    args = args.replace(n_threads=1)  # one spawned worker: each one re-imports torch (seconds on a busy machine)
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
        data.Data(args.replace(dir_demo=str(tmp_path / 'missing')), log=quiet)


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
