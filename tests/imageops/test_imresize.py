"""MATLAB-compatible bicubic resizer: bit-exact benchmark LR files, a slow reference, published baselines."""

from __future__ import annotations

import math

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import ROOT, shared_path
from nlsr.imageops import metrics
from nlsr.imageops.imresize import contributions, imresize

SETS = ('Set5', 'Set14', 'B100')
SCALES = (2, 3, 4)


@pytest.fixture(scope='module')
def benchmark_images() -> dict[str, list[tuple[str, np.ndarray, dict[int, np.ndarray]]]]:
    """{set: [(stem, HR, {scale: LR file})]} decoded once for this module."""
    root = shared_path('data', 'benchmark')
    out = {}
    for name in SETS:
        items = []
        for hr_path in sorted((root / name / 'HR').glob('*.png')):
            lrs = {s: iio.imread(root / name / 'LR_bicubic' / f'X{s}' / f'{hr_path.stem}x{s}.png') for s in SCALES}
            items.append((hr_path.stem, iio.imread(hr_path), lrs))
        assert items, f'no HR images in {root / name}'
        out[name] = items
    return out


def test_reproduces_every_benchmark_lr_file_bit_exactly(benchmark_images):
    checked = 0
    for name, items in benchmark_images.items():
        for stem, hr, lrs in items:
            for s, lr in lrs.items():
                h, w = hr.shape[0] // s, hr.shape[1] // s
                out = imresize(hr[:h * s, :w * s], 1 / s)
                assert out.dtype == np.uint8 and out.shape == lr.shape, (name, stem, s)
                n_bad = int(np.count_nonzero(out != lr))
                assert n_bad == 0, f'{name} {stem} x{s}: {n_bad} pixels differ'
                checked += 1
    assert checked == 3 * (5 + 14 + 100)


def test_reproduces_the_shipped_set5_lr_files_bit_exactly():
    """The Set5 copy in datasets/ (shipped, so a fresh clone checks MATLAB exactness too)."""
    root = ROOT / 'datasets' / 'benchmark' / 'Set5'
    checked = 0
    for hr_path in sorted((root / 'HR').glob('*.png')):
        hr = iio.imread(hr_path)
        for s in SCALES:
            lr = iio.imread(root / 'LR_bicubic' / f'X{s}' / f'{hr_path.stem}x{s}.png')
            h, w = hr.shape[0] // s, hr.shape[1] // s
            out = imresize(hr[:h * s, :w * s], 1 / s)
            assert out.shape == lr.shape and np.count_nonzero(out != lr) == 0, (hr_path.stem, s)
            checked += 1
    assert checked == 3 * 5


def test_per_pass_rounding_and_axis_order_matter(benchmark_images):
    """The two MATLAB details the bit-exact test relies on: each is visible on real data."""
    _, hr, lrs = benchmark_images['Set5'][0]
    s = 3
    h, w = hr.shape[0] // s, hr.shape[1] // s
    crop = hr[:h * s, :w * s]
    float_port = np.clip(np.round(imresize(crop.astype(np.float64), 1 / s)), 0, 255).astype(np.uint8)
    assert np.count_nonzero(float_port != lrs[s]) > 0.05 * lrs[s].size
    columns_first = imresize(crop.transpose(1, 0, 2).copy(), 1 / s).transpose(1, 0, 2)
    assert np.count_nonzero(columns_first != lrs[s]) > 0


def _reference_resize(img: np.ndarray, out_shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Straight per-pixel transcription of MATLAB's algorithm (slow; tiny images only)."""
    def cubic(x: float) -> float:
        a = abs(x)
        if a <= 1:
            return 1.5 * a ** 3 - 2.5 * a ** 2 + 1
        if a <= 2:
            return -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2
        return 0.0

    def resize_dim(src: np.ndarray, axis: int, n_out: int, sc: float) -> np.ndarray:
        n_in = src.shape[axis]
        width = 4 / sc if sc < 1 else 4
        moved = np.moveaxis(src, axis, 0).astype(np.float64)
        out = np.zeros((n_out,) + moved.shape[1:])
        for o in range(n_out):
            u = (o + 1) / sc + 0.5 * (1 - 1 / sc)
            left = math.floor(u - width / 2)
            taps = [left + k for k in range(math.ceil(width) + 2)]
            ws = [sc * cubic(sc * (u - t)) if sc < 1 else cubic(u - t) for t in taps]
            total = sum(ws)
            acc = np.zeros(moved.shape[1:])
            for t, wt in zip(taps, ws, strict=True):
                j = (t - 1) % (2 * n_in)
                j = j if j < n_in else 2 * n_in - 1 - j
                acc = acc + (wt / total) * moved[j]
            out[o] = acc
        out = np.moveaxis(out, 0, axis)
        if img.dtype == np.uint8:
            out = np.clip(np.where(out >= 0, np.floor(out + 0.5), np.ceil(out - 0.5)), 0, 255).astype(np.uint8)
        return out

    first = resize_dim(img, 0, out_shape[0], scale[0])
    return resize_dim(first, 1, out_shape[1], scale[1])


@pytest.mark.parametrize('scale', [0.5, 1 / 3, 0.7, 1.5, 2.0, 3.0])
def test_matches_slow_reference(scale):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(13, 11, 3), dtype=np.uint8)
    out_shape = (math.ceil(13 * scale), math.ceil(11 * scale))
    expected = _reference_resize(img, out_shape, (scale, scale))
    got = imresize(img, scale)
    assert got.shape == expected.shape == out_shape + (3,)
    assert np.count_nonzero(got != expected) == 0
    f = img.astype(np.float32) / 255
    got_f = imresize(f, scale)
    assert got_f.dtype == np.float32
    np.testing.assert_allclose(got_f, _reference_resize(f.astype(np.float64), out_shape, (scale, scale)),
                               atol=1e-6)


def test_output_shape_and_grayscale():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    out = imresize(img, output_shape=(10, 45))
    assert out.shape == (10, 45) and out.dtype == np.uint8
    # output_shape implies per-axis scales 0.5 and 1.5: same as the reference with those scales
    expected = _reference_resize(img[..., None], (10, 45), (0.5, 1.5))[..., 0]
    # MATLAB resizes the axis with the smaller scale first: here rows (0.5) then columns (1.5)
    assert np.array_equal(out, expected)
    assert np.array_equal(imresize(img[..., None], 0.5)[..., 0], imresize(img, 0.5))


def test_kernel_widened_only_when_downscaling():
    w_down, _ = contributions(40, 20, 0.5)
    w_up, _ = contributions(20, 40, 2.0)
    assert w_down.shape[1] > 6 >= w_up.shape[1]
    np.testing.assert_allclose(w_down.sum(1), 1)
    np.testing.assert_allclose(w_up.sum(1), 1)
    flat = np.full((9, 7, 3), 77, np.uint8)
    assert np.all(imresize(flat, 0.5) == 77) and np.all(imresize(flat, 2.0) == 77)


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        imresize(np.zeros((4, 4), np.int32), 0.5)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4), np.uint8))


# Published bicubic rows (../shared/README.md) and the MATLAB-style figures of these exact conventions.
PUBLISHED = {
    'Set5': {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)},
    'Set14': {2: (30.24, 0.8688), 3: (27.55, 0.7742), 4: (26.00, 0.7027)},
    'B100': {2: (29.56, 0.8431), 3: (27.21, 0.7385), 4: (25.96, 0.6675)},
}
MATLAB_STYLE = {
    'Set5': {2: (33.673, 0.9303), 3: (30.403, 0.8689), 4: (28.429, 0.8111)},
    'Set14': {2: (30.230, 0.8691), 3: (27.537, 0.7745), 4: (25.994, 0.7029)},
    'B100': {2: (29.560, 0.8434), 3: (27.209, 0.7391), 4: (25.961, 0.6681)},
}


def test_bicubic_baseline_reproduces_published_rows(benchmark_images):
    """uint8 bicubic upscaling (MATLAB per-pass rounding), Y channel, `scale`-pixel border."""
    for name, items in benchmark_images.items():
        for s in SCALES:
            scores = []
            for _, hr, lrs in items:
                lr = lrs[s]
                sr = imresize(lr, float(s))
                gt = hr[:lr.shape[0] * s, :lr.shape[1] * s]
                scores.append((metrics.psnr(sr, gt, s), metrics.ssim(sr, gt, s)))
            p, q = np.mean(scores, axis=0)
            pub_p, pub_q = PUBLISHED[name][s]
            assert abs(p - pub_p) <= 0.03 and abs(q - pub_q) <= 0.003, (name, s, p, q)
            ml_p, ml_q = MATLAB_STYLE[name][s]
            assert abs(p - ml_p) <= 0.0015 and abs(q - ml_q) <= 0.00015, (name, s, p, q)
