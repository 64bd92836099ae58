"""Static GPU check of the fused Triton HSPA kernels, on a machine without a GPU (model.hspa.triton.static_check).

    python benchmarks/gpu_static.py                 # sm_80, sm_86, sm_89, sm_90
    python benchmarks/gpu_static.py --arch 86       # one architecture

Compiles every launch of model/hspa/triton/kernels.py at the project's widths and dtypes for each
architecture, as the launcher would, and prints a markdown table of shared memory (against the per-block
limit), registers and spill stack, the summary and the machine line (the compiling CPU and the triton
version: the compile times depend on them); exits 1 when any row fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

from harness import ROOT, machine_line

if str(ROOT / 'src') not in sys.path:
    sys.path.insert(0, str(ROOT / 'src'))

from nlsr.model.hspa.triton.static_check import ARCHS, check, markdown, summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', type=int, nargs='+', default=list(ARCHS), choices=list(ARCHS),
                   help='compute capabilities to compile for (default: all)')
    p.add_argument('--workers', type=int, default=2, help='compiles in parallel (default 2)')
    p.add_argument('--merge-dtypes', action='store_true',
                   help='one line for the dtypes that share a compile (the launcher casts them to float32)')
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = check(args.arch, args.workers)
    print(markdown(rows, args.merge_dtypes))
    print(f'\n{summary(rows)}; {time.perf_counter() - start:.0f} s')
    # The version from the package metadata: importing triton here would fix its mode for the whole process.
    triton_version = importlib.metadata.version('triton')
    print(f'Machine: {machine_line(f"triton {triton_version}")}')
    return 0 if all(r.ok for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
