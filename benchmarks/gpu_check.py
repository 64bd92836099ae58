"""One validation run of everything CUDA-specific, within a time budget (default 5 minutes on one GPU).

    python benchmarks/gpu_check.py                    # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --quick            # smaller sizes
    python benchmarks/gpu_check.py --list             # the checks, what each covers and its estimate

The checks (benchmarks/gpu_checks/): environment; the HSPA operator (dense, blocked, triton against a float64
oracle, output and q/k/v gradients, L = 777, 2304, 16384; fp16/bf16 inputs; the Triton forward at
L = 196,608 on sampled rows); the HSPA block per impl (fp32 with gradients, autocast fp16/bf16,
channels_last, half weights then a convolution); a small HSPAN training step equal across dense, triton
and blocked, 5 AMP steps with fp16 + GradScaler and with bf16; GPU against the CPU's native kernels; the Model
wrapper's --precision half/bf16, --chop, --tile, --self_ensemble and channels_last; --compile; impl 'auto'
near the dense memory limit; the autocast dtype in DataParallel's threads; a 2-process DDP step (gloo, both
ranks on cuda:0) against one process; main.py train, resume, safetensors and --pre_train --test_only;
the static resources of the Triton kernels for this GPU. What needs several GPUs is listed as not checked.

Each check is isolated: an error is recorded as a row and the rest still run; a check whose estimate no
longer fits the budget is skipped and says so. float32 comparisons run with TF32 off. Results: a table on
stdout and the rows as JSON (--json). Exit status 0 when every row passed (or is a support-boundary flip,
info or skipped), 1 otherwise. It installs nothing and needs no test-only package.

Without CUDA it runs its self-test (the command line parses, every check is registered with a unique name,
a one-line description and an estimate), lists the checks, and exits with status 2 saying no GPU ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_checks import STATUSES, Check, Context, Row, all_checks  # noqa: E402
from harness import machine_line  # noqa: E402

BUDGET_S = 300
NO_GPU = 'No CUDA GPU on this machine: no GPU check ran (nothing was measured on a GPU).'


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='smaller sizes (the operator at L = 777 and 2304 only)')
    p.add_argument('--budget', type=float, default=BUDGET_S, help='seconds for all checks (default 300)')
    p.add_argument('--only', nargs='+', default=[], metavar='NAME', help='run only these checks (names of --list)')
    p.add_argument('--json', type=Path, default=Path('gpu_check.json'), help='where the rows go as JSON')
    p.add_argument('--list', action='store_true', help='list the checks and exit')
    args = p.parse_args(argv)
    names = {c.name for c in all_checks()}
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f'--only: unknown checks {unknown}; see --list')
    return args


def self_test(checks: list[Check]) -> list[str]:
    """What is wrong with the registry (empty when nothing): names unique and non-empty, each check
    callable with a one-line description and a positive estimate; the command line parses."""
    problems = []
    names = [c.name for c in checks]
    if len(set(names)) != len(names) or not all(names):
        problems.append(f'check names not unique or empty: {names}')
    for c in checks:
        if not callable(c.run) or not c.doc or c.seconds <= 0:
            problems.append(f'check {c.name!r}: needs a function, a description and an estimate')
    parse(['--quick', '--budget', '60', '--only', *names[:2], '--json', 'x.json'])
    return problems


def run(checks: list[Check], ctx: Context, budget: float) -> None:
    """Run each check in turn inside the budget; an exception is recorded as an 'error' row."""
    start = time.perf_counter()
    for c in checks:
        ctx.current = c.name
        left = budget - (time.perf_counter() - start)
        if c.seconds > left:
            ctx.row('(whole check)', 'skipped', f'time budget: {left:.0f} s left, needs about {c.seconds:.0f} s')
            continue
        t0 = time.perf_counter()
        try:
            c.run(ctx)
        except Exception as e:  # one failing check must not hide the others
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
            ctx.row('(whole check)', 'error', f'{type(e).__name__}: {message}')
        finally:
            torch.cuda.empty_cache()
        ctx.row('(time)', 'info', f'{time.perf_counter() - t0:.1f} s')


def table(rows: list[Row]) -> str:
    lines = ['| check | case | result | detail |', '|---|---|---|---|']
    lines += [f'| {r.check} | {r.case} | {r.status} | {r.detail} |' for r in rows if r.case != '(time)']
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    checks = all_checks()
    if args.list or not torch.cuda.is_available():
        problems = self_test(checks)
        for c in checks:
            print(f'{c.name:46s} ~{c.seconds:3.0f} s  {c.doc}')
        if problems:
            print('self-test FAILED: ' + '; '.join(problems))
            return 1
        print(f'self-test passed: {len(checks)} checks registered and named; the command line parses')
        if args.list:
            return 0
        print(NO_GPU)
        return 2
    if args.only:
        checks = [c for c in checks if c.name in args.only]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context('cuda', args.quick, Path(tmp))
        run(checks, ctx, args.budget)
    name = torch.cuda.get_device_name()
    total = time.perf_counter() - start
    print(f'\nMachine: {machine_line(f"GPU {name}")}; {total:.0f} s of a {args.budget:.0f} s budget\n')
    print(table(ctx.rows))
    counts = {s: sum(r.status == s for r in ctx.rows) for s in STATUSES}
    print('\n' + ', '.join(f'{n} {s}' for s, n in counts.items() if n))
    args.json.write_text(json.dumps({'gpu': name, 'torch': torch.__version__, 'seconds': round(total, 1),
                                     'rows': [dataclasses.asdict(r) for r in ctx.rows]}, indent=1))
    return 1 if counts['FAIL'] or counts['error'] else 0


if __name__ == '__main__':
    sys.exit(main())
