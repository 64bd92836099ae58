"""benchmarks/gpu_static.py: every launch of the fused Triton HSPA kernels, compiled for sm_80, sm_86, sm_89
and sm_90 on this CPU machine, fits the architecture's shared memory per block with no register spills.

The first run compiles (a few minutes on two cores); Triton's on-disk cache makes later runs take seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# Located, not imported: triton imported here, before tests/model/hspa/test_triton.py sets TRITON_INTERPRET=1,
# would leave its library functions compiled-mode under that file's interpreter. The compiles run in
# gpu_static's worker processes.
TRITON = importlib.util.find_spec('triton')
if TRITON is None or TRITON.origin is None:
    pytest.skip('the triton package is not installed', allow_module_level=True)
if not (Path(TRITON.origin).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump').is_file():
    pytest.skip('the triton package has no bundled cuobjdump (not an x86-64 Linux wheel)', allow_module_level=True)

sys.path.insert(0, str(ROOT / 'benchmarks'))
import gpu_static  # noqa: E402
from model.hspa.triton.launch import Tiles  # noqa: E402


def test_every_launch_fits_every_architecture():
    rows = gpu_static.check(list(gpu_static.ARCHS))
    expected = {(kernel, shape, dtype, arch) for kernel in gpu_static.KERNELS for shape in gpu_static.WIDTHS
                for dtype in gpu_static.DTYPES for arch in gpu_static.ARCHS}
    assert {(r.kernel, r.shape, r.dtype, r.arch) for r in rows} == expected and len(rows) == len(expected)
    failed = [r for r in rows if not r.ok]
    assert not failed, gpu_static.markdown(failed)
    assert all(r.shared > 0 and 0 < r.registers for r in rows)


def test_a_failing_row_fails_the_check(monkeypatch, capsys):
    tiles = Tiles(32, 32, 16, 128, 128)
    fits = gpu_static.Row('forward', 'C=192/r=2', 'float32', 86, tiles, 20_480, 101_376, 140, 0)
    spills = dataclasses.replace(fits, stack=8)
    too_big = dataclasses.replace(fits, shared=101_377)
    assert fits.ok and not spills.ok and not too_big.ok
    monkeypatch.setattr(gpu_static, 'check', lambda archs, workers: [fits, spills])
    assert gpu_static.main(['--arch', '86']) == 1
    out = capsys.readouterr().out
    assert '| FAIL |' in out and '1/2 rows pass' in out and 'max STACK 8 bytes' in out

