"""model/hspa/triton/static_check.py: every launch of the fused Triton HSPA kernels, compiled for sm_80, sm_86,
sm_89 and sm_90 on this CPU machine, fits the architecture's shared memory per block with no register spills.

The first run compiles (a few minutes on two cores); Triton's on-disk cache makes later runs take seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

# Located, not imported: triton imported here, before tests/model/hspa/test_triton.py sets TRITON_INTERPRET=1,
# would leave its library functions compiled-mode under that file's interpreter. The compiles run in
# static_check's worker processes.
TRITON = importlib.util.find_spec('triton')
if TRITON is None or TRITON.origin is None:
    pytest.skip('the triton package is not installed', allow_module_level=True)
if not (Path(TRITON.origin).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump').is_file():
    pytest.skip('the triton package has no bundled cuobjdump (not an x86-64 Linux wheel)', allow_module_level=True)

from nlsr.model.hspa.triton import static_check  # noqa: E402
from nlsr.model.hspa.triton.launch import Tiles  # noqa: E402


def test_every_launch_fits_every_architecture():
    rows = static_check.check(list(static_check.ARCHS))
    expected = {(kernel, shape, dtype, arch) for kernel in static_check.KERNELS for shape in static_check.WIDTHS
                for dtype in static_check.DTYPES for arch in static_check.ARCHS}
    assert {(r.kernel, r.shape, r.dtype, r.arch) for r in rows} == expected and len(rows) == len(expected)
    failed = [r for r in rows if not r.ok]
    assert not failed, static_check.markdown(failed)
    assert all(r.shared > 0 and 0 < r.registers for r in rows)


def test_a_failing_row_fails_the_check():
    tiles = Tiles(32, 32, 16, 128, 128)
    fits = static_check.Row('forward', 'C=192/r=2', 'float32', 86, tiles, 20_480, 101_376, 140, 0)
    spills = dataclasses.replace(fits, stack=8)
    too_big = dataclasses.replace(fits, shared=101_377)
    many_registers = dataclasses.replace(fits, registers=256)
    assert fits.ok and not spills.ok and not too_big.ok and not many_registers.ok
    table = static_check.markdown([fits, spills])
    assert table.count('| pass |') == 1 and table.count('| FAIL |') == 1
    text = static_check.summary([fits, spills])
    assert '1/2 rows pass' in text and 'max STACK 8 bytes' in text
