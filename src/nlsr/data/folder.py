"""Any folder of images as a dataset (training or test), in one of three layouts.

The folder is the first of `<dir_data>/SrBenchmark/<name>`, `<dir_data>/benchmark/<name>`,
`<dir_data>/<name>` that exists and holds images (a folder name differing only in case also matches):

1. EDSR layout:   <name>/HR/<stem>.png  and  <name>/LR_bicubic/X{s}/<stem>x{s}.png
2. MSNLAN layout: <name>/GTmod12/<stem>.png  and  <name>/LRbicx{s}/x{s}/<stem>x{s}.png
3. HR only:       <name>/<stem>.png (any of .png .jpg .jpeg .bmp .tif .tiff .webp .ppm .pgm .gif)

LR folders may be X{s} or x{s}, LR files <stem>x{s}.<ext> or <stem>.<ext>. Any LR image that is absent
is made from HR with the MATLAB-compatible resizer and cached (see srdata.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nlsr.data import common
from nlsr.data.srdata import Layout, SRData, find_dataset_dir, pair_lr, scale_folders
from nlsr.errors import UserError

SEARCH_SUBDIRS = ('SrBenchmark', 'benchmark', '')
EXPECTED = ('<name>/HR/*.png with LR_bicubic/X{s}/<stem>x{s}.png (EDSR), '
            '<name>/GTmod12/*.png with LRbicx{s}/x{s}/<stem>x{s}.png (MSNLAN), '
            'or <name>/*.png (HR only; LR made and cached)')


def scan_folder(root: Path, scales: list[int]) -> Layout:
    """The layout of `root`; its `hr` is empty when it holds no images in any known layout."""
    if (root / 'HR').is_dir():
        hr, skipped = common.scan_images(root / 'HR')
        lr = pair_lr(hr, scales, lambda s: scale_folders(root / 'LR_bicubic', s))
    elif (root / 'GTmod12').is_dir():
        hr, skipped = common.scan_images(root / 'GTmod12')
        lr = pair_lr(hr, scales, lambda s: [*scale_folders(root / f'LRbicx{s}', s), root / f'LRbicx{s}'])
    else:
        hr, skipped = common.scan_images(root)
        lr = pair_lr(hr, scales, lambda s: scale_folders(root / 'LR_bicubic', s))
    return Layout(root=root, hr=hr, lr=lr, skipped=skipped)


class Folder(SRData):
    """A named folder of HR images (with or without LR images) under --dir_data."""

    def _scan(self, args: Any) -> Layout:
        tried = [Path(args.dir_data) / sub / self.name if sub else Path(args.dir_data) / self.name
                 for sub in SEARCH_SUBDIRS]
        skipped: list[tuple[Path, str]] = []
        for root in find_dataset_dir(args.dir_data, self.name, SEARCH_SUBDIRS):
            layout = scan_folder(root, self.scales)
            if layout.hr:
                return layout
            skipped += layout.skipped
        seen = f'; {common.skip_note(self.name, skipped)}' if skipped else ''
        raise UserError(f'{self.flag} {self.name}: no images found (--dir_data {args.dir_data}); tried '
                        f'{", ".join(str(p) for p in tried)}; expected {EXPECTED}{seen}')
