"""The native kernel's tile configurations, its AVX2 build and its thread pool (src/nlsr/model/hspa/native/) against
the sort-based oracle of tests/oracles.py."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import signal
import time

import pytest
import torch

from nlsr.model.hspa import native
from nlsr.model.hspa.blocked import _Inputs, _Native
from oracles import TOL, features, hspa_ref, inference_inputs, rel


def _inference_with(lib, q, k, v, tiles):
    """The native inference kernel of ``lib`` with the blocking ``tiles`` forced."""
    return _Native(_Inputs(q, k, v, 0), lib, tiles=tiles).forward(0)[0]


def _training_with(lib, q, k, v, grad, tiles, entries=None, keep=2**30):
    """Output and (dq, dk, dv) of the native training path with ``tiles``: supports kept from forward, or
    (keep=0) recomputed in backward."""
    kernels = _Native(_Inputs(q, k, v, 0), lib, entries=entries, tiles=tiles)
    out, supports = kernels.forward(keep)
    assert all((part is not None) == (keep > 0) for part in supports)
    return out, _Native(_Inputs(q, k, v, 0), lib, grad, tiles=tiles).backward(supports, (True, True, True))


def _oracle_with_grads(q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = hspa_ref(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad)


def _screen_modes(lib, dtype: torch.dtype) -> tuple[int, ...]:
    """Tiles.screen values the library has for dtype: bf16 screening (2: every block) for float32 where the
    CPU has AVX512-BF16, and float32 scores (0)."""
    return (0, 2) if dtype == torch.float32 and native.screens(lib) else (0,)


def _forced_tiles(lib, dtype: torch.dtype, length: int) -> list:
    """Every micro-kernel (float32 and, where the library has it, bf16 screening), with blocks of one row, one
    row tile, a ragged count and more rows than the sample, and key panels of one column tile, several, and
    more keys than the sample."""
    lanes = native.column_tile(lib, dtype)
    return [native.Tiles(block, rows, panel, screen)
            for screen in _screen_modes(lib, dtype)
            for rows in native.TILE_ROWS
            for block in (1, rows, 2 * rows + 1, length + 5)
            for panel in (lanes, 3 * lanes, -(-length // lanes) * lanes + lanes)]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('case', ['ties', 'mixed'])
def test_every_tile_configuration_is_exact(case, dtype):
    # Each tile configuration the fused kernel has, forced, against the sort-based oracle.
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    q, k, v = inference_inputs(case, dtype)
    ref = hspa_ref(q, k, v)
    tol = TOL if dtype == torch.float32 else 1e-12
    for tiles in _forced_tiles(lib, dtype, q.shape[1]):
        assert rel(_inference_with(lib, q, k, v, tiles), ref) <= tol, tiles


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_every_tile_configuration_is_exact_with_supports(dtype):
    # The training path (the fused kernel writing every row's support, then backward on those supports)
    # with each tile configuration forced, against the oracle's output and gradients.
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    # 600 keys: two 16-vector groups and a ragged tail in float32 with AVX-512, so the subset bound is used.
    q, k, v = features(1, 600, 6, 5, scale=1.0, seed=9)
    q = q * torch.logspace(-3, 1, 600)[:, None]  # supports from one entry to most of the row
    q, k, v = (t.to(dtype) for t in (q, k, v))
    grad = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref, ref_grads = _oracle_with_grads(q, k, v, grad)
    tol = TOL if dtype == torch.float32 else 1e-12
    for tiles in _forced_tiles(lib, dtype, q.shape[1]):
        for keep in (2**30, 0) if tiles.block_rows == tiles.tile_rows else (2**30,):  # kept; recomputed
            out, grads = _training_with(lib, q, k, v, grad, tiles, keep=keep)
            assert rel(out, ref) <= tol, (tiles, keep)
            for mine, theirs in zip(grads, ref_grads, strict=True):
                assert rel(mine, theirs) <= tol, (tiles, keep)


def test_support_buffer_grows_to_what_a_block_needs():
    # Supports of most of the row, far beyond the buffer's first size (128 entries a row): the kernel reports
    # what the block needs, the block runs again in a larger buffer, and the result is exact.
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    q, k, v = inference_inputs('compressed', torch.float32)   # supports of most of the row
    grad = torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
    ref, ref_grads = _oracle_with_grads(q, k, v, grad)
    small = (torch.empty(10, dtype=torch.int32), torch.empty(10))
    out, grads = _training_with(lib, q, k, v, grad, native.tiles_for(lib, q.shape[1], q.shape[2], q.dtype), small)
    assert rel(out, ref) <= TOL
    for mine, theirs in zip(grads, ref_grads, strict=True):
        assert rel(mine, theirs) <= TOL


def _screening_lib():
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    if not native.screens(lib):
        pytest.skip('the kernel was built for a CPU without AVX512-BF16: no bf16 screening')
    return lib


def _tiles_with_screen(lib, q, screen: int):
    t = native.tiles_for(lib, q.shape[1], q.shape[2], q.dtype)
    return native.Tiles(t.block_rows, t.tile_rows, t.key_tile, screen)


def test_tiles_screen_float32_only_where_the_library_can():
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    assert native.tiles_for(lib, 9216, 24, torch.float32).screen == int(native.screens(lib))
    assert native.tiles_for(lib, 9216, 24, torch.float64).screen == 0
    assert native.tiles_for(lib, 576, 24, torch.float32).screen == 0  # short rows: not worth screening
    q, k, v = features(1, 100, 4, 3, scale=1.0)
    forced = native.Tiles(8, native.TILE_ROWS[0], native.column_tile(lib, torch.float64), 2)
    with pytest.raises(ValueError, match='no tile configuration'):  # float64 scores are never screened
        _inference_with(lib, q.double(), k.double(), v.double(), forced)


def test_screening_keeps_every_entry_within_its_error_of_the_threshold():
    # Keys 1000 + small integers, which bf16 rounds by up to 2, and queries of sixteenths summing to zero: the
    # float32 scores are exact and a few units apart, the screened ones off by about as much. Every entry
    # near the threshold must be scored again in float32 (with no margin the result is off by 0.6).
    lib = _screening_lib()
    gen = torch.Generator().manual_seed(6)
    q = torch.randint(-3, 4, (2, 900, 8), generator=gen).float()
    q[..., 7] = -q[..., :7].sum(-1)
    q = q / 16
    k = 1000 + torch.randint(-6, 7, (2, 900, 8), generator=gen).float()
    v = torch.randn(2, 900, 5, generator=gen)
    ref = hspa_ref(q.double(), k.double(), v.double())
    for screen in (1, 2):
        assert rel(_inference_with(lib, q, k, v, _tiles_with_screen(lib, q, screen)), ref) <= TOL, screen


@pytest.mark.parametrize('screen', [0, 2])
@pytest.mark.parametrize('keep', [0, 2**30])
def test_nan_scores_give_nan_rows_and_leave_the_others_exact(keep, screen):
    # A NaN query row gives that output row NaN; a NaN key gives every row of its sample NaN (as sparsemax
    # over the whole row does); every other row stays exact. 1100 keys: groups of maxima and a ragged tail.
    # With bf16 screening (screen 2), rows and samples with a NaN are scored in float32 alone.
    lib = _screening_lib() if screen else native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    q, k, v = features(2, 1100, 6, 5, scale=1.0, seed=3)
    ref = hspa_ref(q, k, v)
    q, k = q.clone(), k.clone()
    q[0, 17, 2] = float('nan')
    k[1, 1099, 0] = float('nan')  # in the ragged tail
    tiles = _tiles_with_screen(lib, q, screen)
    out = _Native(_Inputs(q, k, v, 0), lib, tiles=tiles).forward(keep)[0]
    assert torch.isnan(out[0, 17]).all() and torch.isnan(out[1]).all()
    rows = torch.arange(1100) != 17
    assert not torch.isnan(out[0, rows]).any()
    assert rel(out[0, rows], ref[0, rows]) <= TOL
    k[1, 1099, 0] = 0.0
    k[1, 300, 4] = float('nan')  # inside a group of maxima
    assert torch.isnan(_Native(_Inputs(q, k, v, 0), lib, tiles=tiles).forward(keep)[0][1]).all()


def test_chosen_tiles_are_configurations_the_kernel_has():
    # Over a range of caches, vector widths and shapes, choose_tiles only picks what the kernel implements,
    # and sizes the blocks to the caches it is given.
    for vector_bytes in (16, 32, 64):
        for l1d in (16 * 2**10, 32 * 2**10, 48 * 2**10, 64 * 2**10):
            for l2 in (256 * 2**10, 2**20, 2 * 2**20, 4 * 2**20):
                for length, kwidth, elem in ((100, 8, 4), (2304, 96, 4), (16384, 96, 4), (16384, 24, 8)):
                    t = native.choose_tiles(length, kwidth, elem, vector_bytes, l1d, l2)
                    lanes = 2 * vector_bytes // elem
                    assert t.tile_rows in native.TILE_ROWS and t.key_tile % lanes == 0 and t.key_tile >= lanes
                    assert t.block_rows % t.tile_rows == 0 and t.block_rows >= t.tile_rows
                    padded = -(-length // lanes) * lanes
                    if t.block_rows > t.tile_rows:
                        assert t.block_rows * padded * elem <= l2 // 2 and t.block_rows * kwidth * elem <= l1d // 2
    assert native.choose_tiles(16384, 96, 4, 32, 32 * 2**10, 2**20).tile_rows == 6    # 16 registers
    l1d, l2 = native.cache_sizes()
    assert l1d >= 4096 and l2 >= l1d


def test_chosen_tiles_for_other_caches_are_exact():
    # The configurations choose_tiles picks for other machines' caches, run here.
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    q, k, v = inference_inputs('mixed', torch.float32)
    ref = hspa_ref(q, k, v)
    for l1d, l2 in ((16 * 2**10, 256 * 2**10), (48 * 2**10, 2 * 2**20), (64 * 2**10, 32 * 2**20)):
        tiles = native.choose_tiles(q.shape[1], q.shape[2], 4, lib.hspa_vector_bytes(), l1d, l2)
        assert rel(_inference_with(lib, q, k, v, tiles), ref) <= TOL, tiles


def test_unknown_tile_configuration_is_refused():
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    q, k, v = features(1, 50, 4, 3, scale=1.0)
    lanes = native.column_tile(lib, torch.float32)
    for bad in (native.Tiles(8, 5, lanes), native.Tiles(8, 6, lanes + 1), native.Tiles(0, 6, lanes)):
        with pytest.raises(ValueError, match='tile configuration'):
            _inference_with(lib, q, k, v, bad)


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64'), reason='an x86-64 target')
def test_x86_64_v3_build_is_exact():
    # The kernels built for AVX2 without AVX-512 (-march=x86-64-v3): the inference kernel with its own tiles
    # and the training kernels, float32 and float64.
    lib = native.load('x86-64-v3')
    if lib is None:
        pytest.skip(native.unavailable_reason())
    assert lib.hspa_vector_bytes() == 32
    for dtype in (torch.float32, torch.float64):
        q, k, v = inference_inputs('mixed', dtype)
        ref = hspa_ref(q, k, v)
        tol = TOL if dtype == torch.float32 else 1e-12
        tiles = native.tiles_for(lib, q.shape[1], q.shape[2], dtype)
        assert tiles.tile_rows == 6
        assert rel(_inference_with(lib, q, k, v, tiles), ref) <= tol
        training = _Native(_Inputs(q, k, v, 500), lib)
        out, supports = training.forward(2**30)
        assert rel(out, ref) <= tol and all(part is not None for part in supports)


def test_kernel_runs_on_torchs_openmp_threads_where_torch_has_them():
    # Where torch runs on GNU OpenMP the library is built with -fopenmp and binds to torch's libgomp by its
    # soname: one OpenMP runtime in the process, not a second one whose threads compete with torch's.
    lib = native.load()
    if lib is None:
        pytest.skip(native.unavailable_reason())
    if not native.torch_uses_libgomp():
        assert 'its own thread pool' in native.describe()
        return
    assert "torch's OpenMP threads" in native.describe()
    with open('/proc/self/maps') as maps:
        runtimes = {line.split()[-1] for line in maps if 'libgomp' in line}
    assert len(runtimes) == 1, runtimes


def test_own_thread_pool_build_is_exact():
    # The library as built where torch does not run on GNU OpenMP: its own pool of threads.
    lib = native.load(openmp=False)
    if lib is None:
        pytest.skip(native.unavailable_reason())
    for dtype in (torch.float32, torch.float64):
        q, k, v = inference_inputs('mixed', dtype)
        kernels = _Native(_Inputs(q, k, v, 0), lib)
        kernels.threads = 2
        assert rel(kernels.forward(0)[0], hspa_ref(q, k, v)) <= (TOL if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize('openmp', [None, False])
def test_kernel_threads_survive_fork(openmp):
    # A forked child (a DataLoader worker) has none of the parent's threads: the kernel's own pool must start
    # new ones instead of waiting for the parent's, and on torch's OpenMP threads it must follow the child's
    # thread setting (DataLoader workers keep torch on one thread: OpenMP is not fork-safe). The child asks
    # the kernel for two threads.
    lib = native.load(openmp=openmp)
    if not hasattr(os, 'fork') or lib is None:
        pytest.skip('needs fork and the native kernel')
    q, k, v = features(1, 600, 8, 6, scale=1.0, seed=2)
    ref = hspa_ref(q, k, v)

    def two_threads() -> float:
        kernels = _Native(_Inputs(q, k, v, 0), lib)
        kernels.threads = 2
        return rel(kernels.forward(0)[0], ref)

    assert two_threads() <= TOL                          # the pool exists in the parent now
    pid = os.fork()
    if pid == 0:                                         # the child: the same call, exit status = result
        try:
            torch.set_num_threads(1)
            os._exit(0 if two_threads() <= TOL else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail('the forked child hung in the HSPA kernel')


def test_argument_structures_mirror_the_c_header():
    """Each ctypes.Structure of the loader has the fields of its C structure in hspa_args.h, in order, with
    pointers where the header has pointers and int64 elsewhere (no padding on either side)."""
    text = (native.loader.SOURCE.parent / 'hspa_args.h').read_text()
    structs = {'hspa_attend_args': native.AttendArgs, 'hspa_grad_rows_args': native.GradRowsArgs,
               'hspa_grad_keys_args': native.GradKeysArgs}
    for c_name, py in structs.items():
        body = re.search(r'typedef struct \{([^}]*)\} ' + c_name + ';', text)[1]
        fields = []
        for decl in re.sub(r'/\*.*?\*/', '', body, flags=re.S).split(';'):
            decl = decl.strip()
            if not decl:
                continue
            kind, names = re.match(r'(?:const )?(\w+)\s*(.*)', decl).groups()
            for name in names.split(','):
                pointer = name.strip().startswith('*')
                fields.append((name.strip().lstrip('*'), 'pointer' if pointer else kind))
        got = [(name, 'pointer' if t is ctypes.c_void_p else 'int64_t') for name, t in py._fields_]
        assert got == fields, c_name
        assert ctypes.sizeof(py) == 8 * len(fields)
