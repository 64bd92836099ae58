"""Atomic file writes: every file a later run reads goes to a temporary name first, then is renamed.

A write that fails (a full disk, an I/O error, a read-only folder) leaves the previous file intact and is
reported as one line naming the file and the OS error (WriteError). The file gets the mode a plain open()
would give it: a new file 0666 less the process's umask, a replaced file its previous mode (the temporary
file itself is created 0600).

Fault injection for the tests and benchmarks/faults.py: SR_FAULT=<file name>:<step>:<action>, read at each
write, makes the write of that file pause or fail at a named step: `open` (before the temporary file is
created), `written` (data written, before fsync), `renamed` (after the rename). Actions: `kill` (SIGKILL
itself), `pause` (sleep until killed), `enospc` / `eio` (raise that OS error). Under torchrun it acts in
the first worker group only (TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted group runs through.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nlsr.errors import UserError

FAULT_VAR = 'SR_FAULT'
FAULT_STEPS = ('open', 'written', 'renamed')
FAULT_ACTIONS = ('kill', 'pause', 'enospc', 'eio')


class WriteError(UserError, OSError):
    """A file could not be written: the message names it and the OS error. It is an OSError too, so a
    caller that can do without the file (the image cache) still goes on."""


def inject_fault(path: Path, step: str, spec: str | None = None) -> None:
    """Act on SR_FAULT (or `spec`) when it names `path`'s file name and `step`; otherwise nothing."""
    if spec is None:
        restarted = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') not in ('', '0')
        spec = '' if restarted else os.environ.get(FAULT_VAR, '')
    parts = spec.rsplit(':', 2)
    if len(parts) != 3 or parts[:2] != [path.name, step]:
        return
    action = parts[2]
    if action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == 'pause':
        while True:
            time.sleep(60)
    elif action in ('enospc', 'eio'):
        code = errno.ENOSPC if action == 'enospc' else errno.EIO
        raise OSError(code, os.strerror(code), str(path))


def process_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere set and restored."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_open_mode(path: Path) -> int:
    """The permission bits open(path, 'w') would leave: the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~process_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync, then rename it onto `path`.

    A run killed part-way leaves either the old file or the new one, never a half-written one. An OSError
    on the way removes the temporary file and raises WriteError (the old file is untouched).
    """
    path = Path(path)
    try:
        inject_fault(path, 'open')
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    except OSError as e:
        raise WriteError(f'{path}: cannot write ({e.strerror or e})') from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            inject_fault(path, 'written')
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), plain_open_mode(path))
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = _os_error(e)
        if cause is not None:
            raise WriteError(f'{path}: cannot write ({cause.strerror or cause})') from e
        raise
    inject_fault(path, 'renamed')


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (torch.save wraps the file object's errors in a RuntimeError), or None."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
