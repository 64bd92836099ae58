"""Static check of the fused Triton HSPA kernels for NVIDIA GPUs, on a machine without one.

For every kernel of kernels.py, at the widths the project launches (channel C = 192, 64 and 48 with
reduction 2) and every input dtype, ``check`` takes the tiles that ``choose_tiles`` gives for the
architecture, compiles the kernel exactly as the launcher does (same signature, block sizes and compile
options; ``triton.compile`` for ``GPUTarget('cuda', cap, 32)``, no driver needed), and reads the shared
memory from the compiled metadata and the registers and spill stack (STACK) from the cubin with the bundled
``cuobjdump --dump-resource-usage``. A row passes when the shared memory fits the architecture's per-block
limit, the registers the thread's limit, and STACK is 0.

The launcher casts every input dtype to float32, so the three dtypes of a (kernel, width, arch) share one
compile; identical compiles run once, in worker processes, and Triton's on-disk cache (~/.triton/cache)
makes a rerun take seconds. triton is imported in those workers only: importing it here would fix its
mode (compiled or interpreted) for the calling process. ``python benchmarks/gpu_static.py`` prints the table.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import subprocess
import tempfile
from pathlib import Path

from nlsr.model.hspa.triton.launch import MAX_REGISTERS, Tiles, choose_tiles, shared_limit

ARCHS = {80: 'sm_80', 86: 'sm_86', 89: 'sm_89', 90: 'sm_90'}
# (query/key width, value width) of HSPA for the channel counts the project's models use, reduction 2.
WIDTHS = {'C=192/r=2': (96, 192), 'C=64/r=2': (32, 64), 'C=48/r=2': (24, 48)}
DTYPES = ('float32', 'bfloat16', 'float16')
KERNELS = ('threshold', 'forward', 'backward_rows', 'backward_keys', 'backward_values')


@dataclasses.dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    dtype: str
    arch: int
    tiles: Tiles
    shared: int
    limit: int
    registers: int
    stack: int

    @property
    def ok(self) -> bool:
        return self.shared <= self.limit and self.stack == 0 and self.registers <= MAX_REGISTERS


def launch_spec(kernel: str, tiles: Tiles) -> tuple[dict[str, str], dict[str, int]]:
    """Signature and block sizes of one launch, as the launcher's call produces them: contiguous float32
    tensors, 32-bit sizes (not specialised: the kernels are plain_jit), the tiles' block sizes."""
    from nlsr.model.hspa.triton import kernels as kern

    names = getattr(kern, kernel).arg_names
    constexprs = {name: value for name, value in tiles.constexprs().items() if name in names}
    signature = {name: 'constexpr' if name in constexprs else '*fp32' if name.endswith('_ptr') else 'i32'
                 for name in names}
    return signature, constexprs


def compile_resources(kernel: str, tiles: Tiles, arch: int) -> tuple[int, int, int]:
    """(shared bytes, registers, STACK bytes) of one kernel compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nlsr.model.hspa.triton import kernels as kern

    signature, constexprs = launch_spec(kernel, tiles)
    compiled = triton.compile(ASTSource(getattr(kern, kernel), signature=signature, constexprs=constexprs),
                              target=GPUTarget('cuda', arch, 32), options=tiles.options())
    cuobjdump = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump'
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f'{kernel}.cubin'
        cubin.write_bytes(compiled.asm['cubin'])
        usage = subprocess.run([str(cuobjdump), '--dump-resource-usage', str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    found = re.search(r'REG:(\d+) STACK:(\d+)', usage)
    if found is None:
        raise RuntimeError(f'cuobjdump printed no REG/STACK for {kernel} on sm_{arch}: {usage.strip()[:200]}')
    return compiled.metadata.shared, int(found.group(1)), int(found.group(2))


def _compiling_worker() -> None:
    # A caller that runs the kernels in Triton's interpreter (the CPU tests) must not make these compiles
    # interpreted too: the kernels module is imported afresh in this spawned process, after this.
    os.environ.pop('TRITON_INTERPRET', None)


def check(archs: list[int], workers: int = 2) -> list[Row]:
    """Every (kernel, width, dtype, arch) row; each distinct compile runs once, in worker processes."""
    cases = [(kernel, shape, dtype, arch, choose_tiles((arch // 10, arch % 10), *WIDTHS[shape]))
             for arch in archs for shape in WIDTHS for dtype in DTYPES for kernel in KERNELS]
    distinct = sorted({(kernel, tiles, arch) for kernel, _, _, arch, tiles in cases}, key=str)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                                initializer=_compiling_worker) as pool:
        results = dict(zip(distinct, pool.map(compile_resources, *zip(*distinct, strict=True)), strict=True))
    rows = []
    for kernel, shape, dtype, arch, tiles in cases:
        shared, registers, stack = results[kernel, tiles, arch]
        rows.append(Row(kernel, shape, dtype, arch, tiles, shared, shared_limit((arch // 10, arch % 10)),
                        registers, stack))
    return rows


def _tiles_text(tiles: Tiles) -> str:
    return (f'M{tiles.block_m} N{tiles.block_n} D{tiles.block_d} C{tiles.block_c} Q{tiles.block_q} '
            f'w{tiles.num_warps} s{tiles.num_stages}')


def markdown(rows: list[Row], merge_dtypes: bool = False) -> str:
    """The table; merge_dtypes: one line for the dtypes of a (kernel, shape, arch) that share a compile."""
    lines = ['| kernel | shape | dtype | arch | tiles | shared / limit (bytes) | registers | STACK | verdict |',
             '|---|---|---|---|---|---|---|---|---|']
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.shape, r.arch, r.tiles) if merge_dtypes else (r,), []).append(r)
    for group in groups.values():
        r = group[0]
        lines.append(f'| {r.kernel} | {r.shape} | {", ".join(g.dtype for g in group)} | '
                     f'{ARCHS.get(r.arch, f"sm_{r.arch}")} | '
                     f'{_tiles_text(r.tiles)} | {r.shared:,} / {r.limit:,} | {r.registers} | {r.stack} | '
                     f'{"pass" if all(g.ok for g in group) else "FAIL"} |')
    return '\n'.join(lines)


def summary(rows: list[Row]) -> str:
    worst = max(rows, key=lambda r: r.shared / r.limit)
    return (f'{sum(r.ok for r in rows)}/{len(rows)} rows pass; worst shared {worst.shared:,} / {worst.limit:,} '
            f'bytes ({worst.kernel}, {worst.shape}, sm_{worst.arch}); max registers '
            f'{max(r.registers for r in rows)} of {MAX_REGISTERS}; max STACK {max(r.stack for r in rows)} bytes')
