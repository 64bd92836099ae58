"""Build and load the native CPU kernels of the blocked HSPA (hspa_kernel.c beside this file) through ctypes.

The C file is compiled once per machine with the system C compiler (``$CC`` or ``cc``) for the host CPU
and cached as ``<cache>/hspan/hspa_kernel-<hash>.so``, where ``<cache>`` is ``$XDG_CACHE_HOME`` or
``~/.cache`` (a temporary folder when that is not writable). The hash covers the source, the flags and
the CPU's feature list, so a shared home directory never serves a library built for another CPU. The
library is written under a temporary name and renamed, so concurrent processes (torchrun) are safe.
When no compiler works, ``load()`` returns None and ``unavailable_reason()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name('hspa_kernel.c')
# -fassociative-math (with the flags it requires) lets the compiler vectorise the masked sums.
_FLAGS = ['-O3', '-fno-math-errno', '-fno-trapping-math', '-fno-signed-zeros', '-fassociative-math',
          '-shared', '-fPIC', '-pthread']
_NATIVE = ['-march=native']

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_SIGNATURES = {
    'hspa_threshold': (None, [_p, _i64, _i64, _p, _p, _int]),
    'hspa_gather': (None, [_p, _i64, _i64, _p, _p, _p, _p, _p, _i64, _p, _int]),
    'hspa_attend': (_int, [_p, _p, _i64, _i64, _i64, _p, _i64, _p, _int]),
    'hspa_grad_rows': (None, [_p, _p, _i64, _p, _p, _i64, _p, _i64, _p, _p, _int]),
    'hspa_grad_keys': (_int, [_p, _p, _p, _p, _i64, _i64, _p, _i64, _p, _i64, _p, _p, _int]),
}


def _cpu_id() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith(('flags', 'Features')):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'hspan'
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f'hspan-{os.getuid() if hasattr(os, "getuid") else "user"}'
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Compile SOURCE to ``target`` atomically; returns the compiler's complaint on failure."""
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), '-o', tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip().splitlines()[-1] if (done.stderr or done.stdout) \
                else f'{compiler} exited with {done.returncode}'
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get('CC') or 'cc'
    if shutil.which(compiler) is None:
        return None, f'no C compiler found ({compiler!r} is not on PATH; set CC)'
    errors = []
    for flags in (_FLAGS + _NATIVE, _FLAGS):
        key = hashlib.sha256(SOURCE.read_bytes() + ' '.join([compiler, *flags, _cpu_id()]).encode())
        target = _cache_dir() / f'hspa_kernel-{key.hexdigest()[:16]}.so'
        if not target.exists():
            err = _compile(compiler, flags, target)
            if err is not None:
                errors.append(err)
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as e:
            errors.append(str(e))
            continue
        for name, (restype, argtypes) in _SIGNATURES.items():
            for suffix in ('f32', 'f64'):
                fn = getattr(lib, f'{name}_{suffix}')
                fn.restype, fn.argtypes = restype, argtypes
        return lib, f'native CPU kernel {target}'
    return None, f'compiling {SOURCE.name} failed: {errors[-1]}'


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built (see unavailable_reason)."""
    return _build()[0]


def unavailable_reason() -> str:
    """Why load() returns None ('' when it does not)."""
    lib, why = _build()
    return '' if lib is not None else why


def describe() -> str:
    """Where the kernel comes from, or why it is unavailable."""
    return _build()[1]


def function(lib: ctypes.CDLL, name: str, dtype: torch.dtype):
    """The kernel ``name`` for float32 or float64 tensors."""
    return getattr(lib, f'{name}_{"f64" if dtype == torch.float64 else "f32"}')


def ptr(t: torch.Tensor | None) -> int | None:
    """Address of a contiguous CPU tensor's data (None for a missing output)."""
    if t is None:
        return None
    if not t.is_contiguous() or t.device.type != 'cpu':
        raise ValueError('HSPA kernels need contiguous CPU tensors')
    return t.data_ptr()
