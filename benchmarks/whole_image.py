"""Benchmark: the comparison networks' published configurations on one whole LR image (no chop): time and peak
memory.

Not a test. Each (network, size) runs in a fresh subprocess (harness.run_case): it builds the network from
`--template <NAME> --scale S` (its published configuration) with seeded random weights, makes a random LR
image at the template's rgb_range, runs a warm-up forward on a 24x24 crop, then one forward under
torch.no_grad() inside harness.PeakMemory (the peak-RSS counter reset first). Peak = VmHWM of the whole
process (torch, weights, activations, attention). Extra flags after `--` go to option.parse, e.g.
`-- --attention hspa`. The machine line comes first; the load average after each case is a column.

    python benchmarks/whole_image.py                                  # PAEDSR CSNLN NLSN SAN at 160x160, x2
    python benchmarks/whole_image.py --networks NLSN --sizes 96 160 --scale 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness import ROOT, PeakMemory, load_average, machine_line, run_case

NETWORKS = ('PAEDSR', 'CSNLN', 'NLSN', 'SAN')


def worker(network: str, size: int, scale: int, extra: list[str], seed: int) -> dict:
    """One forward of `network`'s published configuration on a size x size LR image; time and memory."""
    sys.path.insert(0, str(ROOT / 'src'))
    import torch

    from nlsr import option
    from nlsr.model import make_network

    args = option.parse(['--template', network, '--scale', str(scale), '--cpu', '--test_only', '--no_chop', *extra])
    torch.manual_seed(seed)
    net = make_network(args).eval()
    x = torch.rand(1, args.n_colors, size, size, generator=torch.Generator().manual_seed(seed)) * args.rgb_range
    with torch.no_grad():  # warm-up on a small image: one-time set-up (kernel builds, caches) is not timed
        net(x[:, :, :24, :24])
    with PeakMemory() as peak, torch.no_grad():
        start = time.perf_counter()
        out = net(x)
        seconds = time.perf_counter() - start
    return {'network': network, 'size': size, 'scale': scale, 'seconds': seconds, 'peak_gib': peak.peak_mib / 1024,
            'output': list(out.shape), 'finite': bool(torch.isfinite(out).all()),
            'params_m': sum(p.numel() for p in net.parameters()) / 1e6, 'threads': torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--networks', nargs='+', default=list(NETWORKS), help='--template names')
    p.add_argument('--sizes', type=int, nargs='+', default=[160], help='LR image sizes (square)')
    p.add_argument('--scale', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--worker', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(worker(spec['network'], spec['size'], spec['scale'], spec['extra'], spec['seed'])))
        return 0
    print(machine_line(f'scale x{a.scale}', 'no chop', *(['flags ' + ' '.join(extra)] if extra else [])))
    print('| network | params | LR size | seconds | peak RSS | load after |')
    print('|---|---|---|---|---|---|')
    failed = False
    for network in a.networks:
        for size in a.sizes:
            spec = {'network': network, 'size': size, 'scale': a.scale, 'extra': extra, 'seed': a.seed}
            r = run_case(__file__, spec)
            if 'error' in r or not r['finite']:
                failed = True
                print(f'| {network} | | {size}² | {r.get("error", "output not finite")} | | {load_average()} |')
                continue
            print(f'| {network} | {r["params_m"]:.2f} M | {size}² | {r["seconds"]:.1f} s | {r["peak_gib"]:.2f} GiB '
                  f'| {load_average()} |', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
