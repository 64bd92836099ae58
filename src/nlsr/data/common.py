"""Image files, pixel conversions, training patches and augmentation (pure functions, no state).

Decoded images are always uint8 HxWxC with C = 1 (grayscale) or 3 (RGB): alpha is dropped, 16-bit
samples are scaled to 8 bits (rounded), other types are converted or refused with a UserError naming the
file. The network's colour mode (`--n_colors`) is applied later, per sample, by `set_channel`, so caches
do not depend on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nlsr.errors import UserError
from nlsr.imageops.color import rgb_to_y


class TrainItem(NamedTuple):
    """A training sample (or, collated, a batch): aligned LR and HR patches and the scale index."""

    lr: torch.Tensor
    hr: torch.Tensor
    idx_scale: int | torch.Tensor


class TestItem(NamedTuple):
    """A test image: the whole LR image, its HR image cropped to match (empty without ground truth) and
    the HR file's stem (collated: a list of stems)."""

    lr: torch.Tensor
    hr: torch.Tensor
    name: str | list[str]


IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.gif')


def scan_images(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files directly in `folder`, sorted by name, and every other file there with why it is
    skipped, sorted by name (sub-folders are neither; an unreadable folder gives two empty lists)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return [], []
    images, skipped = [], []
    for e in sorted(entries, key=lambda e: e.name):
        if e.is_dir():
            continue
        suffix = Path(e.name).suffix.lower()
        if not e.is_file():
            skipped.append((Path(e.path), 'a link to nothing' if e.is_symlink() else 'not a regular file'))
        elif e.name.startswith('.'):
            skipped.append((Path(e.path), 'hidden'))
        elif suffix not in IMAGE_SUFFIXES:
            skipped.append((Path(e.path), f'not an image suffix: {suffix}' if suffix else 'no image suffix'))
        else:
            images.append(Path(e.path))
    return images, skipped


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the first list of scan_images)."""
    return scan_images(folder)[0]


SKIPS_NAMED = 5  # skipped files named in a log line; the rest are counted


def skip_note(dataset: str, skipped: list[tuple[Path, str]], what: str = 'file(s)') -> str:
    """One log line naming the first SKIPS_NAMED skipped files with the reason and counting all of them."""
    folders = {p.parent for p, _ in skipped}
    where = f' in {next(iter(folders))}' if len(folders) == 1 else ''
    named = '; '.join(f'{p.name if where else p} ({why})' for p, why in skipped[:SKIPS_NAMED])
    more = f'; and {len(skipped) - SKIPS_NAMED} more' if len(skipped) > SKIPS_NAMED else ''
    return f'{dataset}: skipped {len(skipped)} {what}{where}: {named}{more}'


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0]}' if text else type(exc).__name__


GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'F')


def image_header(path: Path) -> tuple[int, int, bool]:
    """(height, width, is_grayscale) from the file header, without decoding the pixels."""
    from PIL import Image  # Pillow comes with imageio; imported here to keep worker start-up light

    try:
        with Image.open(path) as im:
            w, h = im.size
            gray = im.mode in GRAY_MODES
    except Exception as exc:  # any decoder failure is the user's file, reported as one line
        raise UserError(f'{path}: cannot read the image ({_first_line(exc)})') from None
    return h, w, gray


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header."""
    return image_header(path)[:2]


def to_uint8(img: np.ndarray, path: Path | str = '<array>') -> np.ndarray:
    """Any decoded image -> uint8 HxWxC, C in (1, 3): drop alpha, scale 16-bit, expand grayscale."""
    if img.ndim == 4:  # animated formats: the first frame
        img = img[0]
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise UserError(f'{path}: expected a grayscale, RGB or RGBA image, got pixel array shape {img.shape}')
    if img.shape[2] in (2, 4):
        img = img[..., :-1]  # alpha
    if img.dtype == np.uint8:
        pass
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype in (np.uint16, np.int32, np.uint32) and img.max(initial=0) <= 65535 and img.min(initial=0) >= 0:
        # 16-bit: v * 255 / 65535 rounded (integer arithmetic, exact)
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(img.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(img, initial=0)) <= 1.0 else 1.0
        img = np.clip(np.round(np.nan_to_num(img) * scale), 0, 255).astype(np.uint8)
    else:
        raise UserError(f'{path}: unsupported pixel type {img.dtype} (expected 8- or 16-bit samples)')
    return np.ascontiguousarray(img)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HxWxC (C 1 or 3); a UserError naming the file when it cannot be read.
    Pixels are taken as stored (an EXIF orientation tag is not applied, as in the published readers, so the
    header's size and the decoded size agree); CMYK is converted to RGB, palettes are expanded."""
    import imageio.v3 as iio

    try:
        img = np.asarray(iio.imread(path))
        if img.ndim == 3 and img.shape[2] == 4 and _is_cmyk(path):  # 4 ink channels, not RGBA
            img = np.asarray(iio.imread(path, mode='RGB'))
    except Exception as exc:  # corrupt, truncated, or not an image: the user's file
        raise UserError(f'{path}: cannot read the image ({_first_line(exc)})') from None
    return to_uint8(img, path)


def _is_cmyk(path: Path) -> bool:
    """True for a CMYK file (print JPEGs and TIFFs), whose four channels are inks, not RGB plus alpha."""
    from PIL import Image

    with Image.open(path) as im:
        return im.mode == 'CMYK'



def set_channel(img: np.ndarray, n_colors: int) -> np.ndarray:
    """Match the network's colour mode: grayscale -> 3 equal channels, RGB -> Y when n_colors is 1."""
    c = img.shape[2]
    if n_colors == 3 and c == 1:
        return np.repeat(img, 3, axis=2)
    if n_colors == 1 and c == 3:
        return rgb_to_y(img).astype(np.float32)[..., None]
    return img


def to_tensor(img: np.ndarray, rgb_range: float) -> torch.Tensor:
    """HxWxC (0..255) -> float32 CxHxW on 0..rgb_range."""
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
    return t.mul_(rgb_range / 255)


def get_patch(lr: np.ndarray, hr: np.ndarray, patch_size: int, scale: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Aligned random patches: HR patch_size x patch_size, LR patch_size/scale (patch_size is the HR size)."""
    ip = patch_size // scale
    ih, iw = lr.shape[:2]
    iy = int(rng.integers(0, ih - ip + 1))
    ix = int(rng.integers(0, iw - ip + 1))
    ty, tx = iy * scale, ix * scale
    return lr[iy:iy + ip, ix:ix + ip], hr[ty:ty + patch_size, tx:tx + patch_size]


def augment(lr: np.ndarray, hr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The published augmentation: horizontal flip, vertical flip, transpose, each with probability 1/2."""
    hflip, vflip, rot90 = rng.random(3) < 0.5

    def apply(img: np.ndarray) -> np.ndarray:
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        if rot90:
            img = img.transpose(1, 0, 2)
        return img

    return apply(lr), apply(hr)
