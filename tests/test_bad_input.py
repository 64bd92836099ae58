"""Files a user may hand the program that are damaged, truncated, wrong-shaped or unusual: checkpoints,
training states and images. Each is refused in one line naming the file and what is wrong, or read
correctly; nothing already written is changed."""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nlsr import data, model, option
from nlsr.data import common
from nlsr.errors import UserError
from nlsr.model import checkpoint
from nlsr.training.training_state import STATE_FILE, TrainingState

SMALL = ['--model', 'HSPAN', '--scale', '2', '--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8',
         '--reduction', '2', '--topk', '8', '--rgb_range', '1', '--hspa_impl', 'dense']


def _args(*argv: str) -> argparse.Namespace:
    return option.parse(['--cpu', '--test_only', *argv])


def _saved(tmp_path: Path, suffix: str = '.pt') -> Path:
    """A checkpoint of the SMALL network, written by the wrapper (with its configuration)."""
    m = model.Model(_args(*SMALL, '--save_format', suffix.lstrip('.')), log=lambda s: None)
    m.save(tmp_path, epoch=1)
    return tmp_path / 'model' / f'model_latest{suffix}'


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert '\n' not in message, message
    for part in parts:
        assert part in message, message
    return message


# --- checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize('suffix', ['.pt', '.safetensors'])
def test_truncated_checkpoint_is_one_line_and_kept(tmp_path: Path, suffix: str) -> None:
    path = _saved(tmp_path, suffix)
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)
    with pytest.raises(UserError) as err:
        model.Model(_args(*SMALL, '--pre_train', str(path)), log=lambda s: None)
    _one_line(err, str(path), 'cannot read it')
    assert path.read_bytes() == cut  # refused, not rewritten


def test_damaged_bytes_and_empty_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 64] = b'\xff' * 64
    path.write_bytes(bytes(raw))
    empty = tmp_path / 'empty.pt'
    empty.write_bytes(b'')
    for bad in (path, empty):
        with pytest.raises(UserError) as err:
            checkpoint.read_checkpoint(bad)
        _one_line(err, str(bad))


def test_non_finite_weights_are_refused_by_name(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    key = next(k for k, v in obj['state_dict'].items() if v.is_floating_point() and v.numel() > 1)
    obj['state_dict'][key][0] = float('nan')
    torch.save(obj, path)
    with pytest.raises(UserError) as err:
        model.Model(_args(*SMALL, '--pre_train', str(path)), log=lambda s: None)
    _one_line(err, str(path), key, 'not finite')


@pytest.mark.parametrize('entry, value', [('n_feats', 'wide'), ('scale', 'x2'), ('n_resgroups', -1), ('topk', 0),
                                          ('res_scale', float('nan')), ('model', 7), ('attention', 3)])
def test_configuration_values_that_cannot_be_right(tmp_path: Path, entry: str, value: object) -> None:
    path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj['config'][entry] = value
    torch.save(obj, path)
    with pytest.raises(UserError) as err:
        model.Model(_args('--pre_train', str(path)), log=lambda s: None)
    _one_line(err, str(path), f"configuration entry '{entry}'")


def test_configuration_values_of_the_flags_types_are_adopted(tmp_path: Path) -> None:
    """A float flag whose default is written as an integer (--res_scale 1) takes a stored 0.1."""
    path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj['config']['res_scale'] = 0.1
    torch.save(obj, path)
    m = model.Model(_args('--pre_train', str(path)), log=lambda s: None)
    assert m.model.config['res_scale'] == 0.1


def test_wrong_shaped_tensor_is_named(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    key = next(k for k, v in obj['state_dict'].items() if v.ndim == 4)
    obj['state_dict'][key] = obj['state_dict'][key][:, :1]
    torch.save(obj, path)
    with pytest.raises(UserError) as err:
        model.Model(_args(*SMALL, '--pre_train', str(path)), log=lambda s: None)
    _one_line(err, str(path), key, 'shape')


def test_test_only_pre_train_reads_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --test_only --pre_train run reads the checkpoint with torch.load exactly once (option.build reads it,
    the wrapper takes what was read)."""
    from conftest import write_blocky_folders
    from nlsr import main

    path = _saved(tmp_path)
    write_blocky_folders(tmp_path / 'data', (('Mini', 1, (16, 20)),))
    reads: list[str] = []
    real_load = torch.load

    def counting_load(f, *a, **k):
        reads.append(str(f))
        return real_load(f, *a, **k)

    monkeypatch.setattr(torch, 'load', counting_load)
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'exp'))
    assert main.main(['--cpu', '--test_only', '--pre_train', str(path), '--dir_data', str(tmp_path / 'data'),
                      '--data_test', 'Mini', '--n_threads', '0', '--save', 'once', '--hspa_impl', 'dense']) == 0
    assert reads.count(str(path)) == 1, reads


# --- training states ---------------------------------------------------------------------------------

def _state_folder(tmp_path: Path) -> Path:
    folder = tmp_path / 'run'
    folder.mkdir()
    TrainingState(epoch=2, model={'w': torch.ones(2)}).save(folder)
    return folder


def test_truncated_training_state_is_one_line(tmp_path: Path) -> None:
    folder = _state_folder(tmp_path)
    path = folder / STATE_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError) as err:
        TrainingState.load(folder)
    _one_line(err, str(path), 'unreadable training state')


@pytest.mark.parametrize('entry, value', [('epoch', 'two'), ('epoch', -3), ('history', [{'epoch': 1}]),
                                          ('model', [1, 2]), ('log_marks', 5)])
def test_training_state_values_that_cannot_be_right(tmp_path: Path, entry: str, value: object) -> None:
    folder = _state_folder(tmp_path)
    obj = torch.load(folder / STATE_FILE, weights_only=True)
    obj[entry] = value
    torch.save(obj, folder / STATE_FILE)
    with pytest.raises(UserError) as err:
        TrainingState.load(folder)
    _one_line(err, str(folder / STATE_FILE), entry)


# --- images ------------------------------------------------------------------------------------------

RGB = (np.arange(12 * 10 * 3).reshape(12, 10, 3) * 7 % 256).astype(np.uint8)


def test_palette_and_transparent_palette_are_expanded(tmp_path: Path) -> None:
    for name, extra in (('pal.png', {}), ('palt.png', {'transparency': 0})):
        Image.fromarray(RGB).convert('P', palette=Image.ADAPTIVE, colors=16).save(tmp_path / name, **extra)
        img = common.read_image(tmp_path / name)
        assert img.shape == (12, 10, 3)
        assert np.array_equal(img, np.asarray(Image.open(tmp_path / name).convert('RGB')))


def test_cmyk_jpeg_is_converted_not_read_as_alpha(tmp_path: Path) -> None:
    path = tmp_path / 'print.jpg'
    Image.fromarray(RGB).convert('CMYK').save(path, quality=100)
    img = common.read_image(path)
    assert img.shape == (12, 10, 3)
    assert np.array_equal(img, np.asarray(Image.open(path).convert('RGB')))


def test_exif_rotated_jpeg_keeps_the_stored_pixels_and_header_size(tmp_path: Path) -> None:
    path = tmp_path / 'rotated.jpg'
    im = Image.fromarray(RGB)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    im.save(path, exif=exif, quality=100)
    assert common.read_image(path).shape[:2] == common.image_size(path) == (12, 10)


def test_decompression_bomb_header_is_one_line(tmp_path: Path) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

    path = tmp_path / 'huge.png'
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))
    for read in (common.image_header, common.read_image):
        with pytest.raises(UserError) as err:
            read(path)
        _one_line(err, str(path), 'exceeds limit')


def test_one_pixel_test_image_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / 'data' / 'Odd'
    folder.mkdir(parents=True)
    Image.fromarray(RGB).save(folder / 'fine.png')
    Image.fromarray(RGB[:1, :1]).save(folder / 'dot.png')
    args = option.parse(['--dir_data', str(tmp_path / 'data'), '--n_threads', '0', '--cpu', '--test_only',
                         '--scale', '2', '--data_test', 'Odd'])
    with pytest.raises(UserError) as err:
        ds = data.make_dataset('Odd', args, train=False, log=lambda s: None)
        for i in range(len(ds)):
            ds.test_item(i)
    _one_line(err, 'dot.png', '1x1')
