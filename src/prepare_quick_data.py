"""Data for `demo.sh quick`: scikit-image's bundled photographs as an HR training folder, plus a test set.

    python src/prepare_quick_data.py experiment/quick_data --set5 datasets/benchmark/Set5

writes experiment/quick_data/SKImage/<photo>.png and copies the test set to
experiment/quick_data/benchmark/Set5, so one --dir_data serves --data_train SKImage --data_test Set5.
No download: the photos ship inside the scikit-image wheel. Grayscale photos are written as RGB (three
equal channels) so every image has the channels the network trains on.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from errors import UserError
from fileio import atomic_write_bytes


def _images() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data as sk

    return {
        'astronaut': sk.astronaut,
        'chelsea': sk.chelsea,
        'coffee': sk.coffee,
        'rocket': sk.rocket,
        'motorcycle_left': lambda: sk.stereo_motorcycle()[0],
        'motorcycle_right': lambda: sk.stereo_motorcycle()[1],
        'hubble_deep_field': sk.hubble_deep_field,
        'immunohistochemistry': sk.immunohistochemistry,
        'camera': sk.camera,
        'brick': sk.brick,
        'grass': sk.grass,
        'gravel': sk.gravel,
        'moon': sk.moon,
    }


def export(out: Path, names: Sequence[str] | None = None) -> list[Path]:
    """Write <out>/<name>.png for each bundled photo (all by default); existing files are kept."""
    import imageio.v3 as iio

    table = _images()
    names = list(table) if not names else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f'--images: unknown {", ".join(unknown)}; known: {", ".join(table)}')
    written = []
    for name in names:
        path = out / f'{name}.png'
        if not path.exists():
            img = np.asarray(table[name]())
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            atomic_write_bytes(path, iio.imwrite('<bytes>', img[:, :, :3].astype(np.uint8), extension='.png'))
        written.append(path)
    return written


def copy_test_set(src: Path, root: Path) -> Path:
    """Copy a test-set folder to <root>/benchmark/<its name> (image files only; existing files kept)."""
    if not src.is_dir():
        raise UserError(f'--set5 {src}: no such folder')
    dest = root / 'benchmark' / src.name
    for f in sorted(src.rglob('*')):
        if f.is_file() and 'bin' not in f.relative_to(src).parts:
            target = dest / f.relative_to(src)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('root', type=Path, help='--dir_data of the quick demo (SKImage/ and benchmark/ go here)')
    p.add_argument('--images', nargs='*', help='subset of the bundled photos (default: all)')
    p.add_argument('--set5', type=Path, help='test-set folder to copy to <root>/benchmark/ (e.g. a Set5 copy)')
    args = p.parse_args(argv)
    try:
        paths = export(args.root / 'SKImage', args.images)
        if args.set5 is not None:
            copy_test_set(args.set5, args.root)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{len(paths)} training images in {args.root / "SKImage"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
