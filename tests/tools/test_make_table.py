"""The paper-layout table command: merging runs, bold best, errors."""

from __future__ import annotations

import json

from nlsr.tools import make_table


def _run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    entries = [{'dataset': ds, 'scale': s, 'psnr': p, 'ssim': q, 'images': 5, 'seconds': 1.0}
               for ds, s, p, q in rows]
    (d / 'results.json').write_text(json.dumps(entries))
    return d


def test_merged_table_layout_and_best(tmp_path, capsys):
    a = _run(tmp_path, 'Bicubic', [('Set14', 2, 30.23, 0.8691), ('Set5', 2, 33.673, 0.9303),
                                   ('Set5', 4, 28.429, 0.8111)])
    b = _run(tmp_path, 'HSPAN', [('Set5', 2, 38.5, 0.9628), ('Set14', 2, 34.6, 0.9270)])
    out = tmp_path / 't.md'
    assert make_table.main([str(a), str(b), '--out', str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == '| Method | Scale | Set5 | Set14 |'
    assert lines[2] == '| Bicubic | x2 | 33.67 / 0.9303 | 30.23 / 0.8691 |'
    assert lines[3] == '| HSPAN | x2 | **38.50 / 0.9628** | **34.60 / 0.9270** |'
    # HSPAN has no x4 row; Bicubic's x4 row leaves Set14 empty.
    assert lines[4] == '| Bicubic | x4 | **28.43 / 0.8111** | – |'
    assert len(lines) == 5
    assert capsys.readouterr().out.splitlines() == lines


def test_single_run_written_beside_results(tmp_path):
    a = _run(tmp_path, 'EDSR', [('Set5', 2, 37.0, 0.95)])
    assert make_table.main([str(a), '--names', 'EDSR-baseline']) == 0
    assert (a / 'table.md').read_text().splitlines()[2] == '| EDSR-baseline | x2 | 37.00 / 0.9500 |'


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert make_table.main([str(tmp_path / 'nope')]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'results.json' in err
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'results.json').write_text('[{"dataset": "Set5"}]')
    assert make_table.main([str(bad)]) == 1
    assert 'lacks scale, psnr, ssim' in capsys.readouterr().err


def test_runs_with_the_same_name_are_mean_and_std(tmp_path):
    seeds = [_run(tmp_path, f'hspa_s{i}', [('Set5', 2, p, q)]) for i, (p, q) in
             enumerate([(35.70, 0.9490), (35.80, 0.9492), (35.60, 0.9494)])]
    none = [_run(tmp_path, f'none_s{i}', [('Set5', 2, p, 0.9480)]) for i, p in enumerate([35.55, 35.65])]
    out = tmp_path / 't.md'
    runs = [str(r) for r in seeds + none]
    assert make_table.main([*runs, '--names', 'HSPA', 'HSPA', 'HSPA', 'none', 'none', '--out', str(out)]) == 0
    lines = out.read_text().splitlines()
    # mean and sample standard deviation (n - 1): PSNR 35.70 ± 0.10, SSIM 0.9492 ± 0.0002
    assert lines[2] == '| HSPA | x2 | **35.70 ± 0.10 / 0.9492 ± 0.0002 (n=3)** |'
    assert lines[3] == '| none | x2 | 35.60 ± 0.07 / 0.9480 ± 0.0000 (n=2) |'
    assert len(lines) == 4
