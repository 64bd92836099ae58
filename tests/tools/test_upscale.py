"""nlsr-upscale (nlsr.tools.upscale): the same images as main.py --test_only --save_results, unusual images, bad files.

Tiny networks with random weights; every expected image is computed from the network directly (or by
Pillow / imresize), not by the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import ROOT
from nlsr.imageops.imresize import imresize
from nlsr.imageops.metrics import tensor_to_image
from nlsr.model.checkpoint import write_checkpoint
from nlsr.model.networks.edsr import EDSR
from nlsr.model.networks.hspan import HSPAN
from nlsr.tools import upscale
from nlsr.tools.images import orient, read_image

png = pytest.importorskip('png', reason='pypng (requirements.txt) reads and writes 16-bit PNGs')


@pytest.fixture(scope='module')
def edsr(tmp_path_factory) -> tuple[EDSR, Path]:
    torch.manual_seed(0)
    net = EDSR(scale=2, n_feats=8, n_resblocks=1, res_scale=1, rgb_range=1).eval()
    path = tmp_path_factory.mktemp('model') / 'edsr.pt'
    write_checkpoint(path, net.state_dict(), {'model': 'edsr', **net.config})
    return net, path


def _sr(net: EDSR, rgb: np.ndarray, peak: int) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32)).mul(1 / peak)[None])


def _run(model: Path, inputs: list[Path], out: Path, *flags: str) -> int:
    return upscale.main(['--pre_train', str(model), *map(str, inputs), '--out', str(out), '--cpu', *flags])


def _png16(path: Path, img: np.ndarray) -> None:
    h, w, c = img.shape
    with open(path, 'wb') as f:
        png.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16).write(f, img.reshape(h, w * c))


def test_set5_same_images_as_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's Set5 LR x2 images give the SR PNGs main.py --test_only --save_results writes."""
    from nlsr import main

    torch.manual_seed(0)
    net = HSPAN(scale=2, n_feats=8, n_resgroups=1, n_resblocks=1, reduction=2, topk=16, res_scale=1, rgb_range=1)
    model_file = tmp_path / 'hspan.pt'
    write_checkpoint(model_file, net.state_dict(), {'model': 'hspan', **net.config})
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    assert main.main(['--test_only', '--pre_train', str(model_file), '--dir_data', str(ROOT / 'datasets'),
                      '--data_test', 'Set5', '--scale', '2', '--save_results', '--save', 'set5', '--cpu',
                      '--n_threads', '0', '--dir_cache', str(tmp_path / 'cache')]) == 0
    lr_dir = ROOT / 'datasets' / 'benchmark' / 'Set5' / 'LR_bicubic' / 'X2'
    assert _run(model_file, [lr_dir], tmp_path / 'up') == 0
    saved = sorted((tmp_path / 'experiment' / 'set5' / 'results-Set5').glob('*_x2_SR.png'))
    assert len(saved) == 5
    for path in saved:
        ours = iio.imread(tmp_path / 'up' / f'{path.name.replace("_x2_SR", "x2")}')
        assert np.array_equal(ours, iio.imread(path)), path.name


def test_rgb_gray_alpha_8bit(edsr, tmp_path: Path) -> None:
    net, model_file = edsr
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    iio.imwrite(tmp_path / 'rgb.png', rgba[..., :3])
    iio.imwrite(tmp_path / 'gray.png', rgba[..., 0])
    iio.imwrite(tmp_path / 'rgba.png', rgba)
    iio.imwrite(tmp_path / 'la.png', rgba[..., :2])
    assert _run(model_file, [tmp_path / f'{n}.png' for n in ('rgb', 'gray', 'rgba', 'la')], tmp_path / 'out') == 0
    out = {n: iio.imread(tmp_path / 'out' / f'{n}.png') for n in ('rgb', 'gray', 'rgba', 'la')}

    rgb_sr = tensor_to_image(_sr(net, rgba[..., :3], 255), 1)
    assert np.array_equal(out['rgb'], rgb_sr)
    gray_sr = _sr(net, np.repeat(rgba[..., :1], 3, axis=2), 255)[0]
    luma = (0.299 * gray_sr[0] + 0.587 * gray_sr[1] + 0.114 * gray_sr[2])[None]
    assert out['gray'].shape == (18, 22) and np.array_equal(out['gray'], tensor_to_image(luma, 1)[..., 0])
    assert out['rgba'].shape == (18, 22, 4)
    assert np.array_equal(out['rgba'][..., :3], rgb_sr)
    assert np.array_equal(out['rgba'][..., 3], imresize(rgba[..., 3], scale=2))
    assert out['la'].shape == (18, 22, 2) and np.array_equal(out['la'][..., 1], imresize(rgba[..., 1], scale=2))


def test_16bit_stays_16bit(edsr, tmp_path: Path) -> None:
    net, model_file = edsr
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 65536, (8, 10, 4), dtype=np.uint16)
    _png16(tmp_path / 'rgb16.png', rgba[..., :3])
    _png16(tmp_path / 'rgba16.png', rgba)
    _png16(tmp_path / 'gray16.png', rgba[..., :1])
    assert _run(model_file, [tmp_path], tmp_path / 'out') == 0
    read = {n: read_image(tmp_path / 'out' / f'{n}.png') for n in ('rgb16', 'rgba16', 'gray16')}
    assert all(img.dtype == np.uint16 for img in read.values())
    expected = _sr(net, rgba[..., :3], 65535)[0].mul(65535).clamp(0, 65535).round().numpy().astype(np.uint16)
    assert np.array_equal(read['rgb16'], expected.transpose(1, 2, 0))
    assert np.array_equal(read['rgba16'][..., :3], read['rgb16'])
    alpha = np.clip(np.round(imresize(rgba[..., 3].astype(np.float64), scale=2)), 0, 65535)
    assert np.array_equal(read['rgba16'][..., 3], alpha.astype(np.uint16))
    assert read['gray16'].shape == (16, 20, 1)
    # 16-bit input is used at full precision: the 8-bit reduction of the same image gives another result.
    assert not np.array_equal(read['rgb16'] // 257, tensor_to_image(_sr(net, (rgba[..., :3] // 257), 255), 1))


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_as_pillow(tmp_path: Path, orientation: int) -> None:
    img = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / 'o.png'
    Image.fromarray(img).save(path, exif=exif)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(read_image(path), expected)
    assert np.array_equal(orient(img, orientation), expected)


def test_rotated_photo_is_upscaled_upright(edsr, tmp_path: Path) -> None:
    net, model_file = edsr
    img = np.random.default_rng(3).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after a quarter turn clockwise
    Image.fromarray(img).save(tmp_path / 'photo.png', exif=exif)
    assert _run(model_file, [tmp_path / 'photo.png'], tmp_path / 'out') == 0
    expected = tensor_to_image(_sr(net, np.ascontiguousarray(np.rot90(img, -1)), 255), 1)
    assert np.array_equal(iio.imread(tmp_path / 'out' / 'photo.png'), expected)


def test_bad_file_among_good_ones(edsr, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, model_file = edsr
    images = tmp_path / 'in'
    images.mkdir()
    for name in ('a', 'c'):
        iio.imwrite(images / f'{name}.png', np.full((6, 6, 3), 100, np.uint8))
    (images / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    assert _run(model_file, [images], tmp_path / 'out') == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith('error:')]
    assert len(errors) == 1 and 'b.png' in errors[0] and 'cannot read the image' in errors[0]
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a.png', 'c.png']


def test_refuses_a_model_file_without_configuration(edsr, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    net, _ = edsr
    bare = tmp_path / 'bare.pt'
    write_checkpoint(bare, net.state_dict(), None)
    shutil.copy(ROOT / 'datasets' / 'benchmark' / 'Set5' / 'LR_bicubic' / 'X2' / 'img_003x2.png', tmp_path / 'x.png')
    assert _run(bare, [tmp_path / 'x.png'], tmp_path / 'out') == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'bare.pt' in err[0] and 'weights only' in err[0]


def test_multi_scale_model_upscales_by_the_chosen_scale(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An MDSR file serves x2 and x3: --scale picks the branch (the output equals that branch's forward);
    without it, or with a scale the file does not serve, one line names the scales."""
    from nlsr.model.networks.mdsr import MDSR

    torch.manual_seed(0)
    net = MDSR(scales=(2, 3), n_feats=8, n_resblocks=1).eval()
    model_file = tmp_path / 'mdsr.pt'
    write_checkpoint(model_file, net.state_dict(), {'model': 'mdsr', **net.config})
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / 'im.png', rgb)
    assert upscale.main(['--pre_train', str(model_file), '--cpu', '--scale', '3', str(tmp_path / 'im.png'),
                         '--out', str(tmp_path / 'out')]) == 0
    got = iio.imread(tmp_path / 'out' / 'im.png')
    net.set_scale(1)
    with torch.no_grad():
        expected = tensor_to_image(net(torch.from_numpy(rgb.transpose(2, 0, 1)).float()[None]), 255)
    assert got.shape == (30, 36, 3) and np.array_equal(got, expected)
    for extra, message in (([], '--scale: the model file serves x2, x3; choose one'),
                           (['--scale', '4'], '--scale 4: the model file serves x2, x3')):
        capsys.readouterr()
        assert upscale.main(['--pre_train', str(model_file), '--cpu', *extra, str(tmp_path / 'im.png'),
                             '--out', str(tmp_path / 'o2')]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
