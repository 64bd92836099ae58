"""Benchmark: the published CSNLN configuration on one whole LR image (no chop), time and peak memory.

Not a test. Each (size, scale) runs in a fresh subprocess (harness.run_case): it builds CSNLN from the flags
of `--template CSNLN` (128 features, depth 12, rgb_range 1) with random weights, makes a random LR image,
runs a warm-up forward on a 24x24 crop, then one forward under torch.no_grad() inside harness.PeakMemory
(the peak-RSS counter reset first). Peak = VmHWM (the whole process: torch, weights, activations,
attention; the worker also reports ru_maxrss, the process's peak since it started); extra = VmHWM - VmRSS
just before the forward. The published code took 5.81 GiB at 160x160 x2.

    python benchmarks/csnln_memory.py                     # 160x160 at x2
    python benchmarks/csnln_memory.py --sizes 96 160 --scales 2 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness import ROOT, PeakMemory, load_average, machine_line, run_case


def worker(size: int, scale: int, seed: int) -> dict:
    """One forward of the published CSNLN on a size x size LR image; time and memory."""
    sys.path.insert(0, str(ROOT / 'src'))
    import resource

    import torch

    import option
    from model.networks.csnln import CSNLN

    args = option.parse(['--template', 'CSNLN', '--scale', str(scale), '--cpu', '--test_only'])
    torch.manual_seed(seed)
    net = CSNLN(scale=scale, n_colors=args.n_colors, n_feats=args.n_feats, depth=args.depth,
                rgb_range=args.rgb_range).eval()
    x = torch.rand(1, 3, size, size) * args.rgb_range
    with torch.no_grad():  # warm-up on a small image: one-time kernel set-up is not timed
        net(x[:, :, :24, :24])
    with PeakMemory() as peak, torch.no_grad():
        start = time.perf_counter()
        out = net(x)
        seconds = time.perf_counter() - start
    return {'size': size, 'scale': scale, 'seconds': seconds, 'peak_gib': peak.peak_mib / 1024,
            'extra_gib': peak.extra_mib / 1024, 'method': peak.method, 'output': list(out.shape),
            'ru_maxrss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            'threads': torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[160], help='LR image sizes (square)')
    p.add_argument('--scales', type=int, nargs='+', default=[2], choices=(2, 3, 4))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--worker', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(**json.loads(a.worker))))
        return 0
    print(f'Machine: {machine_line()}\n')
    print('| LR size | scale | time (s) | peak RSS (GiB) | extra over the forward (GiB) | load after |')
    print('|---|---|---|---|---|---|')
    for size in a.sizes:
        for scale in a.scales:
            m = run_case(__file__, {'size': size, 'scale': scale, 'seed': a.seed})
            if 'error' in m:
                print(f'| {size}x{size} | x{scale} | failed: {m["error"]} | | | {load_average()} |')
                continue
            print(f"| {size}x{size} | x{scale} | {m['seconds']:.1f} | {m['peak_gib']:.2f} | {m['extra_gib']:.2f} "
                  f'| {load_average()} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
