"""The command line: --help is the flag reference; user mistakes are one line and exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / 'src' / 'main.py'


def _run(*argv: str, cwd: Path = ROOT, env_root: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if env_root is not None:
        env['SR_EXPERIMENT_ROOT'] = str(env_root)
    return subprocess.run([sys.executable, str(MAIN), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_the_flags(tmp_path: Path) -> None:
    r = _run('--help', cwd=tmp_path)  # from any working directory
    assert r.returncode == 0, r.stderr
    for flag in ('--test_every', '--decay', '--resume', '--save_results', '--loss', '--chop', '--debug'):
        assert flag in r.stdout


@pytest.mark.parametrize('argv, expected', [
    (['--no_such_flag'], 'unrecognized arguments: --no_such_flag'),
    (['--epochs', 'many'], "--epochs: invalid int value: 'many'"),
    (['--scale', 'x2'], '--scale'),
    (['--resume', '-1'], '--load'),
])
def test_bad_flags_are_one_line(argv: list[str], expected: str, tmp_path: Path) -> None:
    r = _run(*argv, env_root=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith('error: ') and expected in lines[0]
    assert 'Traceback' not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


def test_missing_experiment_to_load(tmp_path: Path) -> None:
    r = _run('--load', 'nothing_here', '--resume', '-1', env_root=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: --load nothing_here: {tmp_path / 'nothing_here'} holds no checkpoint to continue from"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = _run('--debug', '--scale', 'x2', env_root=tmp_path)
    assert r.returncode == 1
    assert 'Traceback' in r.stderr and 'UserError' in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('error: --scale')


def test_main_returns_instead_of_exiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from nlsr import main

    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path))
    assert main.main(['--save', '../escape']) == 1
    assert capsys.readouterr().err.startswith('error: --save')


def test_experiment_root_ignores_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nlsr.runs import experiment

    monkeypatch.delenv('SR_EXPERIMENT_ROOT', raising=False)
    monkeypatch.chdir(tmp_path)
    assert experiment.experiment_root() == ROOT / 'experiment'
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'x'))
    assert experiment.experiment_root() == tmp_path / 'x'


def test_reset_deletes_in_python(tmp_path: Path) -> None:
    import argparse

    from nlsr.runs import experiment

    name = 'odd name; rm -rf $HOME'  # a shell would split this; shutil takes it as one folder name
    old = tmp_path / name
    (old / 'model').mkdir(parents=True)
    (old / 'model' / 'model_latest.pt').write_bytes(b'old')
    (old / 'training_state.pt').write_bytes(b'old')
    args = argparse.Namespace(save=name, load='', reset=True, resume=0, test_only=False)
    ckp = experiment.Experiment(args, root=tmp_path)
    ckp.done()
    assert sorted(p.name for p in old.iterdir()) == ['config.txt', 'log.txt']
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize('argv, expected', [
    (['--model', 'HSPAN', '--topk', '0'], '--topk 0'),
    (['--model', 'HSPAN', '--reduction', '0'], '--reduction 0'),
    (['--model', 'HSPAN', '--n_feats', '8'], '--reduction 16 with --n_feats 8'),  # zero-width embeddings
    (['--model', 'MSNLAN', '--n_resgroups', '3'], '--n_resgroups 3'),
    (['--model', 'MSNLAN', '--n_feats', '8'], '--n_feats 8'),
    (['--model', 'EDSR', '--topk', '8'], '--topk 8 is not used by --model EDSR'),  # without an attention
    (['--model', 'EDSR', '--scale', '5'], '--scale 5'),
    (['--chop', '--tile', '32'], '--chop and --tile'),
    (['--tile', '-1'], '--tile -1'),
    (['--res_scale', 'nan'], '--res_scale nan: expected a finite number'),
    (['--lr', 'inf'], '--lr inf: expected a finite number'),
    (['--min_lr', 'nan'], '--min_lr nan'),
    (['--model', 'MSNLAN', '--hspa_impl', 'triton'], '--hspa_impl triton: MSNLAN'),
    (['--template', 'RCAN_x4'], '--template RCAN_x4'),  # names match exactly
    (['--template', 'HSPAN_custom'], '--template HSPAN_custom'),
    (['--dilation'], 'unrecognized arguments: --dilation'),
    (['--act', 'relu'], 'unrecognized arguments: --act'),
    # values an evaluation never reads are refused alike
    (['--decay', 'x'], "--decay 'x': expected integers"),
    (['--loss', '1*L1+0.1*L3'], "unknown term 'L3'"),
    (['--data_range', '10-1'], "--data_range '10-1'"),
    (['--betas', '0.9', 'inf'], '--betas 0.9 inf: expected finite numbers'),
    (['--charbonnier_eps', '-1'], '--charbonnier_eps -1.0: expected a positive number'),
    (['--tile_overlap', '-2'], '--tile_overlap -2'),
    (['--scale', '3+3'], '--scale 3+3: expected each scale once'),
    (['--dir_demo', ''], "--dir_demo '': expected a folder path"),
    (['--G0', '0'], '--G0 0: expected an integer >= 1'),
    (['--RDNconfig', 'C'], "argument --RDNconfig: invalid choice: 'C'"),
    (['--seed', '-5'], '--seed -5: expected an integer >= 0'),
    (['--gamma', 'nan'], '--gamma nan: expected a finite number'),
    (['--model', 'SRCNN'], '--model SRCNN: unknown model'),
])
def test_values_a_run_cannot_use_are_one_line(argv: list[str], expected: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from nlsr import main

    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path))
    assert main.main(['--cpu', '--test_only', '--scale', '2', '--n_threads', '0', *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and expected in err[0], err


def test_template_sets_defaults_and_the_command_line_wins() -> None:
    from nlsr import option

    a = option.parse(['--template', 'MSNLAN', '--n_feats', '32', '--no_chop'])
    assert (a.model, a.n_resgroups, a.n_feats, a.chop, a.lr) == ('MSNLAN', 8, 32, False, 2e-4)
    assert option.parse(['--template', 'MSNLAN']).chop
    assert option.parse(['--template', 'HSPAN', '--rgb_range', '255']).rgb_range == 255
