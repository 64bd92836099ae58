"""What every benchmark script shares: a subprocess per case, peak RSS, the machine line, same-run baselines.

- ``run_case(script, spec)`` runs ``python script --worker JSON`` in a fresh process and returns the dict the
  worker printed as its last stdout line (or ``{'error': <last stderr line>}``), so that one case's memory,
  caches and threads never leak into the next.
- ``PeakMemory`` (in the worker): the extra peak RSS of a block, VmHWM after it minus VmRSS before it, with
  the high-water mark reset first (``/proc/self/clear_refs`` "5"); torch's own allocations are included,
  which tracemalloc would miss.
- ``machine_line(*details)``: one line naming the CPU model, its vector extensions, its cores, the torch
  version and the load average; every table a script prints comes with it.
- Same-run baselines: a ratio is always against a baseline measured in the same run, and ``alternate``
  runs the set-ups round by round so that load changes on a shared machine hit all of them alike.
  ``published_attention`` is the published HSPA algorithm, the baseline of the HSPA benchmarks.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Vector extensions named in the machine line, as /proc/cpuinfo spells them (x86 flags, aarch64 features).
VECTOR_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'avx_vnni', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni',
                'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_int8', 'amx_bf16', 'asimd', 'sve', 'sve2')


# ----------------------------------------------------------------------------------------------------
# One subprocess per case
# ----------------------------------------------------------------------------------------------------

def run_case(script: str | Path, spec: dict, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``python script *args --worker JSON(spec)`` in a fresh process (``env``: variables added to this
    process's environment); the worker's last stdout line parsed as JSON, or {'error': its last stderr line}."""
    cmd = [sys.executable, str(Path(script).resolve()), *args, '--worker', json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, **env} if env else None)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Peak memory (worker side)
# ----------------------------------------------------------------------------------------------------

def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB ('VmRSS': resident now, 'VmHWM': its high-water mark)."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} missing from /proc/self/status')


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _max_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PeakMemory:
    """Peak RSS of a ``with`` block: ``extra_mib`` = VmHWM after it - VmRSS before it, ``peak_mib`` = VmHWM
    (the whole process), ``method`` 'VmHWM' (reset before the block) or 'ru_maxrss' (the process's peak
    since it started, where the reset is not allowed)."""

    def __enter__(self) -> PeakMemory:
        self.before_kib = rss_kib('VmRSS')
        self.exact = reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        peak = rss_kib('VmHWM') if self.exact else _max_rss_kib()
        self.method = 'VmHWM' if self.exact else 'ru_maxrss'
        self.peak_mib = peak / 1024
        self.extra_mib = (peak - self.before_kib) / 1024


def fmt_mib(mib: float | None) -> str:
    """'339 MiB', '4.06 GiB', or '—' for a figure that was not measured."""
    return '—' if mib is None else (f'{mib / 1024:.2f} GiB' if mib >= 1024 else f'{mib:.0f} MiB')


# ----------------------------------------------------------------------------------------------------
# The machine line
# ----------------------------------------------------------------------------------------------------

def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model, its vector extensions out of VECTOR_FLAGS) from the text of /proc/cpuinfo."""
    model, flags = '', set()
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('model name', 'Model') and not model:
            model = value.strip()
        elif key.strip() in ('flags', 'Features') and not flags:
            flags = set(value.split())
    return model, [f for f in VECTOR_FLAGS if f in flags]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '0.52 0.61 0.70' ('n/a' where the OS has none)."""
    try:
        return ' '.join(f'{v:.2f}' for v in os.getloadavg())
    except (AttributeError, OSError):
        return 'n/a'


def machine_line(*details: str) -> str:
    """'<CPU model> (<vector extensions>), <n> cores, torch <version>, <details...>, load average a b c'."""
    import torch

    try:
        model, vector = parse_cpuinfo(Path('/proc/cpuinfo').read_text())
    except OSError:
        model, vector = '', []
    model = model or platform.processor() or platform.machine() or 'unknown CPU'
    parts = [f'{model} ({" ".join(vector) or "vector extensions unknown"})', f'{os.cpu_count()} cores',
             f'Python {platform.python_version()}', f'torch {torch.__version__}', *details,
             f'load average {load_average()}']
    return ', '.join(parts)


# ----------------------------------------------------------------------------------------------------
# Same-run baselines
# ----------------------------------------------------------------------------------------------------

def time_call(fn: Callable[[], Any]) -> list[float]:
    """[seconds] of one call of fn."""
    start = time.perf_counter()
    fn()
    return [time.perf_counter() - start]


def alternate(setups: dict[str, Callable[[], list[float]]], repeats: int) -> dict[str, list[float]]:
    """Run every set-up once per round, for ``repeats`` rounds, in the same order; each call returns the
    seconds it measured (``time_call`` for a whole call). A set-up's samples are those of all its calls."""
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, setup in setups.items():
            samples[name] += setup()
    return samples


@functools.cache
def _published_soft_threshold() -> type:
    import torch

    def threshold(s: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        # tau and support size along the last dim of max-shifted rows, the published way: top-k
        # candidates, cumulative sums, and rows whose support reaches k redone with 2k.
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
                tau[redo], support[redo] = threshold(s[redo], 2 * topk)
        return tau, support

    class PublishedSoftThreshold(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, scores: torch.Tensor, topk: int) -> torch.Tensor:
            shifted = scores - scores.max(dim=-1, keepdim=True).values
            tau, support = threshold(shifted, topk)
            out = torch.clamp(shifted - tau, min=0)
            ctx.save_for_backward(support, out)
            return out

        @staticmethod
        def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
            support, out = ctx.saved_tensors
            grad = grad_out.clone()
            grad[out == 0] = 0
            mean = (grad.sum(-1) / support.to(out.dtype).squeeze(-1)).unsqueeze(-1)
            return torch.where(out != 0, grad - mean, grad), None

    return PublishedSoftThreshold


def published_attention(query: Any, key: Any, value: Any, topk: int) -> Any:
    """The published HSPA algorithm, reimplemented as the baseline: the full (N, L, L) scores query @ key^T,
    the top-k threshold with the 2k retry, dense weights @ value, and its saved-output backward."""
    import torch

    weights = _published_soft_threshold().apply(torch.bmm(query, key.transpose(1, 2)), topk)
    return torch.bmm(weights, value)


# ----------------------------------------------------------------------------------------------------
# Shared inputs
# ----------------------------------------------------------------------------------------------------

def t91_batches(n_images: int, steps: int, batch: int, seed: int) -> list[tuple[Any, Any]]:
    """``steps`` batches of (LR 24x24, HR 48x48) x2 crops from the first ``n_images`` images of the
    repository's datasets/T91, the LR made by the project's MATLAB-compatible imresize."""
    import imageio.v3 as iio
    import numpy as np
    import torch

    if str(ROOT / 'src') not in sys.path:
        sys.path.insert(0, str(ROOT / 'src'))
    from nlsr.imageops.imresize import imresize

    rng = np.random.default_rng(seed)
    pairs = []
    for path in sorted((ROOT / 'datasets' / 'T91').glob('*.png'))[:n_images]:
        hr = iio.imread(path)[..., :3]
        hr = hr[:hr.shape[0] // 2 * 2, :hr.shape[1] // 2 * 2]
        pairs.append((imresize(hr, 0.5), hr))

    def as_tensor(crops: list) -> torch.Tensor:
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255

    out = []
    for _ in range(steps):
        lrs, hrs = [], []
        for _ in range(batch):
            lr, hr = pairs[rng.integers(len(pairs))]
            y, x = rng.integers(lr.shape[0] - 23), rng.integers(lr.shape[1] - 23)
            lrs.append(lr[y:y + 24, x:x + 24])
            hrs.append(hr[2 * y:2 * y + 48, 2 * x:2 * x + 48])
        out.append((as_tensor(lrs), as_tensor(hrs)))
    return out
