"""Benchmark: the published MSNLAN configuration on one whole LR image (x4, no chop), time and peak memory.

Not a test. Each (size, implementation) runs in a fresh subprocess (harness.run_case): it builds MSNLAN
from the flags of `--template MSNLAN` (8 groups x 9 RMABs, 64 features) with random weights, makes a random
LR image of rgb_range 255, runs a warm-up forward on a 24x24 crop, then one forward under torch.no_grad()
inside harness.PeakMemory (the peak-RSS counter reset first). Peak = VmHWM (the whole process: torch,
weights, activations, attention); extra = VmHWM - VmRSS just before the forward. `--impl` picks the MSNLAB
algorithm: auto (the default: blocked at these sizes), blocked, or dense (the published arithmetic: about
17 GiB at 192x192). The machine line comes first; the load average after each case is a column: the time
depends on what else runs on the machine.

    python benchmarks/msnlan_memory.py                       # 96, 144, 192 with the default MSNLAB
    python benchmarks/msnlan_memory.py --sizes 96 --impl auto dense
    python benchmarks/msnlan_memory.py --dense_sizes 96 144   # plus the published block where it fits
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness import ROOT, PeakMemory, load_average, machine_line, run_case


def worker(size: int, impl: str, seed: int) -> dict:
    """One forward of the published MSNLAN x4 on a size x size LR image; time and memory."""
    sys.path.insert(0, str(ROOT / 'src'))
    import torch

    from nlsr import option
    from nlsr.model.networks.msnlan import MSNLAN

    args = option.parse(['--template', 'MSNLAN', '--scale', '4', '--cpu', '--test_only'])
    torch.manual_seed(seed)
    net = MSNLAN(scale=4, n_colors=args.n_colors, n_feats=args.n_feats, n_resgroups=args.n_resgroups,
                 n_resblocks=args.n_resblocks, res_scale=args.res_scale, rgb_range=args.rgb_range,
                 msnlab_impl=impl).eval()
    x = torch.rand(1, 3, size, size) * args.rgb_range
    with torch.no_grad():  # warm-up on a small image: one-time kernel set-up is not timed
        net(x[:, :, :24, :24])
    with PeakMemory() as peak, torch.no_grad():
        start = time.perf_counter()
        out = net(x)
        seconds = time.perf_counter() - start
    return {'size': size, 'impl': impl, 'seconds': seconds, 'peak_gib': peak.peak_mib / 1024,
            'extra_gib': peak.extra_mib / 1024, 'output': list(out.shape), 'threads': torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[96, 144, 192], help='LR image sizes (square)')
    p.add_argument('--impl', nargs='+', default=['auto'], choices=('auto', 'blocked', 'dense'),
                   help='MSNLAB implementations to run')
    p.add_argument('--dense_sizes', type=int, nargs='*', default=[],
                   help='sizes also run with the published dense MSNLAB, as a same-run baseline')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--worker', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(**json.loads(a.worker))))
        return 0
    print(f'Machine: {machine_line()}\n')
    print('| LR size | MSNLAB impl | time (s) | peak RSS (GiB) | extra over the forward (GiB) | load after |')
    print('|---|---|---|---|---|---|')
    for size in a.sizes:
        for impl in a.impl + (['dense'] if size in a.dense_sizes and 'dense' not in a.impl else []):
            m = run_case(__file__, {'size': size, 'impl': impl, 'seed': a.seed})
            if 'error' in m:
                print(f'| {size}x{size} | {impl} | failed: {m["error"]} | | | {load_average()} |')
                continue
            print(f"| {size}x{size} | {impl} | {m['seconds']:.1f} | {m['peak_gib']:.2f} | {m['extra_gib']:.2f} "
                  f'| {load_average()} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
