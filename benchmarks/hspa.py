"""Benchmark: published dense HSPA vs the blocked exact HSPA of src/model/hspa_fast.py (issue 4).

Not a test. Memory: every (case, implementation) runs once in a fresh subprocess; the worker builds
its inputs, resets the kernel's peak-RSS counter (/proc/self/clear_refs, "5"), runs the case once and
reads VmHWM: extra peak memory = VmHWM - RSS just before the run (torch's own allocations included,
which tracemalloc would miss). Outputs (and gradients for the training step) are saved to a temporary
folder and compared by the parent. Time: one more subprocess per case builds both implementations and
runs them alternately ``--repeats`` times after a warm-up (median reported), so that load changes on a
shared machine hit both alike.

The module is one HSPA layer as published (1x1 conv + PReLU embeddings, C -> C/reduction for the
matching, C -> C for the assembly; score = embed1 . embed2 over all positions; soft thresholding;
weights @ assembly; residual), with random weights. The baseline reimplements the published algorithm:
full (L x L) score matrix, top-k based threshold with the 2k retry, dense weights @ values, and its
saved-output backward.

    python benchmarks/hspa.py --omp-wait-policy PASSIVE    # README table 1 (--threads 1: table 2)
    python benchmarks/hspa.py --sizes 48 96 --repeats 2 --no-train
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


def _build(spec: dict):
    """The HSPA layer, its input and the function that runs one case."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / 'src'))
    from model.hspa_fast import hspa_attention

    torch.manual_seed(spec['seed'])
    c, r, topk = spec['channels'], spec['reduction'], spec['topk']

    def embed(c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c_out, 1), nn.PReLU())

    layer = nn.ModuleDict({'match1': embed(c // r), 'match2': embed(c // r), 'assembly': embed(c)})
    size, batch = spec['size'], spec['batch']
    if spec.get('features', 'randn') == 'image':
        # Crops of a real LR image through a random 3x3 conv, as in an untrained network: compressed
        # scores (near-uniform rows, supports of tens of entries), the hard case for candidate search.
        import imageio.v3 as imageio
        import numpy as np

        img = imageio.imread(ROOT.parent / 'shared' / 'data' / 'benchmark' / 'Set5' / 'LR_bicubic' / 'X2' /
                             'img_001x2.png')[..., :3]
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        span = min(img.shape[1], img.shape[2]) - size
        if span < 0:
            raise ValueError(f'--features image needs --sizes <= {min(img.shape[1:])}')
        crops = [img[:, (7 * i) % (span + 1):, (13 * i) % (span + 1):][:, :size, :size] for i in range(batch)]
        with torch.no_grad():
            x = nn.Conv2d(3, c, 3, padding=1)(torch.stack(crops))
    else:
        x = torch.randn(batch, c, size, size)
    st = _published_st_function()

    def forward(inp):
        n, _, h, w = inp.shape
        q = layer['match1'](inp).flatten(2).transpose(1, 2)      # (N, L, C/r)
        k = layer['match2'](inp).flatten(2).transpose(1, 2)
        v = layer['assembly'](inp).flatten(2).transpose(1, 2)    # (N, L, C)
        if spec['impl'] == 'dense-rows':
            # Published algorithm on a subset of query rows only (the full 256x256 case does not fit).
            rows = torch.arange(0, h * w, spec['row_stride'])
            return torch.bmm(st.apply(torch.bmm(q[:, rows], k.transpose(1, 2)), topk), v).transpose(1, 2) + \
                inp.flatten(2)[:, :, rows]
        if spec['impl'] == 'dense':
            out = torch.bmm(st.apply(torch.bmm(q, k.transpose(1, 2)), topk), v)
        else:
            out = hspa_attention(q, k, v, topk, spec['block'])
        return out.transpose(1, 2).reshape(n, -1, h, w) + inp

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


def _machine(threads: int, wait_policy: str | None) -> str:
    import torch

    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    return (f'{model}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch threads per run, '
            f'OMP_WAIT_POLICY={wait_policy or os.environ.get("OMP_WAIT_POLICY", "(unset)")}, '
            f'load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')


def _fmt_mib(x: float | None) -> str:
    return '—' if x is None else (f'{x / 1024:.2f} GiB' if x >= 1024 else f'{x:.0f} MiB')


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', type=int, nargs='*', default=[48, 96, 128, 256], help='inference map sizes')
    p.add_argument('--channels', type=int, default=192)
    p.add_argument('--reduction', type=int, default=2)
    p.add_argument('--topk', type=int, default=128)
    p.add_argument('--repeats', type=int, default=5, help='timed runs of each implementation (after a warm-up)')
    p.add_argument('--train-batch', type=int, default=16)
    p.add_argument('--train-size', type=int, default=48)
    p.add_argument('--no-train', action='store_true', help='skip the training-step case')
    p.add_argument('--block', type=int, default=0, help='hspa_attention block_size (0: from its budget)')
    p.add_argument('--threads', type=int, default=0, help='torch threads in the workers (0: torch default)')
    p.add_argument('--features', choices=['randn', 'image'], default='randn',
                   help='layer input: N(0,1) features, or crops of a Set5 LR image (../shared) through a '
                        'random 3x3 conv (near-uniform scores)')
    p.add_argument('--omp-wait-policy', choices=['PASSIVE', 'ACTIVE'],
                   help='OMP_WAIT_POLICY for the workers; PASSIVE stops idle OpenMP threads from spinning, '
                        'which matters when other jobs share the cores')
    p.add_argument('--dense-limit-gib', type=float, default=8.0,
                   help='skip the dense baseline when its (L x L) score matrix alone exceeds this')
    p.add_argument('--check-rows', type=int, default=1024,
                   help='when the dense baseline is skipped, compare this many query rows against it')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--worker', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    cases = [('infer', s, 1) for s in args.sizes]
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
                    'features': args.features}
            impls = ['fast'] if too_big else ['dense', 'fast']
            mem = {}
            for impl in impls + (['dense-rows'] if too_big and mode == 'infer' else []):
                mem[impl] = _run_case({**base, 'kind': 'memory', 'impl': impl,
                                       'save': str(Path(tmp) / f'{mode}{size}_{impl}.pt')}, args.omp_wait_policy)
                print(f'# {mode} {size}x{size} batch {batch} {impl} memory: {mem[impl]}', file=sys.stderr, flush=True)
            timing = _run_case({**base, 'kind': 'time', 'impls': impls}, args.omp_wait_policy)
            print(f'# {mode} {size}x{size} batch {batch} timing: {timing}', file=sys.stderr, flush=True)
            medians = timing.get('median_s', {})
            dense = {'median_s': medians.get('dense'), 'extra_mib': mem.get('dense', {}).get('extra_mib'),
                     'threads': timing.get('threads'),
                     'skipped': f'{batch * length * length * 4 / 2**30:.0f} GiB score matrix' if too_big else None,
                     'error': mem.get('dense', {}).get('error') or timing.get('error')}
            fast = {'median_s': medians.get('fast'), 'extra_mib': mem['fast'].get('extra_mib'),
                    'error': mem['fast'].get('error') or timing.get('error')}
            diff = None
            fast_path = str(Path(tmp) / f'{mode}{size}_fast.pt')
            if 'extra_mib' in mem['fast'] and 'extra_mib' in mem.get('dense', {}):
                diff = _max_diff(fast_path, str(Path(tmp) / f'{mode}{size}_dense.pt'))
            elif 'extra_mib' in mem['fast'] and 'extra_mib' in mem.get('dense-rows', {}):
                diff = _max_diff(fast_path, str(Path(tmp) / f'{mode}{size}_dense-rows.pt'), row_stride)
                diff['rows'] = len(range(0, length, row_stride))
            rows.append((mode, size, batch, dense, fast, diff))
    threads = next((r.get('threads') for row in rows for r in row[3:5] if r.get('threads')), 0)
    print(f'Machine: {_machine(threads, args.omp_wait_policy)}; layer input: {args.features}\n')
    print('| case | dense time | fast time | speed-up | dense extra mem | fast extra mem | mem ratio '
          '| max abs diff (out) | max rel diff (input grad) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for mode, size, batch, dense, fast, diff in rows:
        name = f'{"inference" if mode == "infer" else "train step"} {size}x{size}, batch {batch}'
        d_t, f_t = dense.get('median_s'), fast.get('median_s')
        d_m, f_m = dense.get('extra_mib'), fast.get('extra_mib')
        skipped = dense.get('skipped') or dense.get('error')
        cells = [name,
                 f'{d_t:.3f} s' if d_t is not None else f'skipped ({skipped})',
                 f'{f_t:.3f} s' if f_t is not None else f'failed ({fast.get("error")})',
                 f'{d_t / f_t:.1f}x' if d_t and f_t else '—',
                 _fmt_mib(d_m), _fmt_mib(f_m),
                 f'{d_m / f_m:.1f}x' if d_m and f_m else '—',
                 (f'{diff["out"]:.1e}' + (f' ({diff["rows"]} rows)' if 'rows' in diff else '')) if diff else '—',
                 f'{diff["grad_rel"]:.1e}' if diff and diff['grad_rel'] is not None else '—']
        print('| ' + ' | '.join(cells) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
