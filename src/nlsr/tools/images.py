"""Reading and writing people's images as they are: 8- or 16-bit, grayscale or colour, with or without
alpha, EXIF orientation applied.

Pillow decodes 8-bit images and 16-bit grayscale, but reduces 16-bit colour PNGs to 8 bits and cannot
write them; PNGs of bit depth 16 are therefore read and written with pypng, 16-bit TIFFs read with
tifffile. Arrays are HxWxC, C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), uint8 or uint16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlsr.errors import UserError
from nlsr.fileio import atomic_write_bytes

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
EXIF_ORIENTATION = 0x0112
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """The image as it is meant to be seen, for an EXIF orientation value 1..8 (PIL's exif_transpose)."""
    if orientation in (2, 4):
        img = img[:, ::-1] if orientation == 2 else img[::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation in (5, 7):
        img = img.transpose(1, 0, 2)
        img = img if orientation == 5 else img[::-1, ::-1]
    elif orientation == 6:
        img = np.rot90(img, -1)
    elif orientation == 8:
        img = np.rot90(img, 1)
    return np.ascontiguousarray(img)


def _png_bit_depth(path: Path) -> int:
    with open(path, 'rb') as f:
        head = f.read(25)
    return head[24] if head[:8] == PNG_SIGNATURE and len(head) == 25 else 0


def _read_png16(path: Path) -> np.ndarray:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, info['planes'])


def _from_pillow(im) -> np.ndarray:
    mode = im.mode
    if mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit grayscale (Pillow widens some to 32-bit 'I')
        arr = np.asarray(im)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ValueError(f'{mode} pixels outside 0..65535')
        return arr.astype(np.uint16)[..., None]
    if mode not in ('L', 'LA', 'RGB', 'RGBA'):
        has_alpha = 'A' in mode or 'transparency' in im.info
        im = im.convert('RGBA' if has_alpha else ('L' if mode == '1' else 'RGB'))
    arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def read_image(path: Path) -> np.ndarray:
    """HxWxC uint8 or uint16 pixels of an image file, EXIF orientation applied; UserError naming the file
    when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            if im.format == 'PNG' and _png_bit_depth(path) == 16:
                arr = _read_png16(path)
            elif im.format == 'TIFF' and im.mode not in ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I;16B', 'I;16L'):
                import tifffile

                arr = tifffile.imread(path)
                arr = arr[..., None] if arr.ndim == 2 else arr
            else:
                arr = _from_pillow(im)
    except Exception as exc:  # any decoder failure: the user's file
        raise UserError(f'{path}: cannot read the image ({_first_line(exc)})') from None
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.dtype not in (np.uint8, np.uint16):
        raise UserError(f'{path}: expected 8- or 16-bit gray, gray+alpha, RGB or RGBA pixels, got '
                        f'{arr.dtype} of shape {arr.shape}')
    return orient(arr, orientation)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an HxWxC uint8 or uint16 image (C 1 to 4)."""
    if img.dtype == np.uint8:
        import imageio.v3 as iio

        return iio.imwrite('<bytes>', img[..., 0] if img.shape[2] == 1 else img, extension='.png')
    import io

    import png

    height, width, planes = img.shape
    writer = png.Writer(width, height, greyscale=planes <= 2, alpha=planes in (2, 4), bitdepth=16)
    buffer = io.BytesIO()
    writer.write(buffer, img.reshape(height, width * planes))
    return buffer.getvalue()


def write_png(path: Path, img: np.ndarray) -> None:
    """Write img as a PNG file atomically (temporary name, then renamed)."""
    atomic_write_bytes(path, encode_png(img))
