"""Benchmark: the published dense HSPA vs the project's HSPA layer (default impl) and the score-matmul floor.

Not a test. Memory: every (case, implementation) runs once in a fresh subprocess; the worker builds
its inputs and runs the case once under harness.PeakMemory: extra peak memory = VmHWM after a reset minus
the RSS just before the run (torch's own allocations included, which tracemalloc would miss). Outputs
(and gradients for the training step) are saved to a temporary folder and compared by the parent. Time:
one more subprocess per case builds both implementations and runs them alternately ``--repeats`` times
after a warm-up (median reported), so that load changes on a shared machine hit both alike.

The layer is ``model.attention.HSPA`` built with the published signature (channel 192, reduction 2,
res_scale 0.1, topk 128; random weights) as the project runs it by default, or, with ``--features
trained``, the HSPA layer of the quick demo's trained checkpoint (``--weights``) on the inputs it gets
from 128x128 LR crops of Set5 and Set14. The baseline runs the same layer's embeddings through the
published algorithm (harness.published_attention): full (L x L) score matrix, top-k based threshold with
the 2k retry, dense weights @ values, and its saved-output backward. The floor is the score matmul alone
(q @ k^T for every query row, in blocks of 2048 rows into one buffer), timed in the same worker. The
training step's input gradients are also compared with the project's layer run in float64: near a row's
threshold float32 rounding can put an entry in or out of the support, where the sparsemax Jacobian jumps.

    python benchmarks/hspa.py                                   # random features, 48..256 and training
    python benchmarks/hspa.py --features trained --sizes 128 --no-train \
        --weights experiment/quick/model/model_latest.pt
    python benchmarks/hspa.py --march x86-64-v3 --sizes 128 --no-train   # the AVX2 build of the kernel

The header is the harness's machine line (CPU, vector extensions, cores, torch, load average) with the
caches and the kernel's build; every time is given as a multiple of the floor measured in the same worker.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, PeakMemory, alternate, fmt_mib, machine_line, published_attention, run_case, time_call

# ----------------------------------------------------------------------------------------------------
# Worker side (runs in its own process)
# ----------------------------------------------------------------------------------------------------

QUICK_FLAGS = ['--model', 'HSPAN', '--scale', '2', '--rgb_range', '1', '--n_resgroups', '1', '--n_resblocks', '6',
               '--n_feats', '48', '--reduction', '2', '--topk', '128', '--res_scale', '1']


def _trained_input(spec: dict):
    """The quick demo's trained HSPA layer and its input on LR crops of Set5/Set14 (x2, from the repo's
    datasets/ or ../shared): the features a trained network gives its attention."""
    import imageio.v3 as imageio
    import numpy as np
    import torch

    import nlsr.model as model_pkg
    from nlsr import option
    from nlsr.model.checkpoint import load_into

    args = option.parse(['--cpu', '--test_only', *QUICK_FLAGS])
    net = model_pkg.make_network(args)
    load_into(net, spec['weights'])
    layer = next(m for m in net.modules() if type(m).__name__ == 'HSPA')
    captured = []
    layer.register_forward_pre_hook(lambda mod, inputs: captured.append(inputs[0].detach()))
    size = spec['size']
    crops = []
    for name in spec['images'][: spec['batch']]:
        img = imageio.imread(name)
        img = img[..., None].repeat(3, -1) if img.ndim == 2 else img[..., :3]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        top, left = max(0, (t.shape[1] - size) // 2), max(0, (t.shape[2] - size) // 2)
        crops.append(t[:, top:top + size, left:left + size])
    with torch.no_grad():
        net.eval()
        layer.impl = 'dense' if size * size <= 4096 else 'blocked'   # only the input is wanted here
        net(torch.stack(crops))
    layer.impl = 'auto'
    return layer, captured[0]


def _build(spec: dict):
    """The HSPA layer, its input and the functions that run one case: 'dense' (the published algorithm),
    'project' (the layer as the project builds it, default impl) and 'floor' (the score matmuls only)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / 'src'))
    from nlsr.model.attention import HSPA

    if spec['march']:
        # The project's layer calls model.hspa.native.load() for its library: hand it the one built for --march.
        from nlsr.model.hspa import native

        lib = native.load(spec['march'])
        if lib is None:
            raise SystemExit(f'--march {spec["march"]}: {native.unavailable_reason()}')
        native.load = lambda march=None: lib

    torch.manual_seed(spec['seed'])
    size, batch, topk = spec['size'], spec['batch'], spec['topk']
    if spec['features'] == 'trained':
        layer, x = _trained_input(spec)
        topk = layer.topk
    else:
        # The block the paper offers for other networks, built with the published signature.
        layer = HSPA(channel=spec['channels'], reduction=spec['reduction'], res_scale=0.1, topk=topk)
        c = spec['channels']
        if spec['features'] == 'image':
            # Crops of a real LR image through a random 3x3 conv, as in an untrained network.
            import imageio.v3 as imageio
            import numpy as np

            img = imageio.imread(spec['images'][0])[..., :3]
            img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
            span = min(img.shape[1], img.shape[2]) - size
            if span < 0:
                raise ValueError(f'--features image needs --sizes <= {min(img.shape[1:])}')
            crops = [img[:, (7 * i) % (span + 1):, (13 * i) % (span + 1):][:, :size, :size] for i in range(batch)]
            with torch.no_grad():
                x = nn.Conv2d(3, c, 3, padding=1)(torch.stack(crops))
        else:
            x = torch.randn(batch, c, size, size)
    if spec['impl'] == 'float64':  # the reference of the gradients: the project's layer in float64
        layer, x = layer.double(), x.double()
    if spec['block']:
        layer.block_size = spec['block']

    def forward(inp):
        q, k, v = layer.embed(inp)
        if spec['impl'] == 'dense-rows':
            # Published algorithm on a subset of query rows only (the full 256x256 case does not fit).
            rows = torch.arange(0, q.shape[1], spec['row_stride'])
            attended = published_attention(q[:, rows], k, v, topk)
            return layer.res_scale * attended.transpose(1, 2) + inp.flatten(2)[:, :, rows]
        if spec['impl'] == 'dense':
            return layer.combine(published_attention(q, k, v, topk), inp)
        return layer(inp)

    if spec['impl'] == 'floor':
        with torch.no_grad():
            q, k, _ = layer.embed(x)
        block = min(2048, q.shape[1])
        buf = torch.empty(block, q.shape[1])

        def floor():
            for s in range(q.shape[0]):
                for r0 in range(0, q.shape[1], block):
                    rows = min(block, q.shape[1] - r0)
                    torch.mm(q[s, r0:r0 + rows], k[s].t(), out=buf[:rows])
            return {}
        return floor
    if spec['mode'] == 'infer':
        def run():
            with torch.no_grad():
                return {'out': forward(x)}
    else:
        x.requires_grad_(True)
        weight = torch.randn(x.shape).to(x.dtype)

        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = forward(x)
            (out * weight).sum().backward()
            grads = {'grad_' + name: p.grad for name, p in layer.named_parameters()}
            return {'out': out.detach(), 'grad_x': x.grad, **grads}
    return run


def _worker(spec: dict) -> dict:
    """'memory': one implementation, first run, extra peak RSS, outputs saved. 'time': the listed
    implementations built side by side and run alternately (after one warm-up each), so that load
    changes on a shared machine hit both alike."""
    import torch

    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    if spec['kind'] == 'time':
        runs = {impl: _build({**spec, 'impl': impl}) for impl in spec['impls']}
        for run in runs.values():
            run()
        times = alternate({impl: functools.partial(time_call, run) for impl, run in runs.items()}, spec['repeats'])
        return {'times': times, 'median_s': {impl: statistics.median(t) for impl, t in times.items()},
                'threads': torch.get_num_threads()}
    run = _build(spec)
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        result = run()
        first = time.perf_counter() - t0
    torch.save(result, spec['save'])
    return {'extra_mib': peak.extra_mib, 'peak_method': peak.method, 'first_s': first,
            'threads': torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------

def _max_diff(path_a: str, path_b: str, row_stride: int = 0) -> dict:
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    out_a = a['out'].flatten(2)[:, :, ::row_stride] if row_stride else a['out']
    out = float((out_a - b['out']).abs().max())
    grads = {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in a if k != 'out'}
    if grads:
        print(f'# relative gradient differences: {grads}', file=sys.stderr)
    # The input gradient is the one comparable with the tests' criterion; parameter gradients are sums
    # over all positions whose float32 rounding depends on summation order (noted in the README).
    return {'out': out, 'grad_rel': grads.get('grad_x')}


def _kernel_details(threads: int, wait_policy: str | None, march: str | None) -> list[str]:
    """The machine line's HSPA details: caches, the native kernel's build, torch threads, OMP_WAIT_POLICY."""
    sys.path.insert(0, str(ROOT / 'src'))
    from nlsr.model.hspa import native

    l1d, l2 = native.cache_sizes()
    lib = native.load(march)
    build = (f'kernel built with -march={march or "native"}, {lib.hspa_vector_bytes() * 8}-bit vectors, '
             f'{"bf16 screening of float32 scores" if native.screens(lib) else "float32 scores only"}'
             if lib is not None else f'no native kernel ({native.unavailable_reason()})')
    return [f'L1d {l1d // 1024} KiB, L2 {l2 // 1024} KiB per core', build, f'{threads} torch threads per run',
            f'OMP_WAIT_POLICY={wait_policy or os.environ.get("OMP_WAIT_POLICY", "(unset)")}']


def _images(features: str) -> list[str]:
    """LR x2 images for the image and trained cases: Set5 and Set14 from ../shared (Set5 from the repo's
    datasets/ copy when ../shared is absent)."""
    paths = []
    for base in (ROOT.parent / 'shared' / 'data' / 'benchmark', ROOT / 'datasets' / 'benchmark'):
        for name in ('Set5', 'Set14'):
            folder = base / name / 'LR_bicubic' / 'X2'
            if folder.is_dir() and not any(Path(p).parent.parent.parent.name == name for p in paths):
                paths += [str(p) for p in sorted(folder.glob('*.png'))]
    if features != 'randn' and not paths:
        raise SystemExit('no Set5/Set14 LR images found under ../shared/data/benchmark or datasets/benchmark')
    return paths


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', type=int, nargs='*', default=[48, 96, 128, 256], help='inference map sizes')
    p.add_argument('--channels', type=int, default=192)
    p.add_argument('--reduction', type=int, default=2)
    p.add_argument('--topk', type=int, default=128)
    p.add_argument('--repeats', type=int, default=5, help='timed runs of each implementation (after a warm-up)')
    p.add_argument('--batch', type=int, default=1, help='inference batch (trained features: crops of this '
                   'many images; each inference case runs them as one batch)')
    p.add_argument('--train-batch', type=int, default=16)
    p.add_argument('--train-size', type=int, default=48)
    p.add_argument('--no-train', action='store_true', help='skip the training-step case')
    p.add_argument('--block', type=int, default=0, help='HSPA block_size (0: automatic)')
    p.add_argument('--threads', type=int, default=0, help='torch threads in the workers (0: torch default)')
    p.add_argument('--features', choices=['randn', 'image', 'trained'], default='randn',
                   help='layer input: N(0,1) features; crops of a Set5 LR image through a random 3x3 conv; or '
                        'the input of the trained quick-demo HSPA layer on Set5/Set14 crops (--weights)')
    p.add_argument('--weights', default=str(ROOT / 'experiment' / 'quick' / 'model' / 'model_latest.pt'),
                   help='checkpoint for --features trained (made by: bash demo.sh quick)')
    p.add_argument('--march', help='build the native kernel for this -march target instead of the host '
                   '(e.g. x86-64-v3: AVX2 without AVX-512), as a separate library')
    p.add_argument('--omp-wait-policy', choices=['PASSIVE', 'ACTIVE'],
                   help='OMP_WAIT_POLICY for the workers (default: unset, as a user runs it)')
    p.add_argument('--dense-limit-gib', type=float, default=8.0,
                   help='skip the dense baseline when its (L x L) score matrix alone exceeds this')
    p.add_argument('--check-rows', type=int, default=1024,
                   help='when the dense baseline is skipped, compare this many query rows against it')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--worker', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cell_ratio(t: float | None, floor: float | None, why: str | None) -> str:
    if t is None:
        return why if why and why.startswith('failed') else f'skipped ({why})'
    return f'{t / floor:.2f}x ({t:.3f} s)' if floor else f'{t:.3f} s'


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    images = _images(args.features)
    if args.features == 'trained' and not Path(args.weights).is_file():
        raise SystemExit(f'--weights {args.weights}: no such checkpoint (make it with: bash demo.sh quick)')
    cases = [('infer', s, args.batch) for s in args.sizes]
    if not args.no_train:
        cases.append(('train', args.train_size, args.train_batch))
    rows = []
    env = {'OMP_WAIT_POLICY': args.omp_wait_policy} if args.omp_wait_policy else None
    with tempfile.TemporaryDirectory() as tmp:
        for mode, size, batch in cases:
            length = size * size
            too_big = batch * length * length * 4 > args.dense_limit_gib * 2**30
            row_stride = max(1, length // args.check_rows) if too_big else 0
            base = {'mode': mode, 'size': size, 'batch': batch, 'channels': args.channels,
                    'reduction': args.reduction, 'topk': args.topk, 'block': args.block, 'seed': args.seed,
                    'threads': args.threads, 'row_stride': row_stride, 'repeats': args.repeats,
                    'features': args.features, 'weights': args.weights, 'images': images, 'march': args.march}
            impls = ['project'] if too_big else ['dense', 'project']
            mem = {}
            extra = (['dense-rows'] if too_big and mode == 'infer' else []) + (['float64'] if mode == 'train' else [])
            for impl in impls + extra:
                mem[impl] = run_case(__file__, {**base, 'kind': 'memory', 'impl': impl,
                                                'save': str(Path(tmp) / f'{mode}{size}_{impl}.pt')}, env=env)
                print(f'# {mode} {size}x{size} batch {batch} {impl} memory: {mem[impl]}', file=sys.stderr, flush=True)
            timing = run_case(__file__, {**base, 'kind': 'time', 'impls': impls + ['floor']}, env=env)
            print(f'# {mode} {size}x{size} batch {batch} timing: {timing}', file=sys.stderr, flush=True)
            medians = timing.get('median_s', {})
            diff = None
            ours = str(Path(tmp) / f'{mode}{size}_project.pt')
            if 'extra_mib' in mem['project'] and 'extra_mib' in mem.get('dense', {}):
                diff = _max_diff(ours, str(Path(tmp) / f'{mode}{size}_dense.pt'))
                if 'extra_mib' in mem.get('float64', {}):
                    exact = str(Path(tmp) / f'{mode}{size}_float64.pt')
                    diff['grad_f64'] = tuple(_max_diff(str(Path(tmp) / f'{mode}{size}_{impl}.pt'), exact)['grad_rel']
                                             for impl in ('dense', 'project'))
            elif 'extra_mib' in mem['project'] and 'extra_mib' in mem.get('dense-rows', {}):
                diff = _max_diff(ours, str(Path(tmp) / f'{mode}{size}_dense-rows.pt'), row_stride)
                diff['rows'] = len(range(0, length, row_stride))
            skipped = f'{batch * length * length * 4 / 2**30:.0f} GiB score matrix' if too_big else \
                (mem.get('dense', {}).get('error') or timing.get('error'))
            rows.append({'mode': mode, 'size': size, 'batch': batch, 'medians': medians, 'skipped': skipped,
                         'dense_mib': mem.get('dense', {}).get('extra_mib'),
                         'ours_mib': mem['project'].get('extra_mib'),
                         'error': mem['project'].get('error') or timing.get('error'), 'diff': diff,
                         'threads': timing.get('threads')})
    threads = next((r['threads'] for r in rows if r['threads']), 0)
    print(f'Machine: {machine_line(*_kernel_details(threads, args.omp_wait_policy, args.march))}; '
          f'layer input: {args.features}\n')
    print('Times as a multiple of the score-matmul floor measured in the same worker (seconds in brackets).\n')
    print('| case | score-matmul floor | dense / floor | project / floor | speed-up | dense extra mem '
          '| project extra mem | mem ratio | max abs diff (out) | max rel diff (input grad) '
          '| input grad vs float64: dense, project |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        name = f'{"inference" if r["mode"] == "infer" else "train step"} {r["size"]}x{r["size"]}, batch {r["batch"]}'
        d_t, o_t, f_t = (r['medians'].get(k) for k in ('dense', 'project', 'floor'))
        d_m, o_m, diff = r['dense_mib'], r['ours_mib'], r['diff']
        cells = [name, f'{f_t:.3f} s' if f_t is not None else '—',
                 _cell_ratio(d_t, f_t, r['skipped']),
                 _cell_ratio(o_t, f_t, f'failed ({r["error"]})'),
                 f'{d_t / o_t:.1f}x' if d_t and o_t else '—',
                 fmt_mib(d_m), fmt_mib(o_m), f'{d_m / o_m:.1f}x' if d_m and o_m else '—',
                 (f'{diff["out"]:.1e}' + (f' ({diff["rows"]} rows)' if 'rows' in diff else '')) if diff else '—',
                 f'{diff["grad_rel"]:.1e}' if diff and diff['grad_rel'] is not None else '—',
                 ', '.join(f'{d:.1e}' for d in diff['grad_f64']) if diff and 'grad_f64' in diff else '—']
        print('| ' + ' | '.join(cells) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
