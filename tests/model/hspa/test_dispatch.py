"""model.hspa.dispatch.plan: which HSPA path runs when, over the whole table, and how often the GPU is asked."""

from __future__ import annotations

import pytest
import torch

from nlsr.model.hspa import HSPA, PlanLog, native, plan
from nlsr.model.hspa import dispatch as plan_module
from nlsr.model.hspa import triton as fused
from nlsr.model.networks.hspan import HSPAN

CPU, GPU = torch.device('cpu'), torch.device('cuda', 0)
GIB = 2**30


@pytest.fixture
def free_memory(monkeypatch):
    """CUDA free memory as 18 GiB of 24 (none cached by torch's allocator), counting the queries."""
    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return 18 * GIB, 24 * GIB

    monkeypatch.setattr(torch.cuda, 'mem_get_info', mem_get_info)
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: 0)
    return calls


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(native, 'load', lambda: None)
    monkeypatch.setattr(native, 'unavailable_reason', lambda: "no C compiler found ('cc' is not on PATH; set CC)")


def test_cpu_auto_and_blocked_run_the_native_kernels():
    if native.load() is None:
        pytest.skip(f'native HSPA kernels unavailable here: {native.unavailable_reason()}')
    for impl in ('auto', 'blocked'):
        fused_plan = plan_module.Plan('blocked', 'native', impl, 'cpu', fused=True)
        assert plan(impl, CPU, 16, 2304, fusable=True) == fused_plan
        assert plan(impl, CPU, 16, 2304, fusable=False) == plan_module.Plan('blocked', 'native', impl, 'cpu')
    # 'fast', the earlier name, is read as 'blocked' and said so.
    assert plan('fast', CPU, 1, 100) == plan('blocked', CPU, 1, 100)
    assert 'HSPA: blocked on cpu -> blocked' in plan('fast', CPU, 1, 100).describe()
    assert 'native CPU kernel' in plan('auto', CPU, 1, 100, fusable=True).describe()


def test_cpu_without_a_compiler_uses_torch_and_says_why(no_compiler):
    for impl in ('auto', 'fast'):
        p = plan(impl, CPU, 1, 100, fusable=True)
        assert (p.path, p.backend, p.fused) == ('blocked', 'torch', True)
        assert 'no C compiler found' in p.note and 'no C compiler found' in p.describe()
    with pytest.raises(ValueError, match='native HSPA kernel needs CPU tensors and a C compiler'):
        x = torch.randn(1, 8, 4, 4)
        from nlsr.model.hspa import hspa_layer
        hspa_layer(x, HSPA(8, topk=4), 4, backend='native')  # never another back-end under its name


def test_dense_and_export_run_anywhere(free_memory):
    for device in (CPU, GPU):
        assert plan('dense', device, 64, 10**5).path == 'dense'
        for impl in ('auto', 'dense', 'fast', 'triton'):
            assert plan(impl, device, 1, 100, exporting=True).path == 'export'
    assert free_memory == []  # neither asks the GPU


def test_cuda_auto_is_dense_while_its_peak_fits_half_of_free_memory(free_memory, monkeypatch):
    assert plan('auto', GPU, 1, 16384).path == 'dense'      # 1 GiB of scores, 9 GiB at the peak: half of 18 GiB
    assert plan('auto', GPU, 16, 2304).path == 'dense'      # the published training batch: 340 MB
    assert plan('auto', GPU, 16, 2304, training=True).path == 'dense'
    for has_triton, large in ((True, ('triton', '')), (False, ('blocked', 'torch'))):
        monkeypatch.setattr(fused, 'available', lambda has=has_triton: has)
        for batch, length in ((1, 16500), (16, 8192)):
            p = plan('auto', GPU, batch, length)
            assert (p.path, p.backend) == large
            assert ('no triton package' in p.note) == (not has_triton)
    assert plan('blocked', GPU, 1, 100, fusable=True) == plan_module.Plan('blocked', 'torch', 'blocked', 'cuda',
                                                                          fused=True)
    assert plan('blocked', GPU, 1, 100) == plan_module.Plan('blocked', 'torch', 'blocked', 'cuda')
    assert len(free_memory) == 7  # read on every auto plan on CUDA, not for fast


def test_dense_fits_is_a_memory_rule():
    # The 16x48x48 training batch: 0.32 GiB of scores, about 3.2 GiB at the dense peak in training; a
    # 384x512 whole image (144 GiB of scores) only fits the fused kernels.
    dense_fits = plan_module.dense_fits
    assert dense_fits(16, 48 * 48, 80 * GIB, training=True)
    assert not dense_fits(16, 48 * 48, 4 * GIB, training=True)
    assert not dense_fits(1, 384 * 512, 141 * GIB)


def test_explicit_impls_that_cannot_run_say_so_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of auto, dense, blocked, triton; got 'sparse'"):
        plan('sparse', CPU, 1, 10)
    monkeypatch.setattr(fused, 'available', lambda: False)
    with pytest.raises(ValueError, match='needs the triton package') as err:
        plan('triton', GPU, 1, 10)
    assert '\n' not in str(err.value)
    monkeypatch.setattr(fused, 'available', lambda: True)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match='runs on CUDA devices'):
        plan('triton', CPU, 1, 10)
    assert plan('triton', GPU, 1, 10).path == 'triton'
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert plan('triton', CPU, 1, 10).path == 'triton'


def _recorded(layer: HSPA) -> list[str]:
    lines: list[str] = []
    layer.plan_log = PlanLog(lines.append)
    return lines


def test_module_plans_with_and_without_grad_and_under_autocast(no_compiler):
    layer = HSPA(16, topk=8)
    lines = _recorded(layer)
    x = torch.randn(2, 16, 6, 5)
    layer(x.requires_grad_(True)).sum().backward()
    with torch.no_grad():
        layer(x)
    assert lines == [plan('auto', CPU, 2, 30, fusable=True).describe()]  # grad or not: one plan, said once
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast: embeddings in bf16, not the fused layer
        out = layer(x)
    assert out.dtype == torch.float32
    assert len(lines) == 2 and '-> blocked' in lines[1]
    layer.double()(x.double())
    assert len(lines) == 2  # float64 plans like float32: the plan does not depend on dtype


def test_a_whole_hspan_asks_the_gpu_per_plan_and_says_its_plan_once(free_memory, monkeypatch):
    """Two forwards of a 3-group HSPAN, each layer planned as on CUDA (then run on the CPU: the plan is
    'dense', which runs anywhere): one memory query per layer and forward, one line in the log."""
    real = plan_module.plan

    def as_on_cuda(impl, device, batch, length, **kw):
        return real(impl, GPU, batch, length, **kw)

    monkeypatch.setattr(plan_module, 'plan', as_on_cuda)
    net = HSPAN(scale=2, n_feats=16, n_resgroups=3, n_resblocks=1, reduction=2, topk=8).eval()
    lines: list[str] = []
    shared = PlanLog(lines.append)
    for m in net.modules():
        if isinstance(m, HSPA):
            m.plan_log = shared
    with torch.no_grad():
        for size in (12, 12):
            net(torch.rand(1, 3, size, size))
    assert len(free_memory) == 2 * 3
    assert lines == ['HSPA: auto on cuda -> dense (published dense (L x L) scores)']


def test_model_wrapper_logs_each_distinct_plan_once(tmp_path):
    from nlsr import option
    from nlsr.model import Model

    args = option.parse(['--model', 'HSPAN', '--scale', '2', '--n_feats', '16', '--n_resgroups', '2',
                         '--n_resblocks', '1', '--reduction', '2', '--topk', '8', '--rgb_range', '1', '--cpu',
                         '--test_only', '--data_test', 'Set5', '--dir_data', str(tmp_path)])
    lines: list[str] = []
    wrapper = Model(args, log=lines.append)
    with torch.no_grad():
        wrapper.model(torch.rand(1, 3, 10, 10))
        wrapper.model(torch.rand(1, 3, 11, 9))
    assert sum(line.startswith('HSPA: ') for line in lines) == 1


def test_msnlan_cross_scale_attention_is_planned_here_with_the_same_names():
    """MSNLAN's attention takes --hspa_impl's names and asks dispatch: fast runs its blocked computation,
    auto the dense map up to CROSS_SCALE_DENSE_MAX scores per image (and without a block size), triton is
    refused in one line."""
    cpu = torch.device('cpu')
    big = plan_module.CROSS_SCALE_DENSE_MAX + 1
    assert plan_module.plan_cross_scale('fast', cpu, 10).path == 'blocked'
    assert plan_module.plan_cross_scale('dense', cpu, big).path == 'dense'
    assert plan_module.plan_cross_scale('auto', cpu, big - 1).path == 'dense'
    assert plan_module.plan_cross_scale('auto', cpu, big).path == 'blocked'
    assert plan_module.plan_cross_scale('auto', cpu, 10, block_size=7).path == 'blocked'
    with pytest.raises(ValueError, match='no Triton kernel'):
        plan_module.plan_cross_scale('triton', cpu, 10)
    assert set(plan_module.CROSS_SCALE_IMPLS) < set(plan_module.IMPLS)
