"""Every command README.md shows runs as written.

Commands are the lines of its fenced bash blocks and its inline code spans that start a command (`python`, `bash
demo.sh`, `pip`, `torchrun`, `cd src && ...`, the package's commands `nlsr`, `nlsr-*`, with environment assignments
in front). Each is checked without doing its work: main.py's (and `nlsr`'s) arguments go through option.parse_flags
(no file is read) and the model flag check (as tests/test_demo_sh.py does for demo.sh); scripts answer `--help` from
where the README runs them, the package's commands through the entry points pyproject.toml names; a demo.sh target
must exist and its main.py commands parse with the extra arguments given; pip's requirement files and the package it
installs must exist; pytest's markers must be declared. A command that cannot be checked this way is listed in
UNCHECKED with the reason, so that none is skipped silently.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from nlsr import model, option
from test_demo_sh import _main_commands

README = ROOT / 'README.md'
# Words that start a command in an inline code span (after any VAR=value assignments).
COMMAND_START = ('python ', 'bash ', 'pip ', 'torchrun ', 'cd ', 'nlsr ', 'nlsr-')
# A placeholder for main.py's arguments (`<flags>`); the tools' placeholders (MODEL, [IN ...]) only meet `--help`.
PLACEHOLDER = re.compile(r'^<[^>]+>$')
# Parts of commands (between &&) that are not checked here, each with the reason.
UNCHECKED = {
    'python -m pytest -q': 'runs the whole suite, this test included; .ci/run runs it verbatim (checked below)',
}
# demo.sh targets whose main.py commands live in a helper function (which gets the target's extra arguments).
DEMO_HELPERS = {'attention_ablation': 'ablation_run'}


def _commands() -> list[str]:
    """Each command of README.md as written, a fenced block's lines joined to the `cd` line above them."""
    text = README.read_text(encoding='utf-8')
    found: list[str] = []
    for block in re.findall(r'```(?:bash|sh)\n(.*?)```', text, re.S):
        cwd = ''
        for line in block.splitlines():
            line = line.split('  #')[0].split('    #')[0].strip()
            if not line or line.startswith('#'):
                continue
            if re.fullmatch(r'cd \S+', line):
                cwd = line
                continue
            found.append(f'{cwd} && {line}' if cwd else line)
    prose = re.sub(r'```.*?```', '', text, flags=re.S)
    for span in re.findall(r'`([^`]+)`', prose):
        span = ' '.join(span.split())  # a span may wrap over lines
        if re.sub(r'^(\w+=\S+ )+', '', span).startswith(COMMAND_START):
            found.append(span)
    return found


def _parts(command: str) -> list[str]:
    return [part.strip() for part in command.split('&&')]


def _demo_targets() -> set[str]:
    case = (ROOT / 'demo.sh').read_text().split('case "${1:-}" in', 1)[1]
    return {name for line in case.splitlines() if ')' in line
            for name in line.split(')')[0].strip().split('|') if re.fullmatch(r'\w+', name)}


def _check_main(argv: list[str]) -> None:
    args = option.parse_flags([a for a in argv if not PLACEHOLDER.match(a)])
    model.check_model_flags(args)


@functools.cache
def _check_help(script: Path, cwd: Path) -> None:
    out = subprocess.run([sys.executable, str(script), '--help'], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and 'usage' in out.stdout, f'{script} --help: {out.stderr[-400:]}'


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: command -> 'module:function'."""
    section = (ROOT / 'pyproject.toml').read_text().split('[project.scripts]\n', 1)[1].split('\n[', 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"$', section, re.M))


@functools.cache
def _check_command_help(command: str) -> None:
    """The package's command answers --help through its entry point, run from an unrelated folder on this
    checkout's src/ (the installed command is the same function: tests/test_package.py)."""
    module, function = console_scripts()[command].split(':')
    code = f'import sys; from {module} import {function}; sys.argv[0] = {command!r}; sys.exit({function}())'
    out = subprocess.run([sys.executable, '-c', code, '--help'], cwd=ROOT / 'datasets', capture_output=True, text=True,
                         timeout=300, env={**os.environ, 'PYTHONPATH': str(ROOT / 'src')})
    assert out.returncode == 0 and f'usage: {command}' in out.stdout, f'{command} --help: {out.stderr[-400:]}'


def _check_part(words: list[str], cwd: Path) -> None:
    while words and re.fullmatch(r'\w+=\S+', words[0]):  # environment assignments
        words = words[1:]
    head, rest = words[0], words[1:]
    if head == 'pip':
        assert rest[0] == 'install'
        files = [rest[i + 1] for i, w in enumerate(rest) if w == '-r']
        projects = [rest[i + 1] for i, w in enumerate(rest) if w == '-e']
        packages = [w for w in rest[1:] if not w.startswith('-') and w not in files + projects]
        for name in files:
            assert (cwd / name).is_file(), name
        for name in projects:
            project = cwd / name / 'pyproject.toml'
            assert project.is_file() and '[project]' in project.read_text(), f'-e {name}: no [project] in {project}'
        requirements = ' '.join(p.read_text() for p in ROOT.glob('requirements*.txt'))
        for name in packages:
            assert re.search(rf'^{re.escape(name)}\b', requirements, re.M), f'{name} is in no requirements file'
    elif head == 'bash':
        assert rest[0] == 'demo.sh' and (cwd / 'demo.sh').is_file()
        target, extra = rest[1], rest[2:]
        assert target in _demo_targets(), f'demo.sh has no target {target}'
        if target == 'paper_table':
            _check_command_help('nlsr-paper-table')
        for function, argv in _main_commands():
            if function == DEMO_HELPERS.get(target, target):
                _check_main(argv + [w for w in extra if not PLACEHOLDER.match(w)])
    elif head == 'torchrun':
        from torch.distributed.run import get_args_parser

        script = next(i for i, w in enumerate(rest) if w.endswith('.py'))
        get_args_parser().parse_args(rest[:script + 1])
        assert (cwd / rest[script]).is_file()
        _check_main(rest[script + 1:])
    elif head == 'nlsr' and rest != ['--help']:
        _check_main(rest)
    elif head in console_scripts():
        _check_command_help(head)
    elif head == 'python' and rest[:2] == ['-m', 'pytest']:
        markers = (ROOT / 'pyproject.toml').read_text()
        for expr in (rest[i + 1] for i, w in enumerate(rest) if w == '-m' and i > 1):
            for name in set(re.findall(r'\w+', expr)) - {'not', 'and', 'or'}:
                assert f'"{name}:' in markers, f'marker {name} is not declared'
    elif head == 'python':
        script = cwd / rest[0]
        assert script.is_file(), script
        if script.name == 'main.py' and rest[1:] != ['--help']:
            _check_main(rest[1:])
        else:
            _check_help(script, cwd)
    else:
        raise AssertionError(f'no check for {" ".join(words)}')


@pytest.mark.parametrize('command', _commands())
def test_readme_command_runs_as_written(command: str) -> None:
    cwd = ROOT
    for part in _parts(command):
        if part in UNCHECKED:
            continue
        words = shlex.split(part)
        if words[0] == 'cd':
            cwd = cwd / words[1]
            assert cwd.is_dir()
            continue
        _check_part(words, cwd)


def test_the_commands_are_found() -> None:
    commands = _commands()
    assert len(commands) >= 10
    assert 'pip install -r requirements.txt -e . && bash demo.sh quick' in commands
    assert {'nlsr-upscale', 'nlsr-export', 'nlsr-table', 'nlsr-paper-table'} <= {c.split()[0] for c in commands}
    parts = {part for c in commands for part in _parts(c)}
    assert set(UNCHECKED) <= parts, 'UNCHECKED names a command the README no longer has'


def test_ci_runs_the_readme_test_command() -> None:
    """The unchecked pytest command is the one .ci/run calls, verbatim, and it is the README's second command."""
    ci = (ROOT / '.ci' / 'run').read_text()
    command = 'pip install -q -r requirements-test.txt && python -m pytest -q'
    assert command in ci.splitlines() and _commands()[1] == command


def test_the_placeholder_rule() -> None:
    assert PLACEHOLDER.match('<flags>')
    assert not any(PLACEHOLDER.match(w) for w in ('--pre_train', 'HSPAN', 'Set5+Set14', '../', 'model_x2.pt'))
