"""The Bicubic model through the whole pipeline reproduces the published bicubic rows; the table command
works on a folder that has only HR images (LR made by the project)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import shared_path
from nlsr import main
from nlsr.tools import make_table

# ../shared/README.md: published bicubic PSNR / SSIM (Y, border = scale, MATLAB SSIM).
PUBLISHED = {
    ('Set5', 2): (33.66, 0.9299), ('Set5', 3): (30.39, 0.8682), ('Set5', 4): (28.42, 0.8104),
    ('Set14', 2): (30.24, 0.8688), ('Set14', 3): (27.55, 0.7742), ('Set14', 4): (26.00, 0.7027),
    ('B100', 2): (29.56, 0.8431), ('B100', 3): (27.21, 0.7385), ('B100', 4): (25.96, 0.6675),
}


def _bicubic_run(monkeypatch, tmp_path, dir_data, sets, name='Bicubic'):
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = ['--model', 'Bicubic', '--test_only', '--scale', '2+3+4', '--data_test', '+'.join(sets),
            '--dir_data', str(dir_data), '--dir_cache', str(tmp_path / 'cache'), '--n_threads', '0',
            '--rgb_range', '1', '--save', name]
    assert main.main(argv) == 0
    return tmp_path / 'experiment' / name


@pytest.mark.slow
def test_bicubic_rows_match_published_table(monkeypatch, tmp_path, capsys):
    bench = shared_path('data', 'benchmark')
    run = _bicubic_run(monkeypatch, tmp_path, bench.parent, ['Set5', 'Set14', 'B100'])
    results = {(e['dataset'], e['scale']): e for e in json.loads((run / 'results.json').read_text())}
    assert set(results) == set(PUBLISHED)
    for key, (psnr, ssim) in PUBLISHED.items():
        assert results[key]['psnr'] == pytest.approx(psnr, abs=0.03), key
        assert results[key]['ssim'] == pytest.approx(ssim, abs=0.003), key
    capsys.readouterr()
    assert make_table.main([str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == '| Method | Scale | Set5 | Set14 | B100 |'
    assert table[2].startswith('| Bicubic | x2 | 33.67 / 0.930')


def test_table_on_hr_only_folder(monkeypatch, tmp_path, capsys):
    """HR only: the LR images are made with the MATLAB resizer, so the scores equal those from the LR files."""
    src = shared_path('data', 'benchmark', 'Set5', 'HR')
    shutil.copytree(src, tmp_path / 'data' / 'MySet5')
    run = _bicubic_run(monkeypatch, tmp_path, tmp_path / 'data', ['MySet5'], name='hr_only')
    results = {e['scale']: e for e in json.loads((run / 'results.json').read_text())}
    for scale in (2, 3, 4):
        assert results[scale]['images'] == 5
        assert results[scale]['psnr'] == pytest.approx(PUBLISHED[('Set5', scale)][0], abs=0.03)
    capsys.readouterr()
    assert make_table.main([str(run)]) == 0
    assert (run / 'table.md').read_text().splitlines()[0] == '| Method | Scale | MySet5 |'
