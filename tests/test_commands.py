"""Every command of the package (pyproject.toml's console scripts) ends a user's mistake the same way, through the
one bootstrap (nlsr.cli.run_command): a usage error or a bad file is one line `error: ...` and exit status 1,
`--debug` adds the traceback, and nothing else is printed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from nlsr import cli
from nlsr.errors import UserError
from nlsr.runs import experiment
from test_readme_commands import console_scripts


def _entry(command: str):
    module, function = console_scripts()[command].split(':')
    return getattr(importlib.import_module(module), function)


# For each command: a usage error (argparse) and a bad input file, with a word each error line must name.
MISTAKES = {
    'nlsr': (['--epochs', 'many'], "--epochs: invalid int value: 'many'"),
    'nlsr-upscale': (['--pre_train', 'm.pt', '--out', 'o', '--tile', 'big', 'x.png'], "--tile: invalid int value"),
    'nlsr-export': (['--pre_train', 'm.pt', 'out.onnx', '--opset', 'new'], '--opset: invalid int value'),
    'nlsr-table': (['run', '--names'], '--names: expected at least one argument'),
    'nlsr-paper-table': ([], 'the following arguments are required: checkpoints'),
    'nlsr-figures': (['sketch'], "invalid choice: 'sketch'"),
}
BAD_FILES = {
    'nlsr-upscale': lambda d: ['--pre_train', str(d / 'missing.pt'), '--out', str(d / 'o'), str(d)],
    'nlsr-table': lambda d: [str(d / 'no_run')],
    'nlsr-paper-table': lambda d: [str(d / 'no_folder')],
    'nlsr-figures': lambda d: ['ablation', str(d / 'no_run')],
}


def test_every_command_is_covered() -> None:
    assert set(MISTAKES) == set(console_scripts())


@pytest.mark.parametrize('command', sorted(MISTAKES))
def test_a_usage_error_is_one_line(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = MISTAKES[command]
    assert _entry(command)(argv) == 1
    out, err = capsys.readouterr()
    assert out == '' and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: ') and expected in err and err.rstrip().endswith('(see --help)'), err


@pytest.mark.parametrize('command', sorted(BAD_FILES))
def test_a_bad_file_is_one_line_and_debug_adds_the_traceback(command: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = BAD_FILES[command](tmp_path)
    assert _entry(command)(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: ') and str(tmp_path) in err, err
    assert _entry(command)(['--debug', *argv]) == 1
    debug = capsys.readouterr().err
    assert 'Traceback' in debug and debug.strip().splitlines()[-1] == err.strip(), debug


def test_the_bootstrap_passes_the_exit_status_and_reports_an_interrupt(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run_command(lambda argv: None, []) == 0
    assert cli.run_command(lambda argv: 3, []) == 3

    def interrupted(argv: list[str]) -> None:
        raise KeyboardInterrupt

    assert cli.run_command(interrupted, [], interrupted='stopped: resume later') == 130
    assert capsys.readouterr().err == 'stopped: resume later\n'

    def broken(argv: list[str]) -> None:
        raise UserError('x.png: cannot read the image')

    assert cli.run_command(broken, []) == 1
    assert capsys.readouterr().err == 'error: x.png: cannot read the image\n'


def test_python_dash_m_nlsr_is_the_nlsr_command(tmp_path: Path) -> None:
    env = {**os.environ, 'PYTHONPATH': str(ROOT / 'src'), 'SR_EXPERIMENT_ROOT': str(tmp_path)}
    run = [sys.executable, '-m', 'nlsr']
    usage = subprocess.run([*run, '--help'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith('usage: python -m nlsr') and '--hspa_impl' in usage.stdout
    bad = subprocess.run([*run, '--epochs', 'many'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.splitlines() == ["error: argument --epochs: invalid int value: 'many' "
                                                               '(see --help)']


def test_runs_go_to_the_checkout_or_else_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('SR_EXPERIMENT_ROOT', raising=False)
    monkeypatch.chdir(tmp_path)
    assert experiment.checkout_root() == ROOT and experiment.experiment_root() == ROOT / 'experiment'
    monkeypatch.setattr(experiment, 'checkout_root', lambda: None)  # as installed into site-packages
    assert experiment.experiment_root() == tmp_path / 'experiment'
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'elsewhere'))
    assert experiment.experiment_root() == tmp_path / 'elsewhere'
