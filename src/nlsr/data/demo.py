"""Demo: every image in --dir_demo is an LR input; no ground truth (has_gt False), so no metrics. Other
files there are named in the log and not read.

Items are (lr, empty tensor, stem); the trainer saves results as <stem>_x<s>_SR.png.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from nlsr.data import common
from nlsr.errors import UserError


class Demo(Dataset):
    has_gt = False

    def __init__(self, args: Any, name: str = 'Demo', train: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.name = name
        self.train = False
        self.scales = [int(s) for s in args.scale]
        self.idx_scale = 0
        self.n_colors = int(args.n_colors)
        self.rgb_range = float(args.rgb_range)
        folder = Path(args.dir_demo)
        if not folder.is_dir():
            raise UserError(f'--dir_demo {folder}: folder not found (expected a folder of LR images)')
        self.files, skipped = common.scan_images(folder)
        if not self.files:
            raise UserError(f'--dir_demo {folder}: no images in it '
                            f'(expected files ending in {", ".join(common.IMAGE_SUFFIXES)})')
        if skipped:
            log(common.skip_note(name, skipped))
        # An unreadable header stops here, in the main process.
        self.gray_stems = frozenset(f.stem for f in self.files if common.image_header(f)[2])

    @property
    def scale(self) -> list[int]:
        return self.scales

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> common.TestItem:
        lr = common.set_channel(common.read_image(self.files[idx]), self.n_colors)
        return common.TestItem(common.to_tensor(lr, self.rgb_range), torch.empty(0), self.files[idx].stem)

    def is_gray(self, filename: str) -> bool:
        return filename in self.gray_stems

    def set_scale(self, idx_scale: int) -> None:
        if not 0 <= idx_scale < len(self.scales):
            raise IndexError(f'{self.name}: scale index {idx_scale} out of range for scales {self.scales}')
        self.idx_scale = idx_scale
