"""--channels_last: the published networks give their published outputs and the same gradients in
channels-last memory order, and the checkpoints they write do not depend on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_reference
from nlsr import model, option
from nlsr.model.checkpoint import plain_state_dict


def _flags(name: str, tmp_path: Path) -> tuple[list[str], dict]:
    ref = load_reference(name)
    a = ref['small_args']
    torch.save(ref['x2_state'], tmp_path / 'x2.pt')
    flags = ['--model', name.upper(), '--scale', '2', '--n_resgroups', str(a['n_resgroups']),
             '--n_resblocks', str(a['n_resblocks']), '--n_feats', str(a['n_feats']),
             '--rgb_range', str(a['rgb_range']), '--res_scale', str(a['res_scale']),
             '--pre_train', str(tmp_path / 'x2.pt')]
    if name == 'hspan':
        flags += ['--topk', str(a['topk']), '--reduction', str(a['reduction'])]
    return flags, ref


def _silent(line: str) -> None:
    pass


@pytest.mark.parametrize('name,tol', [('hspan', 1e-5), ('msnlan', 1e-3)])
def test_published_outputs_in_channels_last(tmp_path: Path, name: str, tol: float) -> None:
    flags, ref = _flags(name, tmp_path)
    m = model.Model(option.parse(['--cpu', '--test_only', '--channels_last', *flags]), log=_silent).eval()
    assert m.model.head[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = m(ref['input'], 0)
    assert (out - ref['x2_output']).abs().max().item() <= tol


@pytest.mark.parametrize('name', ['hspan', 'msnlan'])
def test_training_gradients_and_checkpoints_do_not_depend_on_memory_order(tmp_path: Path, name: str) -> None:
    # Both float32 runs against a float64 one: channels-last order only changes the float32 rounding, so its
    # error is of the size of the contiguous run's (sums of many products differ in their order).
    flags, ref = _flags(name, tmp_path)
    x = ref['input'][:, :, :12, :14]
    results = []
    for extra, dtype in (([], torch.float64), ([], torch.float32), (['--channels_last'], torch.float32)):
        m = model.Model(option.parse(['--cpu', *extra, *flags]), log=_silent).train().to(dtype)
        out = m(x.to(dtype), 0)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads = {k: p.grad.double() for k, p in m.model.named_parameters() if p.requires_grad}
        state = plain_state_dict(m.model)
        assert all(t.is_contiguous() for t in state.values())
        results.append((out.detach().double(), grads, state))
    (out_64, grads_64, _), (out_a, grads_a, state_a), (out_b, grads_b, state_b) = results
    scale = out_64.abs().max().item()
    err_a, err_b = ((o - out_64).abs().max().item() for o in (out_a, out_b))
    assert err_b <= 2 * err_a + 1e-6 * scale
    for k, g in grads_64.items():
        size = g.abs().max().item()
        err_a, err_b = ((d[k] - g).abs().max().item() for d in (grads_a, grads_b))
        assert err_b <= 4 * err_a + 2e-4 * size, k
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
