"""The paper-table command: a folder of checkpoints (one sub-folder per network) scored by main.py on two
sets, then one table; scales read from the authors' file names; bad folders refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_blocky_folders
from nlsr import option
from nlsr.errors import UserError
from nlsr.model import checkpoint, make_network
from nlsr.tools import paper_table

# Tiny configurations of three networks; the folder name picks the --template, the file its configuration.
TINY = {
    'EDSR': ['--n_resblocks', '1', '--n_feats', '8'],
    'HSPAN': ['--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '8', '--reduction', '2', '--topk', '8'],
    'MSNLAN': ['--n_resgroups', '2', '--n_resblocks', '1', '--n_feats', '16'],
}


def _checkpoint(path: Path, name: str, scale: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    args = option.parse(['--model', name, '--scale', str(scale), '--test_only', '--cpu', *TINY[name]])
    net = make_network(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_checkpoint(path, net.state_dict(), {'model': name, **net.config})


@pytest.mark.parametrize('name,scale', [('RCAN_BIX4.pt', 4), ('SAN_BI4X.pt', 4), ('HSPAN_x2.pt', 2),
                                        ('model_x3.pt', 3), ('NLSN_X2_best.pth', 2), ('MDSR.pt', None),
                                        ('model_best.safetensors', None), ('ddbpn_8x.pt', 8)])
def test_scale_read_from_authors_file_names(name: str, scale: int | None) -> None:
    assert paper_table.scale_of(Path(name)) == scale


def test_only_a_multi_scale_network_takes_a_file_without_scale() -> None:
    assert paper_table.serves_every_scale('MDSR') and paper_table.serves_every_scale('mdsr')
    assert not paper_table.serves_every_scale('RCAN') and not paper_table.serves_every_scale('HSPAN')


def test_several_scales_in_a_name_refused() -> None:
    with pytest.raises(UserError, match='states several scales'):
        paper_table.scale_of(Path('RCAN_x2_to_x4.pt'))


def test_table_of_three_networks_on_two_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / 'data'
    write_blocky_folders(data, (('SetA', 2, (24, 24)), ('SetB', 2, (24, 36))))
    ckpt = tmp_path / 'checkpoints'
    _checkpoint(ckpt / 'EDSR' / 'EDSR_x2.pt', 'EDSR', 2, 0)
    _checkpoint(ckpt / 'EDSR' / 'EDSR_x3.pt', 'EDSR', 3, 1)
    _checkpoint(ckpt / 'hspan' / 'HSPAN_x2.pt', 'HSPAN', 2, 2)
    _checkpoint(ckpt / 'MSNLAN' / 'model_x2.pt', 'MSNLAN', 2, 3)
    _checkpoint(ckpt / 'MSNLAN' / 'model_x4.pt', 'MSNLAN', 4, 4)  # not asked for: --scale 2+3
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = [str(ckpt), '--dir_data', str(data), '--data_test', 'SetA+SetB', '--scale', '2+3', '--save', 'table',
            '--', '--cpu', '--n_threads', '0']
    assert paper_table.main(argv) == 0
    lines = (tmp_path / 'experiment' / 'table.md').read_text().splitlines()
    assert lines[0] == '| Method | Scale | SetA | SetB |'
    rows = [ln.split(' | ')[:2] for ln in lines[2:]]
    assert rows == [['| EDSR', 'x2'], ['| hspan', 'x2'], ['| MSNLAN', 'x2'], ['| EDSR', 'x3']]
    # every run scored both sets with the network's own template and checkpoint, and one cell per column is best
    for run, scale in (('EDSR_x2', 2), ('hspan_x2', 2), ('MSNLAN_x2', 2), ('EDSR_x3', 3)):
        results = json.loads((tmp_path / 'experiment' / f'table_{run}' / 'results.json').read_text())
        assert sorted((r['dataset'], r['scale']) for r in results) == [('SetA', scale), ('SetB', scale)]
        assert all(r['psnr'] > 0 for r in results)
    x2 = lines[2:5]
    for col in (2, 3):
        assert sum('**' in row.split(' | ')[col] for row in x2) == 1
    assert capsys.readouterr().out.splitlines()[-len(lines):] == lines  # printed last, after the runs' logs


@pytest.mark.parametrize('layout,expected', [
    ({}, 'no network folder'),
    ({'NotANet': ['x.pt']}, 'NotANet: the folder name is not a --model name'),
    ({'RCAN': []}, 'RCAN: no checkpoint'),
    ({'RCAN': ['RCAN_best.pt']}, 'RCAN_best.pt: no scale in the file name'),
])
def test_bad_folders_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, layout: dict,
                                         expected: str) -> None:
    for sub, files in layout.items():
        (tmp_path / 'c' / sub).mkdir(parents=True)
        for f in files:
            (tmp_path / 'c' / sub / f).write_bytes(b'')
    (tmp_path / 'c').mkdir(exist_ok=True)
    assert paper_table.main([str(tmp_path / 'c')]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_a_failing_network_is_named_and_the_others_still_tabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / 'data'
    write_blocky_folders(data, (('SetA', 1, (24, 24)),))
    ckpt = tmp_path / 'checkpoints'
    _checkpoint(ckpt / 'EDSR' / 'EDSR_x2.pt', 'EDSR', 2, 0)
    (ckpt / 'HSPAN').mkdir()
    (ckpt / 'HSPAN' / 'HSPAN_x2.pt').write_bytes(b'not a checkpoint')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'experiment'))
    argv = [str(ckpt), '--dir_data', str(data), '--data_test', 'SetA', '--scale', '2', '--', '--cpu',
            '--n_threads', '0']
    assert paper_table.main(argv) == 1
    err = capsys.readouterr().err
    assert 'HSPAN_x2.pt: cannot read it' in err and err.strip().splitlines()[-1].startswith('error: 1 of 2')
    assert (tmp_path / 'experiment' / 'paper_table.md').read_text().splitlines()[2].startswith('| EDSR | x2 |')
