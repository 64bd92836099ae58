"""Benchmark: the published dense HSPA vs the project's HSPA layer (default impl) and the score-matmul floor.

Not a test. Memory: every (case, implementation) runs once in a fresh subprocess; the worker builds
its inputs, resets the kernel's peak-RSS counter (/proc/self/clear_refs, "5"), runs the case once and
reads VmHWM: extra peak memory = VmHWM - RSS just before the run (torch's own allocations included,
which tracemalloc would miss). Outputs (and gradients for the training step) are saved to a temporary
folder and compared by the parent. Time: one more subprocess per case builds both implementations and
runs them alternately ``--repeats`` times after a warm-up (median reported), so that load changes on a
shared machine hit both alike.

The layer is ``model.attention.HSPA`` built with the published signature (channel 192, reduction 2,
res_scale 0.1, topk 128; random weights) as the project runs it by default, or, with ``--features
trained``, the HSPA layer of the quick demo's trained checkpoint (``--weights``) on the inputs it gets
from 128x128 LR crops of Set5 and Set14. The baseline runs the same layer's embeddings through the
published algorithm, reimplemented here: full (L x L) score matrix, top-k based threshold with the 2k
retry, dense weights @ values, and its saved-output backward. The floor is the score matmul alone
(q @ k^T for every query row, in blocks of 2048 rows into one buffer), timed in the same worker.

    python benchmarks/hspa.py                                   # random features, 48..256 and training
    python benchmarks/hspa.py --features trained --sizes 128 --no-train \
        --weights experiment/quick/model/model_latest.pt
    python benchmarks/hspa.py --march x86-64-v3 --sizes 128 --no-train   # the AVX2 build of the kernel

The header names the CPU, its vector extensions and caches, and the kernel's build; every time is given as a
multiple of the floor measured in the same worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Worker side (runs in its own process)
# ----------------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} missing from /proc/self/status')


def _reset_peak() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _published_threshold(s, topk: int):
    """tau and support size of sparsemax along the last dim of max-shifted rows, the published way:
    top-k candidates, cumulative sums, and rows whose support reaches k redone with 2k."""
    import torch

    length = s.shape[-1]
    partial = topk < length
    top = torch.topk(s, k=topk, dim=-1).values if partial else torch.sort(s, dim=-1, descending=True).values
    csum = top.cumsum(-1) - 1
    ranks = torch.arange(1, top.shape[-1] + 1, device=s.device, dtype=s.dtype)
    support = (ranks * top > csum).sum(-1, keepdim=True)
    tau = csum.gather(-1, support - 1) / support.to(s.dtype)
    if partial:
        redo = (support == topk).squeeze(-1)
        if torch.any(redo):
            tau_redo, support_redo = _published_threshold(s[redo], 2 * topk)
            tau[redo] = tau_redo
            support[redo] = support_redo
    return tau, support


def _published_st_function():
    import torch

    class PublishedSoftThreshold(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, topk):
            shifted = scores - scores.max(dim=-1, keepdim=True).values
            tau, support = _published_threshold(shifted, topk)
            out = torch.clamp(shifted - tau, min=0)
            ctx.save_for_backward(support, out)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            support, out = ctx.saved_tensors
            grad = grad_out.clone()
            grad[out == 0] = 0
            mean = (grad.sum(-1) / support.to(out.dtype).squeeze(-1)).unsqueeze(-1)
            return torch.where(out != 0, grad - mean, grad), None

    return PublishedSoftThreshold


QUICK_FLAGS = ['--model', 'HSPAN', '--scale', '2', '--rgb_range', '1', '--n_resgroups', '1', '--n_resblocks', '6',
               '--n_feats', '48', '--reduction', '2', '--topk', '128', '--res_scale', '1']


def _trained_input(spec: dict):
    """The quick demo's trained HSPA layer and its input on LR crops of Set5/Set14 (x2, from the repo's
    datasets/ or ../shared): the features a trained network gives its attention."""
    import imageio.v3 as imageio
    import numpy as np
    import torch

    import model as model_pkg
    import option
    from model.checkpoint import load_into

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
        layer.impl = 'dense' if size * size <= 4096 else 'fast'   # only the input is wanted here
        net(torch.stack(crops))
    layer.impl = 'auto'
    return layer, captured[0]


def _build(spec: dict):
    """The HSPA layer, its input and the functions that run one case: 'dense' (the published algorithm),
    'project' (the layer as the project builds it, default impl) and 'floor' (the score matmuls only)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / 'src'))
    from model.attention import HSPA

    if spec['march']:
        # The project's layer calls model.hspa.native.load() for its library: hand it the one built for --march.
        from model.hspa import native

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
    if spec['block']:
        layer.block_size = spec['block']
    st = _published_st_function()

    def forward(inp):
        q, k, v = layer.embed(inp)
        if spec['impl'] == 'dense-rows':
            # Published algorithm on a subset of query rows only (the full 256x256 case does not fit).
            rows = torch.arange(0, q.shape[1], spec['row_stride'])
            attended = torch.bmm(st.apply(torch.bmm(q[:, rows], k.transpose(1, 2)), topk), v)
            return layer.res_scale * attended.transpose(1, 2) + inp.flatten(2)[:, :, rows]
        if spec['impl'] == 'dense':
            return layer.combine(torch.bmm(st.apply(torch.bmm(q, k.transpose(1, 2)), topk), v), inp)
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
        weight = torch.randn(x.shape)

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
        times: dict[str, list[float]] = {impl: [] for impl in runs}
        for run in runs.values():
            run()
        for _ in range(spec['repeats']):
            for impl, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[impl].append(time.perf_counter() - t0)
        return {'times': times, 'median_s': {impl: statistics.median(t) for impl, t in times.items()},
                'threads': torch.get_num_threads()}
    run = _build(spec)
    rss_before = _rss_kib('VmRSS')
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    result = run()
    first = time.perf_counter() - t0
    peak = _rss_kib('VmHWM') if exact_peak else _maxrss_kib()
    torch.save(result, spec['save'])
    return {'extra_mib': (peak - rss_before) / 1024, 'peak_method': 'VmHWM' if exact_peak else 'ru_maxrss',
            'first_s': first, 'threads': torch.get_num_threads()}


def _maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ----------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------

def _run_case(spec: dict, wait_policy: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', json.dumps(spec)]
    env = {**os.environ, 'OMP_WAIT_POLICY': wait_policy} if wait_policy else None
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


# Vector extensions named in the header, as /proc/cpuinfo spells them (x86 flags, aarch64 features).
_VECTOR_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni', 'avx512_bf16',
                 'avx512_fp16', 'amx_tile', 'amx_bf16', 'asimd', 'sve', 'sve2')


def _machine(threads: int, wait_policy: str | None, march: str | None) -> str:
    import torch

    sys.path.insert(0, str(ROOT / 'src'))
    from model.hspa import native

    model, flags = platform.processor() or 'unknown CPU', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('model name', 'Model') and model in ('unknown CPU', platform.processor()):
                    model = value.strip()
                elif key.strip() in ('flags', 'Features'):
                    flags = set(value.split())
    except OSError:
        pass
    vector = ' '.join(f for f in _VECTOR_FLAGS if f in flags) or 'unknown'
    l1d, l2 = native.cache_sizes()
    lib = native.load(march)
    build = (f'kernel built with -march={march or "native"}, {lib.hspa_vector_bytes() * 8}-bit vectors'
             if lib is not None else f'no native kernel ({native.unavailable_reason()})')
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    return (f'{model} ({vector}; L1d {l1d // 1024} KiB, L2 {l2 // 1024} KiB per core), {os.cpu_count()} cores, '
            f'{build}, torch {torch.__version__}, {threads} torch threads per run, '
            f'OMP_WAIT_POLICY={wait_policy or os.environ.get("OMP_WAIT_POLICY", "(unset)")}, '
            f'load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')


def _fmt_mib(x: float | None) -> str:
    return '—' if x is None else (f'{x / 1024:.2f} GiB' if x >= 1024 else f'{x:.0f} MiB')


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
            for impl in impls + (['dense-rows'] if too_big and mode == 'infer' else []):
                mem[impl] = _run_case({**base, 'kind': 'memory', 'impl': impl,
                                       'save': str(Path(tmp) / f'{mode}{size}_{impl}.pt')}, args.omp_wait_policy)
                print(f'# {mode} {size}x{size} batch {batch} {impl} memory: {mem[impl]}', file=sys.stderr, flush=True)
            timing = _run_case({**base, 'kind': 'time', 'impls': impls + ['floor']}, args.omp_wait_policy)
            print(f'# {mode} {size}x{size} batch {batch} timing: {timing}', file=sys.stderr, flush=True)
            medians = timing.get('median_s', {})
            diff = None
            ours = str(Path(tmp) / f'{mode}{size}_project.pt')
            if 'extra_mib' in mem['project'] and 'extra_mib' in mem.get('dense', {}):
                diff = _max_diff(ours, str(Path(tmp) / f'{mode}{size}_dense.pt'))
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
    print(f'Machine: {_machine(threads, args.omp_wait_policy, args.march)}; layer input: {args.features}\n')
    print('Times as a multiple of the score-matmul floor measured in the same worker (seconds in brackets).\n')
    print('| case | score-matmul floor | dense / floor | project / floor | speed-up | dense extra mem '
          '| project extra mem | mem ratio | max abs diff (out) | max rel diff (input grad) |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        name = f'{"inference" if r["mode"] == "infer" else "train step"} {r["size"]}x{r["size"]}, batch {r["batch"]}'
        d_t, o_t, f_t = (r['medians'].get(k) for k in ('dense', 'project', 'floor'))
        d_m, o_m, diff = r['dense_mib'], r['ours_mib'], r['diff']
        cells = [name, f'{f_t:.3f} s' if f_t is not None else '—',
                 _cell_ratio(d_t, f_t, r['skipped']),
                 _cell_ratio(o_t, f_t, f'failed ({r["error"]})'),
                 f'{d_t / o_t:.1f}x' if d_t and o_t else '—',
                 _fmt_mib(d_m), _fmt_mib(o_m), f'{d_m / o_m:.1f}x' if d_m and o_m else '—',
                 (f'{diff["out"]:.1e}' + (f' ({diff["rows"]} rows)' if 'rows' in diff else '')) if diff else '—',
                 f'{diff["grad_rel"]:.1e}' if diff and diff['grad_rel'] is not None else '—']
        print('| ' + ' | '.join(cells) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
