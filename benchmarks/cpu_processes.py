"""Benchmark: training the quick demo's HSPAN on a 2-core CPU, one process with 2 threads vs 2 processes.

Not a test. Both train the same network (`demo.sh quick`: one HSPAM of six LEBs, 48 features, topk 128,
x2) with Adam on real T91 patches (48x48 HR, batch 16 in total), forward + backward + step:

- **threads**: one process, `torch.set_num_threads(2)`, batch 16;
- **processes**: two processes with one thread each under DistributedDataParallel (gloo), batch 8 each,
  which is what `demo.sh quick` runs (a step equals the single-process step on the same 16 patches).

HSPA's cost depends on how spread its attention is, so `--weights` (e.g. the quick demo's
experiment/quick/model/model_latest.pt) times a trained network; without it the weights are random.
The two set-ups alternate `--repeats` times (median of the per-step times reported), so that load
changes on a shared machine hit both alike.

    python benchmarks/cpu_processes.py --weights experiment/quick/model/model_latest.pt
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import ROOT, alternate, machine_line, t91_batches

sys.path.insert(0, str(ROOT / 'src'))

from nlsr.model.networks.hspan import HSPAN  # noqa: E402


def _worker(rank: int, world: int, threads: int, steps: int, weights: str, port: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    torch.manual_seed(0)
    net = HSPAN(scale=2, n_feats=48, n_resgroups=1, n_resblocks=6, reduction=2, topk=128, res_scale=1,
                rgb_range=1, hspa_impl='blocked')
    if weights:
        net.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = t91_batches(20, steps + 2, 16 // world, seed=rank)
    times = []
    for i, (lr, hr) in enumerate(batches):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        loss = (model(lr) - hr).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if world > 1:
            dist.barrier()
        if i >= 2:  # the first two steps warm up allocators and caches
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(times)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(world: int, threads: int, steps: int, weights: str) -> list[float]:
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, threads, steps, weights, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    times = queue.get()
    for p in procs:
        p.join()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=30, help='timed steps per run')
    p.add_argument('--repeats', type=int, default=2, help='runs of each set-up, alternating')
    p.add_argument('--weights', type=str, default='', help='HSPAN state dict of the quick config (default random)')
    args = p.parse_args()
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    results = alternate({'threads': functools.partial(run, 1, 2, args.steps, args.weights),
                         'processes': functools.partial(run, 2, 1, args.steps, args.weights)}, args.repeats)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f'Machine: {machine_line()}')
    print(f'weights: {args.weights or "random"}; {args.steps} timed steps x {args.repeats} runs per set-up')
    print('| set-up | s per step of 16 patches (median) |')
    print('|---|---|')
    print(f"| 1 process, 2 threads | {med['threads']:.3f} |")
    print(f"| 2 processes (DDP, gloo), 1 thread each | {med['processes']:.3f} |")
    print(f"ratio: {med['threads'] / med['processes']:.2f}x")


if __name__ == '__main__':
    main()
