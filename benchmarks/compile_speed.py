"""Benchmark: a training step of the quick demo's HSPAN with and without --compile, on the CPU.

Not a test. One process, `--threads` threads; the quick demo's network (one HSPAM of six LEBs, 48
features, topk 128, x2, HSPA 'blocked') with Adam on real T91 patches (48x48 HR, batch 16): forward, L1,
backward, step. `--compile` is torch.compile of the network, as `main.py --compile` runs it (HSPA's
kernels inside the graph as registered operators). The first compiled steps (compilation) are timed apart; then the two
set-ups alternate `--repeats` times over the same batches (median per-step time reported).

    python benchmarks/compile_speed.py --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch

from harness import ROOT, alternate, machine_line, t91_batches

sys.path.insert(0, str(ROOT / 'src'))

from nlsr.model.networks.hspan import HSPAN  # noqa: E402


def _steps(net: torch.nn.Module, opt: torch.optim.Optimizer, batches: list) -> list[float]:
    times = []
    for lr, hr in batches:
        start = time.perf_counter()
        loss = (net(lr) - hr).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=20, help='timed steps per run')
    p.add_argument('--repeats', type=int, default=2, help='runs of each set-up, alternating')
    p.add_argument('--threads', type=int, default=2, help='torch threads')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = HSPAN(scale=2, n_feats=48, n_resgroups=1, n_resblocks=6, reduction=2, topk=128, res_scale=1,
                rgb_range=1, hspa_impl='blocked').train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    compiled = torch.compile(net)
    batches = t91_batches(20, args.steps, 16, seed=0)
    start = time.perf_counter()
    warm = _steps(compiled, opt, batches[:2])
    compile_seconds = time.perf_counter() - start
    _steps(net, opt, batches[:2])
    results = alternate({'eager': functools.partial(_steps, net, opt, batches),
                         'compiled': functools.partial(_steps, compiled, opt, batches)}, args.repeats)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f'Machine: {machine_line(f"{args.threads} torch threads")}')
    print(f'first 2 compiled steps (compilation): {compile_seconds:.1f} s (then {warm[-1]:.3f} s); '
          f'{args.steps} timed steps x {args.repeats} runs per set-up')
    print('| set-up | s per step of 16 patches (median) |')
    print('|---|---|')
    print(f"| eager | {med['eager']:.3f} |")
    print(f"| --compile | {med['compiled']:.3f} |")
    print(f"speed-up of --compile: {med['eager'] / med['compiled']:.2f}x")


if __name__ == '__main__':
    main()
