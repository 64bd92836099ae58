"""The CUDA branches of the HSPA operator, run on a machine without a GPU.

- Device placement: every tensor a path allocates is on its input's device. The layer, dense and blocked
  paths run on the ``meta`` device (autograd works there, unlike on fake CUDA tensors on a CPU-only build;
  a tensor allocated without a device lands on the CPU and the next operation refuses the mix). The Triton
  launcher runs on fake ``cuda:1`` tensors (FakeTensorMode) with recording stand-ins for the kernels and for
  ``torch.cuda.device``. Reads of a tensor's value (data-dependent branches) answer 1, so no path needs real
  data.
- 16-bit weights keep their dtype through every impl (bfloat16 on the CPU).
- The ``auto`` rule on CUDA: the dense peak (transient and retained factors), free memory read on every
  plan, and a query/key width the fused kernels do not take falling back instead of raising.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from nlsr.model.hspa import HSPA, hspa_layer, plan
from nlsr.model.hspa import dispatch as plan_module
from nlsr.model.hspa import triton as fused
from nlsr.model.hspa.triton import launch

GPU = torch.device('cuda', 0)
GIB = 2**30


class Placement(TorchDispatchMode):
    """Answers every read of a tensor's value with 1 and records the device of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[torch.device] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device)
        return out


@pytest.mark.parametrize('path', ['layer', 'dense', 'blocked'])
def test_every_path_allocates_on_its_input_device(path, monkeypatch):
    # autocast has no 'meta' state: the paths that switch it off run without it here.
    monkeypatch.setattr(torch, 'autocast', lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr('nlsr.model.hspa.module.fusable', lambda layer, x: False)  # the module runs dense or blocked
    layer = HSPA(8, topk=4, impl='dense' if path == 'dense' else 'fast').to('meta')
    x = torch.zeros(2, 8, 3, 4, device='meta', requires_grad=True)
    placement = Placement()
    with placement:
        # The whole layer on the torch back-end is what impl 'fast' runs on CUDA.
        out = hspa_layer(x, layer, 4, backend='torch') if path == 'layer' else layer(x)
        out.sum().backward()
    assert placement.devices == {torch.device('meta')}
    assert all(p.grad.device.type == 'meta' for p in layer.parameters()) and x.grad.device.type == 'meta'


class _Kernel:
    """A stand-in for one Triton kernel: records the current CUDA device and the tensors' devices of a launch."""

    def __init__(self, name: str, launches: list, current: list) -> None:
        self.name, self.launches, self.current = name, launches, current
        self.arg_names = ['BLOCK_M', 'BLOCK_N', 'BLOCK_D', 'BLOCK_C', 'BLOCK_Q']

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            self.launches.append((self.name, self.current[-1] if self.current else None, devices))
        return launch_


def test_triton_launches_on_the_device_of_its_tensors(monkeypatch):
    launches: list = []
    current: list = []

    @contextlib.contextmanager
    def cuda_device(device):
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    kernels = types.SimpleNamespace(**{name: _Kernel(name, launches, current) for name in
                                       ('threshold', 'forward', 'backward_rows', 'backward_keys', 'backward_values')})
    monkeypatch.setattr(launch, '_kernels', lambda: kernels)
    monkeypatch.setattr(torch.cuda, 'device', cuda_device)
    tiles = launch.Tiles(16, 16, 16, 16, 16)
    with FakeTensorMode(), Placement() as placement:
        q, k = (torch.zeros(2, 20, 8, device='cuda:1', dtype=torch.bfloat16) for _ in 'qk')
        v = torch.zeros(2, 20, 12, device='cuda:1', dtype=torch.bfloat16)
        out, tau = launch.triton_forward(q, k, v, tiles)
        grads = launch.triton_backward(torch.zeros_like(out), q, k, v, tau, tiles)
    assert [name for name, *_ in launches] == ['threshold', 'forward', 'backward_rows', 'backward_keys',
                                               'backward_values']
    for name, device, tensors in launches:
        assert device == torch.device('cuda', 1), f'{name} launched with {device} current'
        assert tensors == {torch.device('cuda', 1)}, f'{name} got tensors on {tensors}'
    assert placement.devices == {torch.device('cuda', 1)}
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads[:3])


@pytest.mark.parametrize('impl', ['dense', 'fast', 'auto'])
def test_16_bit_weights_keep_their_dtype_through_every_impl(impl):
    torch.manual_seed(0)
    layer = HSPA(16, topk=4, impl=impl).to(torch.bfloat16)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(2, 16, 5, 6, dtype=torch.bfloat16, requires_grad=True)
    out = conv(layer(x))  # the next convolution refuses float32 input with bfloat16 weights
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_dense_fits_counts_the_transient_and_retained_scores():
    dense_fits = plan_module.dense_fits
    # An RTX 4090 training on batch 16 of 64x64 LR patches: 1 GiB of scores per layer, about 9 GiB at the
    # soft threshold's peak. At 4.5 GiB free a rule on the scores alone (a quarter of free memory) would
    # still say dense; a layer that sees 18 GiB free (free memory is read on every plan: earlier layers'
    # retained scores and activations are gone from it) takes the fused kernels; one that sees 22 GiB may
    # run dense.
    assert not dense_fits(16, 64 * 64, 4 * GIB + GIB // 2)
    assert not dense_fits(16, 64 * 64, 18 * GIB, training=True)
    assert dense_fits(16, 64 * 64, 22 * GIB, training=True)
    scores = 16 * 2304**2 * 4  # the published training batch, 16 x 48x48
    share = plan_module.DENSE_SHARE
    inference = plan_module.DENSE_TRANSIENT
    training = plan_module.DENSE_TRANSIENT + plan_module.DENSE_RETAINED
    assert inference >= 9 and training >= 10  # soft thresholding's full-sort peak; the output kept for backward
    assert dense_fits(16, 2304, scores * inference / share) and not dense_fits(16, 2304, scores * inference / share - 1)
    assert not dense_fits(16, 2304, scores * inference / share, training=True)
    assert dense_fits(16, 2304, scores * training / share, training=True)


@pytest.fixture
def gpu_memory(monkeypatch):
    """A CUDA device whose free memory the test sets (``free[0]``), with 1 GiB cached by torch's allocator."""
    free = [20 * GIB]
    calls: list = []

    def mem_get_info(device=None):
        calls.append(device)
        return free[0], 24 * GIB

    monkeypatch.setattr(torch.cuda, 'mem_get_info', mem_get_info)
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: 2 * GIB)
    monkeypatch.setattr(fused, 'available', lambda: True)
    monkeypatch.setattr(launch, '_capability', lambda device: (8, 9))
    return free, calls


def test_free_memory_is_read_on_every_plan(gpu_memory):
    free, calls = gpu_memory
    batch, length = 4, 4096  # 256 MiB of scores: 2.25 GiB at the dense peak
    assert plan('auto', GPU, batch, length).path == 'dense'
    free[0] = 3 * GIB  # the optimizer's state, another job: 4 GiB usable with the allocator's cache
    assert plan('auto', GPU, batch, length).path == 'triton'
    free[0] = 3 * GIB + GIB // 2 - 1  # the dense peak needs 2 x 2.25 GiB usable: one byte short
    assert plan('auto', GPU, batch, length).path == 'triton'
    free[0] = 3 * GIB + GIB // 2
    assert plan('auto', GPU, batch, length).path == 'dense'  # the allocator's unused 1 GiB counts
    assert len(calls) == 4


def test_auto_falls_back_for_a_query_width_the_fused_kernels_do_not_take(gpu_memory, monkeypatch):
    free, _ = gpu_memory
    free[0] = GIB
    # The module on fake CUDA tensors: auto runs the blocked path (a stand-in here), it does not raise.
    ran: list[str] = []
    monkeypatch.setattr('nlsr.model.hspa.module.fusable', lambda layer, x: False)  # the blocked path, not the layer
    monkeypatch.setattr('nlsr.model.hspa.module.blocked_op',
                        lambda q, k, v, *a, **kw: ran.append('blocked') or torch.zeros_like(v))
    layer = HSPA(1024, reduction=2, topk=8).requires_grad_(False)
    mode = FakeTensorMode()
    for module in layer.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            fake = mode.from_tensor(param)
            with mode:
                setattr(module, name, torch.nn.Parameter(fake.to('cuda:0'), requires_grad=False))
    with mode, torch.no_grad():
        out = layer(torch.zeros(1, 1024, 128, 128, device='cuda:0'))
    assert ran == ['blocked'] and out.shape == (1, 1024, 128, 128)
    p = plan('auto', GPU, 1, 128 * 128, widths=(512, 1024))
    assert (p.path, p.backend) == ('blocked', 'torch') and 'query/key width up to 256, got 512' in p.note
    assert plan('auto', GPU, 1, 128 * 128, widths=(96, 192)).path == 'triton'
    with pytest.raises(ValueError, match='query/key width up to 256, got 512'):
        plan('triton', GPU, 1, 100, widths=(512, 1024))
