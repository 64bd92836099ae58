"""Everything CUDA-specific in one script (about 6 minutes on one GPU); prints one table.

    python benchmarks/gpu_check.py              # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --quick      # smaller sizes, fewer repeats

1. HSPA correctness on CUDA: dense, fast (torch back-end) and triton against a float64 sort-based sparsemax
   oracle (outputs and q/k/v gradients), on random and near-uniform scores, L not a power of two; and the
   whole HSPA layer with impl='fast' (model/hspa/layer.py) against impl='dense' in float64.
2. One HSPA layer as published (channel 192, reduction 2): time and peak GPU memory of dense, triton,
   fast and auto at a 16x48x48 training step (forward + backward) and at 128x128, 256x256 and 384x512
   inference (dense skipped where its score matrix would not fit); the auto row names the path that
   model.hspa.plan picks for it.
3. A training step of the published HSPAN x2 configuration (batch 16, 48x48 LR patches) in float32,
   --amp bf16 and --amp fp16 (autocast, plus loss scaling for fp16).
4. --precision half evaluation of one Set5 image through the Model wrapper.
5. A 1-process nccl torchrun run of a tiny HSPAN for 2 epochs through src/main.py.
6. The static table of benchmarks/gpu_static.py for this GPU's compute capability (compiled here: shared
   memory, registers and spills of every fused Triton kernel launch).

Without CUDA it checks what it can on the CPU (imports, the CLI commands it would run), then says plainly
that there is no GPU and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time

import torch

from harness import ROOT, machine_line

sys.path.insert(0, str(ROOT / 'src'))

from model import attention  # noqa: E402
from model.hspa import hspa_attention, plan  # noqa: E402
from model.hspa.triton import available as triton_available  # noqa: E402
from model.hspa.triton import hspa_triton  # noqa: E402
from model.networks.hspan import HSPAN  # noqa: E402

HSPAN_X2 = dict(scale=2, n_feats=192, n_resgroups=10, n_resblocks=4, reduction=2, topk=128, res_scale=0.1,
                rgb_range=1)
TINY_RUN = ['--model', 'HSPAN', '--scale', '2', '--rgb_range', '1', '--n_resgroups', '1', '--n_resblocks', '1',
            '--n_feats', '16', '--reduction', '2', '--dir_data', str(ROOT / 'datasets'), '--data_train', 'T91',
            '--data_test', 'Set5', '--data_range', '1-16/1-2', '--patch_size', '48', '--batch_size', '4',
            '--epochs', '2', '--test_every', '4', '--print_every', '2', '--reset', '--n_threads', '0']
EVAL_HALF = ['--model', 'HSPAN', '--scale', '4', '--rgb_range', '1', '--n_resgroups', '10', '--n_resblocks', '4',
             '--n_feats', '192', '--reduction', '2', '--topk', '128', '--res_scale', '0.1', '--test_only',
             '--precision', 'half']
rows: list[tuple[str, str, str]] = []


def row(what: str, result: str, note: str = '') -> None:
    rows.append((what, result, note))
    print(f'# {what}: {result} {note}', file=sys.stderr, flush=True)


def sparsemax64(scores: torch.Tensor) -> torch.Tensor:
    z = scores.double() - scores.double().amax(-1, keepdim=True)
    zs = z.sort(-1, descending=True).values
    csum = zs.cumsum(-1) - 1
    ks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    k_sup = (ks * zs > csum).sum(-1, keepdim=True)
    return torch.relu(z - csum.gather(-1, k_sup - 1) / k_sup.to(z.dtype))


def check_correctness(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    impls = {'dense': lambda q, k, v: attention.soft_threshold(q @ k.transpose(1, 2), dim=-1, topk=16) @ v,
             'fast': lambda q, k, v: hspa_attention(q, k, v, 16, 97, backend='torch')}
    if triton_available():
        impls['triton'] = hspa_triton
    for scale in (1.0, 0.02):
        q, k, v = (torch.randn(2, 777, c, generator=gen) for c in (48, 48, 96))
        q = q * scale
        weight = torch.randn(2, 777, 96, generator=gen)
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        ref = sparsemax64(leaves[0] @ leaves[1].transpose(1, 2)) @ leaves[2]
        ref_grads = torch.autograd.grad((ref * weight.double()).sum(), leaves)
        for name, fn in impls.items():
            xs = [t.to(device).requires_grad_(True) for t in (q, k, v)]
            out = fn(*xs)
            grads = torch.autograd.grad((out * weight.to(device)).sum(), xs)
            errs = [float((a.double().cpu() - b).abs().max() / b.abs().max())
                    for a, b in zip((out, *grads), (ref, *ref_grads), strict=True)]
            row(f'correctness {name}, scores x{scale}', 'pass' if max(errs) <= 1e-5 else 'FAIL',
                'max rel err out/dq/dk/dv ' + ' '.join(f'{e:.1e}' for e in errs))


def check_layer(device: str) -> None:
    """The HSPA module with impl='fast' (on CUDA: model/hspa/layer.py with the torch back-end) against
    impl='dense' in float64: output and the gradients of the input and of every parameter."""
    torch.manual_seed(0)
    layer = attention.HSPA(channel=32, reduction=2, res_scale=0.3, topk=16).double().to(device)
    x = torch.randn(3, 32, 17, 19, dtype=torch.float64, device=device)
    results = {}
    for impl in ('dense', 'fast'):
        layer.impl = impl
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        out.square().sum().backward()
        results[impl] = [out.detach(), inp.grad, *(p.grad for p in layer.parameters())]
    errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(results['fast'], results['dense'], strict=True)]
    row('correctness HSPA layer fast vs dense (float64)', 'pass' if max(errs) <= 1e-10 else 'FAIL',
        f'max rel err over output, input and {len(errs) - 2} parameter gradients {max(errs):.1e}')


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds and peak extra GPU memory (GiB) of fn()."""
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    if train:
        layer(x).square().mean().backward()
    else:
        with torch.no_grad():
            layer(x)


def _train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                lr_img: torch.Tensor, hr: torch.Tensor, dtype: torch.dtype | None) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = (net(lr_img) - hr).abs().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def layer_timings(device: str, sizes: list[tuple[int, int, int, bool]], repeats: int) -> None:
    free = torch.cuda.mem_get_info()[0]
    for batch, h, w, train in sizes:
        torch.manual_seed(0)
        layer = attention.HSPA(channel=192, reduction=2, res_scale=0.1, topk=128).to(device)
        x = torch.randn(batch, 192, h, w, device=device, requires_grad=train)
        scores_bytes = batch * (h * w) ** 2 * 4
        for impl in ('dense', 'triton', 'fast', 'auto'):
            case = f'HSPA layer {"train step" if train else "inference"} {batch}x{h}x{w}, {impl}'
            if impl == 'auto':
                chosen = plan('auto', torch.device(device), batch, h * w, fusable=True)
                case += f' -> {chosen.path}' + (f' ({chosen.backend})' if chosen.backend else '')
            if impl == 'dense' and 3 * scores_bytes > free:
                row(case, 'skipped', f'{scores_bytes / 2**30:.1f} GiB score matrix')
                continue
            if impl == 'triton' and not triton_available():
                row(case, 'skipped', 'triton not installed')
                continue
            layer.impl = impl
            try:
                t, mem = timed(functools.partial(_layer_step, layer, x, train), repeats)
                row(case, f'{t * 1000:.1f} ms', f'peak +{mem:.2f} GiB')
            except torch.cuda.OutOfMemoryError:
                row(case, 'out of memory')
                torch.cuda.empty_cache()


def training_steps(device: str, repeats: int) -> None:
    for amp in ('off', 'bf16', 'fp16'):
        torch.manual_seed(0)
        net = HSPAN(**HSPAN_X2).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler('cuda', enabled=amp == 'fp16')
        lr_img = torch.rand(16, 3, 48, 48, device=device)
        hr = torch.rand(16, 3, 96, 96, device=device)
        dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
        try:
            t, mem = timed(functools.partial(_train_step, net, opt, scaler, lr_img, hr, dtype), repeats)
            row(f'HSPAN x2 training step, batch 16x48x48, --amp {amp}', f'{t * 1000:.0f} ms', f'peak +{mem:.2f} GiB')
        except torch.cuda.OutOfMemoryError:
            row(f'HSPAN x2 training step, --amp {amp}', 'out of memory')
        del net, opt
        torch.cuda.empty_cache()


def half_eval() -> None:
    import imageio.v3 as imageio
    import numpy as np

    import model as model_pkg
    import option

    args = option.parse(EVAL_HALF)
    wrapper = model_pkg.Model(args, log=lambda *_: None).eval()
    img = imageio.imread(ROOT / 'datasets' / 'benchmark' / 'Set5' / 'LR_bicubic' / 'X4' / 'img_001x4.png')
    lr = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float().cuda() / 255
    with torch.no_grad():
        t, mem = timed(lambda: wrapper(lr), 3)
        ref = wrapper.model.float()(lr)
        wrapper.model.half()
        diff = float((wrapper(lr).float() - ref).abs().max())
    row('--precision half evaluation, HSPAN x4, Set5 baby 128x128 (random weights)', f'{t * 1000:.0f} ms',
        f'peak +{mem:.2f} GiB, max |half - float32| {diff:.1e}')


def nccl_run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
               str(ROOT / 'src' / 'main.py'), *TINY_RUN, '--save', 'gpu_check_nccl', '--dir_cache', tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        log = proc.stdout + proc.stderr
        backend = 'nccl' if 'nccl' in log else 'backend not reported'
        ok = proc.returncode == 0
        row('torchrun 1 process, tiny HSPAN, 2 epochs', 'pass' if ok else f'FAIL (exit {proc.returncode})',
            f'{time.perf_counter() - t0:.0f} s, {backend}' + ('' if ok else f': {log.strip()[-300:]}'))


def static_table(capability: tuple[int, int]) -> str:
    """benchmarks/gpu_static.py's table for one compute capability."""
    import gpu_static

    rows = gpu_static.check([capability[0] * 10 + capability[1]])
    row(f'static check of the triton kernels for sm_{capability[0]}{capability[1]}',
        'pass' if all(r.ok for r in rows) else 'FAIL', gpu_static.summary(rows))
    return gpu_static.markdown(rows, merge_dtypes=True)


def cpu_side_checks() -> None:
    """What needs no GPU: the CLI commands parse, and the triton package imports."""
    import option

    option.parse(['--cpu', *TINY_RUN])
    option.parse(['--cpu', *EVAL_HALF])
    row('CLI commands of this script parse', 'pass')
    row('triton importable', 'yes' if triton_available() else 'no (pip install -r requirements-gpu.txt)')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='smaller sizes and fewer repeats')
    args = p.parse_args(argv)
    cpu_side_checks()
    if not torch.cuda.is_available():
        print('\nNo CUDA GPU on this machine: the GPU checks did not run (nothing was measured on a GPU).')
        return 2
    device = 'cuda'
    name = torch.cuda.get_device_name()
    repeats = 3 if args.quick else 5
    sizes = [(16, 48, 48, True), (1, 128, 128, False), (1, 256, 256, False)]
    if not args.quick:
        sizes.append((1, 384, 512, False))
    start = time.perf_counter()
    static: list[str] = []
    steps = [lambda: static.append(static_table(torch.cuda.get_device_capability()))] if triton_available() else []
    for step in (*steps, lambda: check_correctness(device), lambda: check_layer(device),
                 lambda: layer_timings(device, sizes, repeats),
                 lambda: training_steps(device, repeats), half_eval, nccl_run):
        try:
            step()
        except Exception as e:  # one failing check must not hide the others
            row('check failed', type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
    print(f'\nMachine: {machine_line(f"GPU {name}")}; total {time.perf_counter() - start:.0f} s\n')
    print('| check | result | notes |\n|---|---|---|')
    for what, result, note in rows:
        print(f'| {what} | {result} | {note} |')
    for table in static:
        print(f'\nStatic resources of the triton kernels on this GPU\'s architecture:\n\n{table}')
    return 0 if not any(r[1].startswith(('FAIL', 'check failed')) for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
