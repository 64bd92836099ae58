"""Base dataset: pairs of HR images and LR images per scale, the .npy cache, patches and augmentation.

A subclass only says where the files are (`_scan` -> `Layout`); everything else is here:

- Sizes are checked from the file headers when the dataset is built, so a mismatched pair or an
  unreadable header stops the run at once with a one-line UserError naming the files, not later in a
  worker. An LR image must be exactly (H // s) x (W // s) for an H x W HR image; the HR image is cropped
  to (h*s) x (w*s) at the top-left.
- When the LR image of a scale is absent it is made from HR: HR cropped to a multiple of the scale,
  `imresize(.., 1/s)` on uint8 (MATLAB-exact, see imresize.py). Made LR images are always cached,
  whatever `--ext`, as `bin/LR_bicubic_made/X{s}/<stem>x{s}.npy` (uint8), rebuilt when older than HR.
- `--ext sep` caches every decoded HR/LR image as `bin/<path relative to the dataset>.npy`
  (e.g. `bin/HR/0001.npy`, `bin/LR_bicubic/X2/0001x2.npy`) when the dataset is built, and reads the
  cache memory-mapped from then on; `sep_reset` rebuilds all of this dataset's cache files; `img` decodes
  image files on every read. See cache.py for freshness and atomic writes.
- Where `bin/` goes: `args.dir_cache` (optional) moves it to `<dir_cache>/<name>-<hash of the dataset
  path>/`; a read-only dataset folder (no write permission bit, e.g. ../shared) gets the same layout under
  `$XDG_CACHE_HOME/sr-data-cache/` (default ~/.cache), with a one-line notice. If even that cannot be
  written, a log line says so and images are decoded (and LR made) on every read.
- Training images smaller than `--patch_size` are skipped, and files in an image folder that are not images
  (see common.scan_images) are not read: one log line per dataset names the first few of each with the
  reason and counts them all.
- Training items are keyed `(index, scale_index, seed)`: the batch sampler (data/__init__.py) picks the
  scale per batch and one seed per sample, so patches are reproducible from --seed and independent of
  the number of workers. A plain integer index uses the current `set_scale` and fresh OS randomness.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nlsr.data import cache, common
from nlsr.errors import UserError
from nlsr.imageops.imresize import imresize


@dataclass
class Layout:
    """Where a dataset's files are. `lr[s][i]` is the LR file of HR image i at scale s, or None (made);
    `skipped`: the other files in the image folder, each with why it is not read."""

    root: Path
    hr: list[Path]
    lr: dict[int, list[Path | None]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def lr_candidates(hr: Path, scale: int, folders: Sequence[Path]) -> Path | None:
    """The LR file of `hr` at `scale` in the first folder that has one: <stem>x{s}<ext> or <stem><ext>."""
    suffixes = [hr.suffix] + [s for s in ('.png',) if s != hr.suffix]
    for folder in folders:
        for name in (f'{hr.stem}x{scale}', hr.stem):
            for suffix in suffixes:
                path = folder / f'{name}{suffix}'
                if path.is_file():
                    return path
    return None


def scale_folders(base: Path, scale: int) -> list[Path]:
    """LR folders of one scale under `base`: X{s} (EDSR) and x{s} (MSNLAN README)."""
    return [base / f'X{scale}', base / f'x{scale}']


def pair_lr(hr: list[Path], scales: Sequence[int],
            folders: Callable[[int], Sequence[Path]]) -> dict[int, list[Path | None]]:
    """{scale: [LR file or None per HR image]}, looking in folders(scale)."""
    return {s: [lr_candidates(h, s, folders(s)) for h in hr] for s in scales}


class SRData(Dataset):
    """HR/LR pairs of one dataset, for training (random patches) or testing (whole images)."""

    has_gt = True
    decode_cache = True  # Benchmark turns this off: published test sets are read as images

    def __init__(self, args: Any, name: str, train: bool = True, log: Callable[[str], None] = print) -> None:
        self.name = name
        self.train = train
        self.flag = '--data_train' if train else '--data_test'
        self.scales = [int(s) for s in args.scale]
        self.idx_scale = 0
        self.n_colors = int(args.n_colors)
        self.rgb_range = float(args.rgb_range)
        self.patch_size = int(args.patch_size)
        self.augment = not args.no_augment

        layout = self._scan(args)
        self.root = layout.root
        self.hr_files = list(layout.hr)
        self.lr_files = {s: list(layout.lr.get(s, [None] * len(self.hr_files))) for s in self.scales}
        if not self.hr_files:
            raise UserError(f'{self.flag} {name}: no images in {self.root}')
        if layout.skipped:
            log(common.skip_note(name, layout.skipped))
        self.bin_dir = self._bin_dir(args, log)
        self.use_decode_cache = args.ext.startswith('sep') and self.decode_cache
        self.cache_ok = True

        self._check_sizes(log)
        self._prepare_cache(reset=args.ext == 'sep_reset', log=log)
        if train:
            # Published epoch bookkeeping: each training set repeats to about batch*test_every/len(sets) items.
            n_patches = args.batch_size * args.test_every
            n_images = len(args.data_train) * len(self.hr_files)
            self.repeat = max(n_patches // n_images, 1)

    # --- layout -------------------------------------------------------------------------------------
    def _scan(self, args: Any) -> Layout:
        raise NotImplementedError

    @property
    def scale(self) -> list[int]:  # the published attribute name
        return self.scales

    def _bin_dir(self, args: Any, log: Callable[[str], None]) -> Path:
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        dir_cache = args.dir_cache
        if dir_cache:
            return Path(dir_cache) / f'{self.name}-{digest}'
        if writable(self.root / 'bin'):
            return self.root / 'bin'
        # A read-only dataset folder (e.g. shared reference data) keeps its cache in the user's cache dir.
        base = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'sr-data-cache'
        log(f'{self.name}: {self.root} is read-only; caching under {base / f"{self.name}-{digest}"}')
        return base / f'{self.name}-{digest}'

    def _cache_path(self, src: Path) -> Path:
        try:
            rel = src.relative_to(self.root)
        except ValueError:
            rel = Path(src.name)
        return self.bin_dir / rel.with_suffix('.npy')

    def _made_path(self, i: int, scale: int) -> Path:
        return self.bin_dir / 'LR_bicubic_made' / f'X{scale}' / f'{self.hr_files[i].stem}x{scale}.npy'

    # --- checks ---------------------------------------------------------------------------------------
    def _check_sizes(self, log: Callable[[str], None]) -> None:
        keep = []
        too_small = []
        gray = set()
        sizes = []
        for i, hr in enumerate(self.hr_files):
            h, w, is_gray = common.image_header(hr)
            sizes.append((h, w))
            if is_gray:
                gray.add(hr.stem)
            for s in self.scales:
                lr = self.lr_files[s][i]
                if lr is None:
                    if h < s or w < s:
                        raise UserError(f'{hr}: HR image {w}x{h} is smaller than --scale {s}')
                    continue
                lh, lw = common.image_size(lr)
                if (lh, lw) != (h // s, w // s):
                    raise UserError(f'{lr}: LR image is {lw}x{lh} but HR {hr} is {w}x{h}, '
                                    f'so x{s} LR must be {w // s}x{h // s}')
            if self.train and min(h, w) < self.patch_size:
                too_small.append((hr, f'{w}x{h}'))
                continue
            keep.append(i)
        self.gray_stems = frozenset(gray)
        # HR (height, width) per image: what evaluation work an image costs, for sharding a test set.
        self.hr_sizes = [sizes[i] for i in keep]
        if too_small:
            if not keep:
                raise UserError(f'{self.flag} {self.name}: every image in {self.root} is smaller than '
                                f'--patch_size {self.patch_size}')
            log(common.skip_note(self.name, too_small, f'of {len(self.hr_files)} images smaller than '
                                                       f'--patch_size {self.patch_size}'))
            self.hr_files = [self.hr_files[i] for i in keep]
            self.lr_files = {s: [v[i] for i in keep] for s, v in self.lr_files.items()}

    # --- cache ------------------------------------------------------------------------------------------
    def _jobs(self, i: int) -> list[tuple[Path, list[Path], Callable[[], np.ndarray]]]:
        """(cache file, its sources, how to build it) for HR image i, HR first."""
        hr = self.hr_files[i]
        jobs: list[tuple[Path, list[Path], Callable[[], np.ndarray]]] = []
        if self.use_decode_cache:
            jobs.append((self._cache_path(hr), [hr], lambda: common.read_image(hr)))
        for s in self.scales:
            lr = self.lr_files[s][i]
            if lr is None:
                jobs.append((self._made_path(i, s), [hr], lambda s=s: self._make_lr(i, s)))
            elif self.use_decode_cache:
                jobs.append((self._cache_path(lr), [lr], lambda lr=lr: common.read_image(lr)))
        return jobs

    def _prepare_cache(self, reset: bool, log: Callable[[str], None]) -> None:
        todo = []
        for i in range(len(self.hr_files)):
            for path, sources, build in self._jobs(i):
                problem = None if reset else cache.check(path, sources)
                if reset or problem is not None:
                    todo.append((path, problem, build))
        if not todo:
            return
        log(f'{self.name}: writing {len(todo)} cache file(s) under {self.bin_dir}')
        for path, problem, build in todo:
            try:
                cache.rebuild(path, problem, build)
            except OSError as exc:
                log(f'{self.name}: cannot write the cache under {self.bin_dir} ({type(exc).__name__}); decoding '
                    'images on every read instead')
                self.cache_ok = False
                return

    # --- reading --------------------------------------------------------------------------------------
    def _hr(self, i: int) -> np.ndarray:
        src = self.hr_files[i]
        if self.use_decode_cache and self.cache_ok:
            return cache.load(self._cache_path(src), [src], lambda: common.read_image(src))
        return common.read_image(src)

    def _make_lr(self, i: int, scale: int) -> np.ndarray:
        hr = self._hr(i)
        h, w = hr.shape[0] // scale, hr.shape[1] // scale
        # output_shape pins the size to HR // s (ceil(h*s / s) could round up in floating point)
        return imresize(np.ascontiguousarray(hr[:h * scale, :w * scale]), 1 / scale, output_shape=(h, w))

    def _lr(self, i: int, si: int) -> np.ndarray:
        s = self.scales[si]
        src = self.lr_files[s][i]
        if src is None:
            if self.cache_ok:
                return cache.load(self._made_path(i, s), [self.hr_files[i]], lambda: self._make_lr(i, s))
            return self._make_lr(i, s)
        if self.use_decode_cache and self.cache_ok:
            return cache.load(self._cache_path(src), [src], lambda: common.read_image(src))
        return common.read_image(src)

    def _tensors(self, lr: np.ndarray, hr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (common.to_tensor(common.set_channel(lr, self.n_colors), self.rgb_range),
                common.to_tensor(common.set_channel(hr, self.n_colors), self.rgb_range))

    # --- Dataset protocol -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.hr_files) * self.repeat if self.train else len(self.hr_files)

    def __getitem__(self, key: int | tuple[int, int, int]) -> common.TrainItem | common.TestItem:
        if self.train:
            i, si, seed = key if isinstance(key, tuple) else (key, self.idx_scale, None)
            return self.train_item(int(i) % len(self.hr_files), int(si), seed)
        return self.test_item(int(key))

    def train_item(self, i: int, si: int, seed: int | None) -> common.TrainItem:
        """Random aligned patches of image i at scale index si."""
        rng = np.random.default_rng(seed)
        lr, hr = common.get_patch(self._lr(i, si), self._hr(i), self.patch_size, self.scales[si], rng)
        if self.augment:
            lr, hr = common.augment(lr, hr, rng)
        return common.TrainItem(*self._tensors(lr, hr), si)

    def test_item(self, i: int) -> common.TestItem:
        """The whole LR image at the current scale, HR cropped to match, and the HR file's stem."""
        s = self.scales[self.idx_scale]
        lr = self._lr(i, self.idx_scale)
        hr = self._hr(i)[:lr.shape[0] * s, :lr.shape[1] * s]
        return common.TestItem(*self._tensors(lr, hr), self.hr_files[i].stem)

    def is_gray(self, filename: str) -> bool:
        """Whether the HR image `filename` (a stem, as in test items) is grayscale in its file: metrics
        compare such images on their single channel, not on the luma of the 3 replicated channels."""
        return filename in self.gray_stems

    def set_scale(self, idx_scale: int) -> None:
        if not 0 <= idx_scale < len(self.scales):
            raise IndexError(f'{self.name}: scale index {idx_scale} out of range for scales {self.scales}')
        self.idx_scale = idx_scale


def writable(path: Path) -> bool:
    """Whether files can be created at `path` (or its nearest existing parent). A folder without any
    write permission bit counts as read-only even for root, who could write there anyway."""
    while not path.exists() and path.parent != path:
        path = path.parent
    mode = path.stat().st_mode
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def find_dataset_dir(dir_data: str, name: str, subdirs: Sequence[str]) -> list[Path]:
    """Candidate folders <dir_data>/<sub>/<name> in order (sub '' = <dir_data>/<name>); a folder whose
    name differs only in case also counts, so `--data_test set5` finds Set5."""
    found = []
    for sub in subdirs:
        parent = Path(dir_data) / sub if sub else Path(dir_data)
        exact = parent / name
        if exact.is_dir():
            found.append(exact)
            continue
        try:
            matches = sorted(e.path for e in os.scandir(parent) if e.is_dir() and e.name.lower() == name.lower())
        except OSError:
            matches = []
        found.extend(Path(m) for m in matches[:1])
    return found
