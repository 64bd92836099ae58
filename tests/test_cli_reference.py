"""Through the CLI: `--test_only --data_test Demo --pre_train <published weights>` saves SR images equal to
the published code's outputs (tests/reference), up to one grey level on rounding boundaries."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import load_reference
from nlsr import main

MODEL_FLAGS = {
    'hspan': ('HSPAN', ('n_resgroups', 'n_resblocks', 'n_feats', 'topk', 'reduction', 'rgb_range', 'res_scale')),
    'msnlan': ('MSNLAN', ('n_resgroups', 'n_resblocks', 'n_feats', 'rgb_range', 'res_scale')),
}


def _to_png(t: torch.Tensor, rgb_range: float) -> np.ndarray:
    return (t[0].permute(1, 2, 0) * 255 / rgb_range).clamp(0, 255).round().to(torch.uint8).numpy()


def _run_demo(monkeypatch, tmp_path, name: str, scale: int, state: dict, lr: torch.Tensor, *extra: str) -> np.ndarray:
    ref_args = load_reference(name)['small_args']
    model_name, keys = MODEL_FLAGS[name]
    demo = tmp_path / 'demo'
    demo.mkdir(exist_ok=True)
    iio.imwrite(demo / 'crop.png', _to_png(lr, ref_args['rgb_range']))
    torch.save(state, tmp_path / 'weights.pt')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = ['--model', model_name, '--scale', str(scale), '--test_only', '--data_test', 'Demo',
            '--dir_demo', str(demo), '--pre_train', str(tmp_path / 'weights.pt'), '--save_results',
            '--n_threads', '0', '--save', 'ref', '--reset', *extra]
    for k in keys:
        argv += [f'--{k}', str(ref_args[k])]
    assert main.main(argv) == 0
    return iio.imread(tmp_path / 'experiment' / 'ref' / 'results-Demo' / f'crop_x{scale}_SR.png')


@pytest.mark.parametrize('scale', [2, 3, 4])
@pytest.mark.parametrize('name', ['hspan', 'msnlan'])
def test_demo_reproduces_published_outputs(monkeypatch, tmp_path, name: str, scale: int) -> None:
    ref = load_reference(name)
    sr = _run_demo(monkeypatch, tmp_path, name, scale, ref[f'x{scale}_state'], ref['input'])
    expected = _to_png(ref[f'x{scale}_output'], ref['small_args']['rgb_range'])
    assert sr.shape == expected.shape
    diff = np.abs(sr.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_demo_with_chop_reproduces_published_forward_chop(monkeypatch, tmp_path) -> None:
    ref = load_reference('hspan')
    sr = _run_demo(monkeypatch, tmp_path, 'hspan', 2, ref['x2_state'], ref['chop_input'], '--chop')
    expected = _to_png(ref['x2_chop_output'], 1)
    diff = np.abs(sr.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
