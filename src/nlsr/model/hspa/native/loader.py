"""Build and load the native CPU kernels of the blocked HSPA (hspa_kernel.c beside this file) through ctypes.

The C file (with the headers it includes) is compiled once per machine with the system C compiler
(``$CC`` or ``cc``) for the host CPU and cached as ``<cache>/hspan/hspa_kernel-<hash>.so``, where
``<cache>`` is ``$XDG_CACHE_HOME`` or ``~/.cache`` (a temporary folder when that is not writable). The hash
covers the sources, the flags and the CPU's feature list, so a shared home directory never serves a
library built for another CPU. The library is written under a temporary name and renamed, so concurrent
processes (torchrun) are safe. When no compiler works, ``load()`` returns None and ``unavailable_reason()``
says why. Where torch runs on GNU OpenMP the library is built with -fopenmp and runs on torch's threads
(``torch_uses_libgomp``); elsewhere it keeps a pool of its own.

``load(march)`` builds for another target instead (``'x86-64-v3'``: AVX2 without AVX-512), as a separate
library. ``choose_tiles`` sizes the fused kernel's tiles from the vector width of the build and the cache
sizes of the machine (read once from /sys, else from the C library).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name('hspa_kernel.c')
HEADERS = tuple(Path(__file__).with_name(name)  # the files SOURCE includes
                for name in ('hspa_args.h', 'hspa_pool.h', 'hspa_backward.h', 'hspa_score.h', 'hspa_screen.h'))
# -fassociative-math (with the flags it requires) lets the compiler vectorise the masked sums.
_FLAGS = ['-O3', '-fno-math-errno', '-fno-trapping-math', '-fno-signed-zeros', '-fassociative-math',
          '-shared', '-fPIC', '-pthread']
_NATIVE = ['-march=native']

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int


class AttendArgs(ctypes.Structure):
    """hspa_attend's arguments: hspa_args.h's hspa_attend_args, field by field (pointers: data addresses or
    None; integers: int64)."""

    _fields_ = [(name, _p if name in ('q', 'kp', 'v', 'out', 'kp16', 'keys', 'kbounds', 'sup_cols', 'sup_vals',
                                      'start', 'nnz', 'total') else _i64)
                for name in ('q', 'kp', 'rows', 'length', 'kwidth', 'v', 'width', 'out', 'block_rows', 'tile_rows',
                             'key_tile', 'screen', 'kp16', 'keys', 'kbounds', 'sup_cols', 'sup_vals', 'capacity',
                             'start', 'nnz', 'total', 'n_threads')]


class GradRowsArgs(ctypes.Structure):
    """hspa_grad_rows' arguments: hspa_args.h's hspa_grad_rows_args, field by field."""

    _fields_ = [(name, _p if name in ('start', 'nnz', 'cols', 'g', 'v', 'k', 'ds', 'dq') else _i64)
                for name in ('start', 'nnz', 'cols', 'rows', 'g', 'v', 'width', 'k', 'kwidth', 'ds', 'dq',
                             'n_threads')]


class GradKeysArgs(ctypes.Structure):
    """hspa_grad_keys' arguments: hspa_args.h's hspa_grad_keys_args, field by field."""

    _fields_ = [(name, _p if name in ('start', 'nnz', 'cols', 'vals', 'ds', 'q', 'g', 'dk', 'dv') else _i64)
                for name in ('start', 'nnz', 'cols', 'vals', 'ds', 'rows', 'length', 'q', 'kwidth', 'g', 'width',
                             'dk', 'dv', 'n_threads')]


_SIGNATURES = {
    'hspa_pack_keys': (None, [_p, _i64, _i64, _p]),
    'hspa_attend': (_int, [ctypes.POINTER(AttendArgs)]),
    'hspa_grad_rows': (None, [ctypes.POINTER(GradRowsArgs)]),
    'hspa_grad_keys': (_int, [ctypes.POINTER(GradKeysArgs)]),
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


def torch_uses_libgomp() -> bool:
    """Whether torch runs its threads on GNU OpenMP (its libgomp.so.1 is loaded in this process). A library
    built with -fopenmp then binds to that same runtime by its soname, so the kernels run on torch's threads,
    which are awake after torch's own operations, instead of on threads of their own that compete with them."""
    try:
        maps = Path('/proc/self/maps').read_text()
    except OSError:
        return False
    return any(line.rstrip().endswith('/libgomp.so.1') for line in maps.splitlines())


@functools.cache
def _build(march: str | None = None, openmp: bool | None = None) -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get('CC') or 'cc'
    if shutil.which(compiler) is None:
        return None, f'no C compiler found ({compiler!r} is not on PATH; set CC)'
    errors = []
    target_flags = [_FLAGS + _NATIVE, _FLAGS] if march is None else [_FLAGS + [f'-march={march}']]
    if openmp or (openmp is None and torch_uses_libgomp()):
        target_flags.insert(0, target_flags[0] + ['-fopenmp'])
    for flags in target_flags:
        text = b''.join(path.read_bytes() for path in (SOURCE, *HEADERS))
        key = hashlib.sha256(text + ' '.join([compiler, *flags, _cpu_id()]).encode())
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
        lib.hspa_vector_bytes.restype, lib.hspa_vector_bytes.argtypes = _int, []
        lib.hspa_screens.restype, lib.hspa_screens.argtypes = _int, []
        if lib.hspa_screens():
            lib.hspa_pack_keys_bf16.restype, lib.hspa_pack_keys_bf16.argtypes = None, [_p, _i64, _i64, _p, _p]
        lib.hspa_cache_sizes.restype, lib.hspa_cache_sizes.argtypes = None, [_p, _p]
        threads = "torch's OpenMP threads" if '-fopenmp' in flags else 'its own thread pool'
        return lib, f'native CPU kernel {target}, on {threads}'
    return None, f'compiling {SOURCE.name} failed: {errors[-1]}'


def load(march: str | None = None, openmp: bool | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built (see unavailable_reason). ``march``:
    build for that ``-march`` target instead of the host CPU (benchmarks of other instruction sets).
    ``openmp``: False builds the library with its own thread pool even where torch runs on GNU OpenMP (None:
    OpenMP exactly there)."""
    return _build(march, openmp)[0]


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


@dataclass(frozen=True)
class Tiles:
    """The fused kernel's blocking: query rows a thread scores and thresholds at a time (``block_rows``),
    rows of its register micro-kernel (``tile_rows``, one of TILE_ROWS) and keys per panel (``key_tile``,
    a multiple of the column tile); and whether float32 scores are screened with bf16 products first
    (``screen``: 0 never, 1 the blocks where it pays, 2 every block; only where ``screens(lib)``)."""

    block_rows: int
    tile_rows: int
    key_tile: int
    screen: int = 0


TILE_ROWS = (4, 6, 8, 12)  # the micro-kernels hspa_kernel.c has
_SCREEN_PRODUCTS = 2**15  # products a row needs (length x kwidth) for the bf16 screen to be worth its set-up
_LINE = 64


def screens(lib: ctypes.CDLL) -> bool:
    """Whether the library's float32 kernel can screen its scores with bf16 products (AVX512-BF16)."""
    return bool(lib.hspa_screens())


def column_tile(lib: ctypes.CDLL, dtype: torch.dtype) -> int:
    """Keys per micro-kernel tile: two vectors of the build."""
    return 2 * lib.hspa_vector_bytes() // (8 if dtype == torch.float64 else 4)


def _sysfs_cache(level: int, kinds: tuple[str, ...]) -> int:
    for index in sorted(Path('/sys/devices/system/cpu/cpu0/cache').glob('index*')):
        try:
            if int((index / 'level').read_text()) == level and (index / 'type').read_text().strip() in kinds:
                size = re.fullmatch(r'(\d+)([KMG]?)', (index / 'size').read_text().strip())
                if size:
                    return int(size[1]) * {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30}[size[2]]
        except (OSError, ValueError):
            continue
    return 0


@functools.cache
def cache_sizes() -> tuple[int, int]:
    """(L1 data, L2) bytes of one core: /sys on Linux, else the C library's sysconf, else 32 KiB and 1 MiB."""
    l1d, l2 = _sysfs_cache(1, ('Data',)), _sysfs_cache(2, ('Unified', 'Data'))
    lib = load()
    if (not l1d or not l2) and lib is not None:
        a, b = ctypes.c_int64(0), ctypes.c_int64(0)
        lib.hspa_cache_sizes(ctypes.byref(a), ctypes.byref(b))
        l1d, l2 = l1d or a.value, l2 or b.value
    return l1d or 32 * 2**10, l2 or 2**20


def choose_tiles(length: int, kwidth: int, element_size: int, vector_bytes: int, l1d: int, l2: int,
                 bf16: bool = False) -> Tiles:
    """Tiles for one sample of ``length`` keys of ``kwidth`` channels.

    tile_rows: the most rows whose 2 x tile_rows accumulators, two key vectors and a broadcast query fit the
    vector registers (32 with AVX-512 and on aarch64, else 16). key_tile: a panel of packed keys takes an
    eighth of the L2 cache (it is read once per block from memory, then from L2 by every row tile).
    block_rows: the block's score rows fill at most half the L2 cache, so the threshold passes read them
    from there, and its packed queries at most half the L1 data cache; at least one row tile. screen: 1
    (the kernel screens the blocks where it pays) for float32 where the library has bf16 products
    (``bf16``) and rows are long enough, else 0.
    """
    registers = 32 if vector_bytes == 64 or platform.machine().lower() in ('aarch64', 'arm64') else 16
    tile_rows = max(r for r in TILE_ROWS if 2 * r + 3 <= registers)
    lanes = 2 * vector_bytes // element_size
    key_tile = max(lanes, (l2 // 8) // (kwidth * element_size) // lanes * lanes)
    padded = -(-length // lanes) * lanes
    rows = min((l2 // 2) // ((padded + _LINE // element_size) * element_size),
               (l1d // 2) // (kwidth * element_size))
    block_rows = max(tile_rows, rows // tile_rows * tile_rows)
    # Screening saves about 40% of a row's length x kwidth products and costs a few hundred cycles a row:
    # it pays on long rows (the quick demo's 24x24 patches, 576 x 24, are scored in float32).
    screen = int(bf16 and element_size == 4 and length * kwidth >= _SCREEN_PRODUCTS)
    return Tiles(block_rows, tile_rows, key_tile, screen)


def tiles_for(lib: ctypes.CDLL, length: int, kwidth: int, dtype: torch.dtype) -> Tiles:
    """choose_tiles for this machine's caches and the library's vector width."""
    return choose_tiles(length, kwidth, 8 if dtype == torch.float64 else 4, lib.hspa_vector_bytes(),
                        *cache_sizes(), bf16=screens(lib))
