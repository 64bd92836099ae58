"""The data tests' inputs: parsed arguments for a tiny loader, random images written as files (8-bit, and
16-bit PNG by hand), an EDSR-layout benchmark set, and a loader's first batches."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from nlsr import option
from nlsr.imageops.imresize import imresize


def quiet(_msg: str) -> None:
    pass


def make_args(dir_data: Path | str, *extra: str, dir_cache: Path | None = None):
    argv = ['--dir_data', str(dir_data), '--n_threads', '0', '--cpu', '--batch_size', '4', '--test_every', '3',
            '--patch_size', '24', '--scale', '2', '--seed', '1', '--data_test', 'Set5', *extra]
    args = option.parse(argv)
    return args.replace(dir_cache=str(dir_cache)) if dir_cache is not None else args


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
