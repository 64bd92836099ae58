"""HSPAN training on the GPU: the impls agree, AMP steps, GPU against the CPU kernels, DataParallel-style
threads, and a 2-process DDP step."""

from __future__ import annotations

import os
import threading

import torch

from gpu_checks import FP32, GPU_CPU, Context, check, compare, rel, strict_float32
from nlsr.model.hspa.triton import available as triton_available
from nlsr.model.networks.hspan import HSPAN

SMALL = dict(scale=2, n_feats=32, n_resgroups=2, n_resblocks=1, reduction=2, topk=16, res_scale=0.5)


def small_hspan(impl: str, device: str, seed: int = 0) -> HSPAN:
    torch.manual_seed(seed)
    return HSPAN(**SMALL, hspa_impl=impl).to(device)


def batch(device: str, n: int = 4, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    lr_img, hr = torch.rand(n, 3, size, size, generator=gen), torch.rand(n, 3, 2 * size, 2 * size, generator=gen)
    return lr_img.to(device), hr.to(device)


def step(net: torch.nn.Module, lr_img: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, every parameter gradient flattened into one vector) of one L1 training step."""
    net.train().zero_grad(set_to_none=True)
    loss = (net(lr_img).float() - hr).abs().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten().double().cpu() for p in net.parameters() if p.grad is not None])
    return loss.detach().double().cpu(), grads


@check('training step across impls', 20)
def training_impls(ctx: Context) -> None:
    """A small HSPAN training step: loss and parameter gradients of triton and blocked equal dense's."""
    strict_float32()
    lr_img, hr = batch(ctx.device)
    exact = step(small_hspan('dense', ctx.device).double(), lr_img.double(), hr.double())
    ref = step(small_hspan('dense', ctx.device), lr_img, hr)
    for impl in ('triton', 'blocked') if triton_available() else ('blocked',):
        got = step(small_hspan(impl, ctx.device), lr_img, hr)
        for part, g, r, e in zip(('loss', 'parameter gradients'), got, ref, exact, strict=True):
            compare(ctx, f'{impl} vs dense: {part}', g, r, FP32, exact=e)


@check('AMP steps', 15)
def amp_steps(ctx: Context) -> None:
    """5 Adam steps with --amp fp16 (GradScaler) and with bf16: finite losses, the loss scale holding."""
    lr_img, hr = batch(ctx.device, n=8, size=32)
    for amp, dtype in (('fp16', torch.float16), ('bf16', torch.bfloat16)):
        net = small_hspan('auto', ctx.device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler('cuda', enabled=amp == 'fp16')
        losses = []
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=dtype):
                loss = (net(lr_img).float() - hr).abs().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss))
        finite = all(torch.isfinite(torch.tensor(losses)).tolist())
        scale = scaler.get_scale() if scaler.is_enabled() else None
        holding = scale is None or scale >= 2.0**10
        ctx.row(f'--amp {amp}', 'pass' if finite and holding else 'FAIL',
                f'losses {" ".join(f"{v:.4f}" for v in losses)}' + (f', final scale {scale:g}' if scale else ''))


@check('GPU vs CPU kernels', 20)
def gpu_vs_cpu(ctx: Context) -> None:
    """The same weights on the GPU (auto, triton) and on the CPU's native kernels: output and gradients."""
    strict_float32()
    lr_img, hr = batch('cpu')
    cpu = small_hspan('blocked', 'cpu')
    cpu_step = step(cpu, lr_img, hr)
    with torch.no_grad():
        cpu_out = cpu.eval()(lr_img)
    for impl in ('auto', 'triton') if triton_available() else ('auto',):
        net = small_hspan(impl, ctx.device)
        net.load_state_dict(cpu.state_dict())
        with torch.no_grad():
            out = net.eval()(lr_img.to(ctx.device))
        ctx.bound(f'{impl} evaluation output vs CPU', rel(out, cpu_out), GPU_CPU)
        got = step(net, lr_img.to(ctx.device), hr.to(ctx.device))
        ctx.bound(f'{impl} training step gradients vs CPU', rel(got[1], cpu_step[1]), GPU_CPU)


class _Probe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.seen.append(torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype)
        return x


@check('autocast in DataParallel threads', 3)
def parallel_autocast(ctx: Context) -> None:
    """Replicas run by torch's parallel_apply threads (both on cuda:0) see the caller's bf16 autocast."""
    from nlsr import distributed

    x = torch.rand(2, 3, 4, 4, device=ctx.device)
    for name, cls in (('project DataParallel', distributed.DataParallel),
                      ('torch DataParallel', torch.nn.DataParallel)):
        probe = _Probe()
        runner = cls(probe, device_ids=[0, 0])
        with torch.autocast('cuda', dtype=torch.bfloat16):
            runner.parallel_apply([probe, probe], [(x,), (x,)], [{}, {}])
        ok = probe.seen == [torch.bfloat16] * 2
        if name.startswith('project'):
            ctx.row(name, 'pass' if ok else 'FAIL', f'dtypes seen {probe.seen}')
        else:
            ctx.row(name, 'info', f'dtypes seen {probe.seen} (torch alone loses the dtype in its threads)')


def _ddp_worker(rank: int, world: int, port: int, out: str, device: str) -> None:
    """One rank: its half of the batch through DDP (gloo, every rank on ``device``: cuda:0), gradients saved
    to ``out``."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        strict_float32()
        net = small_hspan('auto', device)
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0] if device == 'cuda' else None)
        lr_img, hr = batch(device)
        part = slice(rank * 2, rank * 2 + 2)
        loss = (ddp(lr_img[part]) - hr[part]).abs().mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten().double().cpu() for p in net.parameters() if p.grad is not None])
        torch.save(grads, f'{out}.{rank}')
    finally:
        torch.distributed.destroy_process_group()


@check('DDP 2 processes', 30)
def ddp_step(ctx: Context) -> None:
    """2-process DDP (gloo, both ranks on cuda:0) equals one process on the whole batch."""
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = str(ctx.scratch / 'ddp_grads')
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, out, ctx.device), nprocs=2, join=True)
    grads = [torch.load(f'{out}.{r}') for r in range(2)]
    strict_float32()
    whole = step(small_hspan('auto', ctx.device), *batch(ctx.device))[1]
    ctx.bound('ranks hold the same gradients', rel(grads[1], grads[0]), FP32)
    ctx.bound('DDP gradients vs one process on the whole batch', rel(grads[0], whole), FP32)
