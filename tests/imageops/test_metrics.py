"""PSNR / SSIM / Y conversion / quantization conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from nlsr.imageops import color, metrics


def _noisy_pair(shape=(48, 40, 3), seed=0, sigma=12.0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    base = 128 + 60 * np.sin(yy / 5.0)[..., None] * np.cos(xx / 7.0)[..., None] * np.ones(shape[2])
    hr = np.clip(base, 0, 255).astype(np.uint8)
    sr = np.clip(base + rng.normal(0, sigma, shape), 0, 255).astype(np.uint8)
    return sr, hr


def test_identical_images():
    _, hr = _noisy_pair()
    assert metrics.psnr(hr, hr.copy(), 4) == math.inf
    assert metrics.ssim(hr, hr.copy(), 4) == 1.0


def test_psnr_known_value_on_y():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr + np.uint8(10)
    dy = 10 * (65.481 + 128.553 + 24.966) / 255  # luma difference of an equal shift in R, G and B
    assert metrics.psnr(sr, hr, 0) == pytest.approx(20 * math.log10(255 / dy), abs=1e-9)
    assert metrics.psnr(sr, hr, 0, y_channel=False) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


def test_border_is_shaved():
    _, hr = _noisy_pair()
    sr = hr.copy()
    sr[:3] = 0
    sr[:, -3:] = 255
    assert metrics.psnr(sr, hr, 3) == math.inf
    assert metrics.psnr(sr, hr, 2) < 40


def test_rgb_to_y_range():
    assert color.rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16)
    assert color.rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235)


@pytest.mark.parametrize('seed', [0, 1])
def test_ssim_matches_skimage(seed):
    sr, hr = _noisy_pair(seed=seed)
    b = 3
    y_sr = color.rgb_to_y(sr)[b:-b, b:-b]
    y_hr = color.rgb_to_y(hr)[b:-b, b:-b]
    expected = structural_similarity(y_sr, y_hr, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255)
    assert metrics.ssim(sr, hr, b) == pytest.approx(expected, abs=1e-9)
    assert 0.2 < expected < 0.99  # a real, non-trivial value


def test_grayscale_on_its_own_channel():
    sr, hr = _noisy_pair(shape=(40, 40, 1))
    expected = structural_similarity(sr[..., 0].astype(float), hr[..., 0].astype(float), gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, data_range=255)
    for y in (True, False):
        assert metrics.ssim(sr, hr, 0, y_channel=y) == pytest.approx(expected, abs=1e-9)
        assert metrics.psnr(sr, hr, 0, y_channel=y) == metrics.psnr(sr[..., 0], hr[..., 0], 0)
    mse = np.mean((sr.astype(float) - hr) ** 2)
    assert metrics.psnr(sr, hr, 0) == pytest.approx(10 * math.log10(255 ** 2 / mse))


def test_rgb_without_y_averages_channels():
    sr, hr = _noisy_pair()
    per_channel = [metrics.ssim(sr[..., c:c + 1], hr[..., c:c + 1], 2) for c in range(3)]
    assert metrics.ssim(sr, hr, 2, y_channel=False) == pytest.approx(np.mean(per_channel))


def test_tensor_to_image_quantizes_like_edsr():
    t = torch.tensor([[[-5.0, 0.4, 0.6, 100.0, 254.6, 300.0]]]).repeat(3, 1, 1)
    img = metrics.tensor_to_image(t, 255)
    assert img.dtype == np.uint8 and img.shape == (1, 6, 3)
    assert img[0, :, 0].tolist() == [0, 0, 1, 100, 255, 255]
    img1 = metrics.tensor_to_image(t[None] / 255, 1)  # rgb_range 1, with a batch dimension
    assert img1[0, :, 0].tolist() == [0, 0, 1, 100, 255, 255]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match='shapes differ'):
        metrics.psnr(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 12, 3), np.uint8), 0)


def test_rgb_to_gray_is_the_channel_for_equal_channels_and_luma_otherwise():
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.repeat(g[..., None], 3, axis=2)
    assert np.array_equal(color.rgb_to_gray(rgb)[..., 0], g)
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    assert color.rgb_to_gray(px)[0, :, 0].tolist() == [76, 150, 29]
