"""make_figures ablation: runs sharing a name (seeds) are averaged, with standard-deviation error bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nlsr.errors import UserError
from nlsr.tools import make_figures


def _run(root: Path, name: str, psnr: list[float], test_every: int = 300) -> Path:
    run = root / name
    run.mkdir()
    (run / 'config.txt').write_text(f"data_test: ['Set5']\nscale: [2]\ntest_every: {test_every}\n")
    torch.save(torch.tensor(psnr, dtype=torch.float64).view(-1, 1, 1), run / 'psnr_log.pt')
    return run


def test_mean_curve_over_common_iterations() -> None:
    curves = [(np.array([300, 600, 900]), np.array([34.0, 35.0, 36.0])),
              (np.array([300, 600, 900]), np.array([34.2, 35.4, 36.6])),
              (np.array([300, 600]), np.array([34.4, 35.8]))]  # a run stopped early
    iters, mean, std = make_figures.mean_curve('HSPA', curves)
    assert iters.tolist() == [300, 600]
    np.testing.assert_allclose(mean, [34.2, 35.4])
    np.testing.assert_allclose(std, [0.2, 0.4])  # sample standard deviation (n - 1)
    with pytest.raises(UserError, match='HSPA'):
        make_figures.mean_curve('HSPA', [(np.array([300]), np.array([1.0])), (np.array([600]), np.array([1.0]))])


def test_ablation_figure_with_seeds(tmp_path: Path) -> None:
    runs = [_run(tmp_path, f'hspa_s{i}', [34.0 + i, 35.0 + i]) for i in range(3)]
    runs.append(_run(tmp_path, 'none', [33.0, 34.0]))
    out = tmp_path / 'fig.png'
    argv = ['ablation', *map(str, runs), '--names', 'HSPA', 'HSPA', 'HSPA', 'none', '--out', str(out)]
    assert make_figures.main(argv) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
