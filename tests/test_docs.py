"""The Markdown files stay true to the tree: every repository path they name exists."""

from __future__ import annotations

import re

from conftest import ROOT

# A word that starts with a top-level folder of the repository; patterns (<name>, {scale}, *) are not paths.
PATH_WORD = re.compile(r'(?<![\w./-])((?:src|tests|benchmarks|docs|Figs|datasets)/[\w./<>{}*\-]*)')


def _markdown_files() -> list:
    return [p for p in ROOT.rglob('*.md') if not {'.git', 'experiment', '.pytest_cache'} & set(p.parts)]


def test_markdown_names_only_paths_that_exist() -> None:
    missing = []
    for md in _markdown_files():
        for match in PATH_WORD.finditer(md.read_text()):
            path = match.group(1).rstrip('.,:;)')
            if not any(c in path for c in '<>{}*') and not (ROOT / path).exists():
                missing.append(f'{md.relative_to(ROOT)}: {path}')
    assert not missing, missing


def test_the_check_sees_a_missing_path(tmp_path) -> None:
    text = 'See src/nowhere.py and src/main.py, or tests/<name>.py.'
    found = [m.group(1).rstrip('.,:;)') for m in PATH_WORD.finditer(text)]
    assert found == ['src/nowhere.py', 'src/main.py', 'tests/<name>.py']
    assert not (ROOT / found[0]).exists() and (ROOT / found[1]).exists()


MAX_BENCHMARKS_README_LINES = 300


def test_benchmarks_readme_is_a_summary() -> None:
    """Per script its command and headline table; design notes live in docs/, history in git."""
    lines = (ROOT / 'benchmarks' / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= MAX_BENCHMARKS_README_LINES


def test_benchmarks_readme_gives_every_script_its_command() -> None:
    text = (ROOT / 'benchmarks' / 'README.md').read_text(encoding='utf-8')
    scripts = sorted(p.name for p in (ROOT / 'benchmarks').glob('*.py') if p.name != 'harness.py')  # a library
    assert [s for s in scripts if f'python benchmarks/{s}' not in text] == []


def test_the_library_guide_runs_as_written() -> None:
    """docs/library.md's Python blocks, in order, in a fresh namespace: the README's way to use HSPA elsewhere."""
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / 'docs' / 'library.md').read_text(encoding='utf-8'), re.S)
    assert blocks
    namespace: dict = {'__name__': 'library_guide'}
    for block in blocks:
        exec(compile(block, 'docs/library.md', 'exec'), namespace)  # noqa: S102 - the guide's own code
    assert namespace['out'].shape == (2, 100, 16) and namespace['query'].grad is not None
