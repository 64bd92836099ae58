"""The Model wrapper's evaluation modes, --compile, the memory rule near its limit, and main.py on CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from gpu_checks import FP32, GPU_CPU, ROOT, Context, check, compare, low_precision, rel, strict_float32
from nlsr.model.hspa import HSPA, plan
from nlsr.model.hspa import dispatch as hspa_dispatch

TINY = ['--model', 'HSPAN', '--scale', '2', '--rgb_range', '1', '--n_resgroups', '1', '--n_resblocks', '1',
        '--n_feats', '16', '--reduction', '2', '--topk', '16']
TRAIN = ['--dir_data', str(ROOT / 'datasets'), '--data_train', 'T91', '--data_test', 'Set5', '--data_range',
         '1-16/1-2', '--patch_size', '48', '--batch_size', '4', '--test_every', '4', '--print_every', '2',
         '--n_threads', '0', '--save_format', 'safetensors']


def _wrapper(ctx: Context, *flags: str, state: dict | None = None):
    from nlsr import option
    from nlsr.model import Model

    device = [] if ctx.device == 'cuda' else ['--cpu']
    args = option.parse([*TINY, '--test_only', '--data_test', 'Demo', '--dir_data', str(ctx.scratch), *device,
                         *flags])
    torch.manual_seed(0)
    wrapper = Model(args, log=lambda *_: None).eval()
    if state is not None:
        wrapper.load_weights(state, 'the reference weights')
    return wrapper


def _lr(device: str) -> torch.Tensor:
    return torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(5)).to(device)


@check('wrapper modes', 30)
def wrapper_modes(ctx: Context) -> None:
    """--precision half/bf16, --chop, --tile, --self_ensemble, channels_last on CUDA against fp32 / the CPU."""
    strict_float32()
    cpu_ref = _wrapper(Context('cpu', ctx.quick, ctx.scratch))
    state = cpu_ref.state_dict()
    lr_img = _lr(ctx.device)
    with torch.no_grad():
        fp32 = _wrapper(ctx, state=state)(lr_img)
        for name in ('half', 'bf16'):  # the wrapper hands back float32 whatever the precision
            out = _wrapper(ctx, '--precision', name, state=state)(lr_img)
            low_precision(ctx, f'--precision {name} vs fp32', out, fp32, torch.float32)
        last = _wrapper(ctx, '--channels_last', state=state)(lr_img)
        compare(ctx, '--channels_last vs fp32', last, fp32, FP32)
        for flags, name in ((['--chop'], '--chop (forced split)'), (['--tile', '24', '--tile_overlap', '8'], '--tile'),
                            (['--self_ensemble'], '--self_ensemble')):
            gpu, cpu = _wrapper(ctx, *flags, state=state), _wrapper(Context('cpu', ctx.quick, ctx.scratch), *flags,
                                                                     state=state)
            run = (lambda w, x: w.forward_chop(x, min_size=400)) if flags == ['--chop'] else (lambda w, x: w(x))
            ctx.bound(f'{name} on CUDA vs the CPU', rel(run(gpu, lr_img), run(cpu, lr_img.cpu())), GPU_CPU)


def _near_limit(free: int, batch: int, training: bool) -> tuple[int, int]:
    """(H, W) of the largest map that dense_fits at ``free`` bytes, by the rule itself."""
    factor = hspa_dispatch.DENSE_TRANSIENT + (hspa_dispatch.DENSE_RETAINED if training else 0)
    limit = int((hspa_dispatch.DENSE_SHARE * free / (4 * factor * batch)) ** 0.5)
    side = int(limit ** 0.5)
    return side, limit // side


@check('memory rule near its limit', 40)
def memory_rule(ctx: Context) -> None:
    """impl 'auto' just inside and just outside dense_fits: the plan, the peak memory, no OOM."""
    torch.cuda.empty_cache()
    free = hspa_dispatch.cuda_free_bytes(0)
    cases = [(1, False)] if ctx.quick else [(1, False), (2, True)]
    for n, training in cases:
        h, w = _near_limit(free, n, training)
        for width in (w, w + 2):
            torch.manual_seed(0)
            layer = HSPA(channel=32, reduction=2, topk=128).to(ctx.device)
            x = torch.randn(n, 32, h, width, device=ctx.device, requires_grad=training)
            fits = hspa_dispatch.dense_fits(n, h * width, hspa_dispatch.cuda_free_bytes(0), training)
            chosen = plan('auto', x.device, n, h * width, training=training, widths=(16, 32)).path
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            case = f'{"training" if training else "inference"} {n}x{h}x{width}: {chosen}'
            try:
                with torch.set_grad_enabled(training):
                    out = layer(x)
                    if training:
                        out.square().mean().backward()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                ok = chosen == ('dense' if fits else 'triton' if hspa_dispatch.fused.available() else 'blocked')
                ctx.row(case, 'pass' if ok else 'FAIL', f'peak +{peak:.2f} GiB of {free / 2**30:.1f} GiB usable')
            except torch.cuda.OutOfMemoryError:
                ctx.row(case, 'FAIL', f'out of memory with {free / 2**30:.1f} GiB usable')
            del layer, x
            torch.cuda.empty_cache()


def _main(ctx: Context, *argv: str) -> tuple[int, str, list[float]]:
    env = {**os.environ, 'SR_EXPERIMENT_ROOT': str(ctx.scratch / 'experiment')}
    done = subprocess.run([sys.executable, str(ROOT / 'src' / 'main.py'), *TINY, *argv], capture_output=True,
                          text=True, timeout=240, cwd=ROOT, env=env)
    log = done.stdout + done.stderr
    return done.returncode, log, [float(v) for v in re.findall(r'PSNR: ([0-9.]+)', log)]


@check('main.py train, resume, safetensors, test_only', 60)
def main_runs(ctx: Context) -> None:
    """main.py on CUDA: 1 epoch saved as safetensors, resumed for a 2nd, then --pre_train --test_only."""
    def ran(case: str, code: int, log: str, psnrs: list[float]) -> bool:
        ok = code == 0 and bool(psnrs)
        ctx.row(case, 'pass' if ok else 'FAIL', f'PSNR {psnrs[-1]:.4f}' if ok else
                f'exit {code}: {log.strip().splitlines()[-1][:200] if log.strip() else ""}')
        return ok

    if not ran('train 1 epoch', *_main(ctx, *TRAIN, '--epochs', '1', '--save', 'gpu_check', '--reset')):
        return
    code, log, psnrs = _main(ctx, *TRAIN, '--epochs', '2', '--load', 'gpu_check', '--resume', '-1')
    if not ran('resume for epoch 2', code, log, psnrs):
        return
    weights = ctx.scratch / 'experiment' / 'gpu_check' / 'model' / 'model_latest.safetensors'
    test = _main(ctx, '--dir_data', str(ROOT / 'datasets'), '--data_test', 'Set5', '--data_range', '1-16/1-2',
                 '--pre_train', str(weights), '--test_only', '--save', 'gpu_check_test', '--reset')
    if ran('--pre_train model_latest.safetensors --test_only', *test):
        ctx.row('PSNR after reloading', 'pass' if abs(test[2][-1] - psnrs[-1]) < 1e-9 else 'FAIL',
                f'{test[2][-1]:.4f} vs {psnrs[-1]:.4f} at the end of training')


@check('--compile', 80)
def compiled(ctx: Context) -> None:
    """--compile: the compiled network's evaluation output and a training step's loss against eager."""
    strict_float32()
    eager = _wrapper(ctx)
    state = eager.state_dict()
    comp = _wrapper(ctx, '--compile', state=state)
    lr_img = _lr(ctx.device)
    with torch.no_grad():
        ctx.bound('evaluation output vs eager', rel(comp(lr_img), eager(lr_img)), GPU_CPU)
    losses = []
    for w in (eager, comp):
        w.train()
        loss = w(lr_img).square().mean()
        loss.backward()
        losses.append(loss.detach())
    ctx.bound('training step loss vs eager', rel(losses[1], losses[0]), GPU_CPU)


@check('static Triton resources', 60)
def static_resources(ctx: Context) -> None:
    """The fused Triton kernels compiled for this GPU's architecture: shared memory, registers, no spills."""
    from nlsr.model.hspa.triton import available, static_check

    if not available():
        ctx.row('static check', 'skipped', 'triton is not installed')
        return
    major, minor = torch.cuda.get_device_capability()
    rows = static_check.check([major * 10 + minor])
    ctx.row(f'sm_{major}{minor}', 'pass' if all(r.ok for r in rows) else 'FAIL', static_check.summary(rows))
