"""The checks of benchmarks/gpu_check.py: a registry, the tolerances, and the comparisons they share.

Each check is a function of a ``Context`` registered with ``@check(name, seconds)``; it reports any number
of rows through ``ctx.row`` and may raise (the runner records the error and goes on). ``seconds`` is its
estimated cost on one GPU, which the runner's time budget uses to skip what no longer fits.

Tolerances (relative: max |a - b| / max |b|):
- FP32: float32 against the float64 oracle or another float32 path, TF32 off;
- GPU_CPU: the same weights on the GPU and on the CPU kernels;
- LOW: float16/bfloat16 results against float32 (besides finite and of the right dtype).
A comparison over the limit where the float32 paths themselves disagree near a support boundary (an entry
within float32 rounding of its row's threshold: either side may keep it) is reported as a 'flip', not a
failure, when the checked side is no farther from float64 than the reference side (as benchmarks/hspa.py
compares both against float64).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / 'src') not in sys.path:
    sys.path.insert(0, str(ROOT / 'src'))

FP32 = 1e-5
GPU_CPU = 1e-4
LOW = 2e-2
STATUSES = ('pass', 'flip', 'FAIL', 'error', 'skipped', 'info')


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], None]
    seconds: float
    doc: str


@dataclasses.dataclass
class Row:
    check: str
    case: str
    status: str
    detail: str = ''


@dataclasses.dataclass
class Context:
    """What a check gets: the device ('cuda'), --quick, a scratch folder, and where its rows go."""

    device: str
    quick: bool
    scratch: Path
    rows: list[Row] = dataclasses.field(default_factory=list)
    current: str = ''

    def row(self, case: str, status: str, detail: str = '') -> None:
        if status not in STATUSES:
            raise ValueError(f'status {status!r}')
        self.rows.append(Row(self.current, case, status, detail))
        print(f'# {self.current} | {case}: {status} {detail}', file=sys.stderr, flush=True)

    def bound(self, case: str, err: float, limit: float, detail: str = '') -> bool:
        """A pass/FAIL row for err <= limit; True on pass."""
        ok = err <= limit
        more = f'; {detail}' if detail else ''
        self.row(case, 'pass' if ok else 'FAIL', f'rel err {err:.1e} (limit {limit:.0e}){more}')
        return ok


CHECKS: list[Check] = []


def check(name: str, seconds: float) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    """Register a check under ``name`` (unique), estimated to take ``seconds`` on one GPU."""
    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        if any(c.name == name for c in CHECKS):
            raise ValueError(f'check {name!r} registered twice')
        CHECKS.append(Check(name, fn, seconds, (fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''))
        return fn
    return register


# Run order: the operator and block first, then training, then the wrapper and whole runs (the costliest last).
MODULES = ('operator', 'training', 'runs')


def all_checks() -> list[Check]:
    """Every check, in run order: by MODULES, then as each module registers them."""
    import importlib

    for name in MODULES:
        importlib.import_module(f'gpu_checks.{name}')
    return sorted(CHECKS, key=lambda c: MODULES.index(c.run.__module__.rsplit('.', 1)[-1]))


def rel(a: Any, b: Any) -> float:
    """max |a - b| / max |b| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def compare(ctx: Context, case: str, got: Any, ref: Any, limit: float, got64: Any = None, ref32: Any = None,
            exact: Any = None) -> None:
    """A row for ``got`` against ``ref``. With ``exact`` (the float64 result) and ``ref32`` (a float32
    reference path, or ``ref`` itself when that is float32), an excess is a support-boundary 'flip' when
    ``got`` is no farther than twice the reference side (or ``limit``) from float64: both float32 sides then
    differ from the exact result alike, by where an entry within rounding of the threshold falls."""
    err = rel(got, ref)
    if err <= limit:
        ctx.row(case, 'pass', f'rel err {err:.1e} (limit {limit:.0e})')
        return
    if exact is not None:
        side = rel(got if got64 is None else got64, exact)
        other = rel(ref if ref32 is None else ref32, exact)
        if side <= max(limit, 2 * other):
            ctx.row(case, 'flip', f'rel err {err:.1e}; against float64: this {side:.1e}, the reference {other:.1e}'
                    ' (support boundary within float32 rounding)')
            return
    ctx.row(case, 'FAIL', f'rel err {err:.1e} (limit {limit:.0e})')


def low_precision(ctx: Context, case: str, got: Any, ref32: Any, dtype: Any) -> None:
    """A row for a float16/bfloat16 result: finite, of ``dtype``, within LOW of the float32 result."""
    import torch

    if got.dtype != dtype:
        ctx.row(case, 'FAIL', f'dtype {got.dtype}, expected {dtype}')
    elif not bool(torch.isfinite(got).all()):
        ctx.row(case, 'FAIL', 'not finite')
    else:
        ctx.bound(case, rel(got.float(), ref32), LOW)


def strict_float32() -> None:
    """TF32 off for the float32 comparisons (cuBLAS and cuDNN)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision('highest')
