"""Environment, the HSPA operator and the HSPA block on the GPU."""

from __future__ import annotations

import platform

import torch

from gpu_checks import FP32, LOW, Context, check, compare, low_precision, rel, strict_float32
from nlsr.model.hspa import HSPA, dense_attention, hspa_attention
from nlsr.model.hspa.triton import available as triton_available
from nlsr.model.hspa.triton import hspa_triton

LOW_DTYPES = (torch.float16, torch.bfloat16)


@check('environment', 2)
def environment(ctx: Context) -> None:
    """GPU name, compute capability, memory, torch / CUDA / triton versions."""
    props = torch.cuda.get_device_properties(0)
    ctx.row('GPU', 'info', f'{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB, '
            f'{torch.cuda.device_count()} visible')
    version = 'not installed'
    if triton_available():
        import triton

        version = triton.__version__
    ctx.row('software', 'info', f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {version}, '
            f'Python {platform.python_version()}')
    if torch.cuda.device_count() < 2:
        ctx.row('DataParallel across several GPUs', 'skipped', 'not checked: needs several GPUs')


def sparsemax64(scores: torch.Tensor) -> torch.Tensor:
    """Sort-based sparsemax over the last dim (the oracle when run in float64)."""
    z = scores - scores.amax(-1, keepdim=True)
    zs = z.sort(-1, descending=True).values
    csum = zs.cumsum(-1) - 1
    ks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    k_sup = (ks * zs > csum).sum(-1, keepdim=True)
    return torch.relu(z - csum.gather(-1, k_sup - 1) / k_sup.to(z.dtype))


def _impls() -> dict:
    impls = {'dense': lambda q, k, v: dense_attention(q, k, v, 128),
             'blocked': lambda q, k, v: hspa_attention(q, k, v, 128, backend='torch')}
    if triton_available():
        impls['triton'] = hspa_triton
    return impls


def _run(fn, leaves: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    xs = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*xs)
    grads = torch.autograd.grad((out.float() * weight).sum(), xs)
    return [out.detach(), *grads]


@check('operator', 45)
def operator(ctx: Context) -> None:
    """dense, blocked and triton against the float64 oracle (output, dq, dk, dv), then fp16/bf16 inputs."""
    strict_float32()
    impls = _impls()
    if 'triton' not in impls:
        ctx.row('triton', 'FAIL', 'triton is not installed')
    for length in (777, 2304) if ctx.quick else (777, 2304, 16384):
        n = 1 if length > 5000 else 2
        gen = torch.Generator(device=ctx.device).manual_seed(length)
        q, k, v = (torch.randn(n, length, c, device=ctx.device, generator=gen) for c in (48, 48, 96))
        q = q / 48 ** 0.5
        weight = torch.randn(n, length, 96, device=ctx.device, generator=gen)
        exact = _run(lambda a, b, c: sparsemax64(a @ b.transpose(1, 2)) @ c, [t.double() for t in (q, k, v)],
                     weight.double())
        results = {name: _run(fn, [q, k, v], weight) for name, fn in impls.items()}
        for name, got in results.items():
            other = results['blocked' if name == 'dense' else 'dense']
            for part, g, o, e in zip(('out', 'dq', 'dk', 'dv'), got, other, exact, strict=True):
                compare(ctx, f'L={length} {name} fp32 {part} vs float64', g, e, FP32, ref32=o, exact=e)
            del got
        del results
        # 16-bit inputs against float32 on the same rounded inputs: rounding q and k moves supports, and
        # the sparsemax gradient jumps where they move, so only the path's own arithmetic is compared.
        for dtype in LOW_DTYPES:
            rounded = [t.to(dtype) for t in (q, k, v)]
            for name, fn in impls.items():
                low, ref = _run(fn, rounded, weight), _run(fn, [t.float() for t in rounded], weight)
                for part, g, r in zip(('out', 'dq', 'dk', 'dv'), low, ref, strict=True):
                    low_precision(ctx, f'L={length} {name} {str(dtype)[6:]} {part} vs fp32', g, r, dtype)
        del exact
        torch.cuda.empty_cache()


@check('operator triton L=196608', 20)
def operator_large(ctx: Context) -> None:
    """The Triton forward at L = 196,608 (a 384x512 map), 64 sampled rows against float64."""
    if not triton_available():
        ctx.row('L=196608', 'skipped', 'triton is not installed')
        return
    strict_float32()
    length = 384 * 512
    gen = torch.Generator(device=ctx.device).manual_seed(7)
    q, k, v = (torch.randn(1, length, c, device=ctx.device, generator=gen) for c in (96, 96, 192))
    q = q / 96 ** 0.5
    with torch.no_grad():
        out = hspa_triton(q, k, v)
        rows = torch.randperm(length, generator=torch.Generator().manual_seed(0))[:64].to(ctx.device)
        scores = q[0, rows].double() @ k[0].double().t()
        exact = sparsemax64(scores) @ v[0].double()
        dense32 = sparsemax64(q[0, rows] @ k[0].t()) @ v[0]
    compare(ctx, 'L=196608 triton forward, 64 rows vs float64', out[0, rows], exact, FP32, ref32=dense32, exact=exact)


def _layer(ctx: Context, impl: str) -> HSPA:
    torch.manual_seed(0)
    return HSPA(channel=64, reduction=2, res_scale=0.5, topk=32, impl=impl).to(ctx.device)


def _layer_run(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    inp = x.detach().clone().requires_grad_(True)
    out = layer(inp)
    out.float().square().mean().backward()
    return [out.detach(), inp.grad, *(p.grad for p in layer.parameters())]


@check('block', 30)
def block(ctx: Context) -> None:
    """The HSPA block per impl: fp32 with gradients, autocast fp16/bf16, channels_last, half weights + a conv."""
    strict_float32()
    impls = ['dense', 'blocked', 'auto'] + (['triton'] if triton_available() else [])
    x = torch.randn(2, 64, 24, 20, device=ctx.device, generator=torch.Generator(ctx.device).manual_seed(3))
    exact = _layer_run(_layer(ctx, 'dense').double(), x.double())
    # The float32 reference side of a support-boundary flip: dense, and for dense itself blocked.
    refs = {name: _layer_run(_layer(ctx, name), x) for name in ('dense', 'blocked')}
    for impl in impls:
        layer = _layer(ctx, impl)
        got = _layer_run(layer, x)
        ref32 = refs['blocked' if impl == 'dense' else 'dense']
        worst = max(range(len(got)), key=lambda i: rel(got[i], exact[i]))
        compare(ctx, f'{impl} fp32 output, input and parameter gradients vs float64 (worst: #{worst})',
                got[worst], exact[worst], FP32, ref32=ref32[worst], exact=exact[worst])
        for dtype in LOW_DTYPES:
            with torch.autocast('cuda', dtype=dtype):
                low = _layer_run(layer, x)
            finite = all(bool(torch.isfinite(t).all()) for t in low)
            err = rel(low[0].float(), got[0])
            ctx.row(f'{impl} autocast {str(dtype)[6:]}', 'pass' if finite and err <= LOW else 'FAIL',
                    f'finite {finite}, output rel err {err:.1e} (limit {LOW:.0e})')
        last = _layer_run(layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last))
        ctx.bound(f'{impl} channels_last vs contiguous', max(rel(a, b) for a, b in zip(last, got, strict=True)), FP32)
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(ctx.device)
        with torch.no_grad():
            ref = conv(layer.to(memory_format=torch.contiguous_format)(x))
            half = conv.half()(layer.half()(x.half()))
        low_precision(ctx, f'{impl} half weights, then a conv', half, ref, torch.float16)
