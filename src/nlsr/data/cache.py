"""The decoded-image cache: one .npy file per image, written atomically, read memory-mapped.

A cache file is used only when it is at least as new as every file it was made from and opens as a
uint8 HxWxC array whose size matches its header; otherwise it is rebuilt, with a one-line warning
(logger `nlsr.data.cache`) when it existed (stale, truncated or otherwise unreadable). Writes go through
`fileio.atomic_write` (temporary file + rename), so a killed run leaves either the old cache or the new
one, never a half-written file, and concurrent processes (DataLoader workers, DDP ranks) may rebuild the
same file safely.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nlsr.fileio import atomic_write

log = logging.getLogger(__name__)


def save(path: Path, array: np.ndarray) -> None:
    """Write `array` as .npy atomically (np.save into the temporary file object)."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def open_array(path: Path) -> np.ndarray:
    """Memory-map a cached image; raises (OSError/ValueError/EOFError) when missing or broken."""
    arr = np.load(path, mmap_mode='r', allow_pickle=False)  # np.memmap checks the file holds the data
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f'expected a uint8 HxWx1 or HxWx3 array, found {arr.dtype} {arr.shape}')
    return arr


def check(path: Path, sources: Sequence[Path]) -> str | None:
    """Why `path` cannot be used ('' when it does not exist), or None when it is good."""
    try:
        mtime = path.stat().st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file stands where a folder would
        return ''
    for src in sources:
        if os.stat(src).st_mtime_ns > mtime:
            return f'older than {src}'
    try:
        open_array(path)
    except Exception as exc:  # truncated, garbled header, wrong content: all mean "rebuild"
        return f'unreadable ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ""})'
    return None


def rebuild(path: Path, problem: str | None, build: Callable[[], np.ndarray]) -> None:
    """Write `build()` to `path`, warning first when an old file was there (`problem`: what `check` said);
    OSError when the folder cannot be written."""
    if problem:
        log.warning('%s: cache %s; rebuilding it', path, problem)
    save(path, build())


def load(path: Path, sources: Sequence[Path], build: Callable[[], np.ndarray]) -> np.ndarray:
    """The cached array, memory-mapped; rebuilt first (with a warning) when it has gone bad since checked."""
    try:
        return open_array(path)
    except Exception as exc:  # removed or damaged while running: rebuild and go on
        if path.exists():
            log.warning('%s: cache unreadable (%s); rebuilding it', path, type(exc).__name__)
        array = build()
        try:
            save(path, array)
        except OSError:  # cannot write here: serve the rebuilt array anyway
            pass
        return array
