"""--n_GPUs: the Model wrapper's DataParallel runs each replica under the caller's autocast dtype.

torch's parallel_apply needs an accelerator, so its worker threads are simulated here as torch writes them:
each thread re-enters autocast with ``enabled=`` only. The autocast dtype is per thread, and a new
thread starts from the default (bfloat16 on the CPU, float16 on CUDA), so the caller's float16 here (as
its bfloat16 on CUDA) would be lost.
"""

from __future__ import annotations

import sys
import threading

import torch

from nlsr import distributed, option
from nlsr.model import Model

DATA_PARALLEL = sys.modules['torch.nn.parallel.data_parallel']


class Probe(torch.nn.Module):
    """Records the autocast state and a convolution's output dtype inside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        self.seen.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu'), out.dtype))
        return out


def threaded_parallel_apply(modules, inputs, kwargs_tup=None, devices=None):
    """torch.nn.parallel.parallel_apply's worker threads, on the CPU (torch reads the accelerator's state)."""
    enabled = torch.is_autocast_enabled('cpu')
    results: dict[int, object] = {}

    def worker(i: int) -> None:
        with torch.amp.autocast('cpu', enabled=enabled):
            results[i] = modules[i](*inputs[i], **(kwargs_tup[i] if kwargs_tup else {}))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(modules))]


def test_replicas_run_under_the_callers_autocast_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, 'data_parallel_gpus', lambda args, device: 2)
    monkeypatch.setattr(DATA_PARALLEL, 'parallel_apply', threaded_parallel_apply)
    args = option.parse(['--model', 'EDSR', '--scale', '2', '--n_feats', '8', '--n_resblocks', '1', '--cpu',
                         '--dir_data', str(tmp_path)])
    runner = Model(args, log=lambda *_: None)._runners[0]
    assert isinstance(runner, torch.nn.DataParallel)
    probe = Probe()
    x = torch.rand(1, 3, 4, 4)
    with torch.autocast('cpu', dtype=torch.float16):
        outputs = runner.parallel_apply([probe, probe], [(x,), (x,)], None)
    assert probe.seen == [(True, torch.float16, torch.float16)] * 2
    assert all(o.dtype == torch.float16 for o in outputs)
    probe.seen.clear()
    runner.parallel_apply([probe], [(x,)], None)  # autocast off stays off
    assert probe.seen == [(False, torch.bfloat16, torch.float32)]
