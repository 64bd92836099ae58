"""DIV2K: <dir_data>/DIV2K/DIV2K_train_HR/0001.png, DIV2K_train_LR_bicubic/X{s}/0001x{s}.png.

The lower-case `x{s}` LR folders of the MSNLAN README work too. `--data_range 1-800/801-810` picks
images (1-based, inclusive, by sorted file name, as published): the first range for training, the second
for testing (with --test_only and a single range, that range). Absent LR images are made from HR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nlsr.data import common
from nlsr.data.srdata import Layout, SRData, pair_lr, scale_folders
from nlsr.errors import UserError

EXPECTED = 'DIV2K/DIV2K_train_HR/0001.png and DIV2K/DIV2K_train_LR_bicubic/X{s}/0001x{s}.png (or x{s}/)'


def data_ranges(text: str) -> list[tuple[int, int]]:
    """The one or two (begin, end) pairs of --data_range, 1-based inclusive; UserError when malformed."""
    try:
        ranges = [tuple(int(v) for v in r.split('-')) for r in str(text).split('/')]
        if not 1 <= len(ranges) <= 2 or any(len(r) != 2 or r[0] < 1 or r[1] < r[0] for r in ranges):
            raise ValueError
    except ValueError:
        raise UserError(f"--data_range {text!r}: expected 'first-last' or 'first-last/first-last' "
                        "(1-based image numbers, e.g. 1-800/801-810)") from None
    return ranges


def parse_range(text: str, train: bool, test_only: bool) -> tuple[int, int]:
    """The (begin, end) pair of --data_range that applies, 1-based inclusive."""
    ranges = data_ranges(text)
    if train or (test_only and len(ranges) == 1):
        return ranges[0]
    if len(ranges) < 2:
        raise UserError(f"--data_range {text!r}: DIV2K as a test set needs a second range "
                        "(e.g. 1-800/801-810)")
    return ranges[1]


class DIV2K(SRData):
    def __init__(self, args: Any, name: str = 'DIV2K', train: bool = True, **kwargs: Any) -> None:
        self.begin, self.end = parse_range(args.data_range, train, bool(args.test_only))
        super().__init__(args, name=name, train=train, **kwargs)

    def _scan(self, args: Any) -> Layout:
        root = Path(args.dir_data) / 'DIV2K'
        hr_dir = root / 'DIV2K_train_HR'
        if not hr_dir.is_dir():
            raise UserError(f'{self.flag} {self.name}: {hr_dir} not found (--dir_data {args.dir_data}); '
                            f'expected {EXPECTED}')
        all_hr, skipped = common.scan_images(hr_dir)
        hr = all_hr[self.begin - 1:self.end]
        if not hr:
            raise UserError(f'--data_range {args.data_range}: images {self.begin}-{self.end} of {hr_dir} '
                            f'requested, but it has {len(all_hr)}')
        lr = pair_lr(hr, self.scales, lambda s: scale_folders(root / 'DIV2K_train_LR_bicubic', s))
        return Layout(root=root, hr=hr, lr=lr, skipped=skipped)
