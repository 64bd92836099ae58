"""Code shape: no file in src/ over 400 lines, a Trainer class of at most 200 lines, no import cycle among
the modules of src/ (imports inside functions count; `if TYPE_CHECKING:` blocks, which never run, do not),
and a README of a user's manual's length."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import SRC

MAX_LINES = 400
MAX_TRAINER_LINES = 200
MAX_README_LINES = 240


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/ (a package is named by its folder)."""
    out = {}
    for path in sorted(SRC.rglob('*.py')):
        parts = list(path.relative_to(SRC).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or \
        (isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The src/ modules a file imports anywhere (`from pkg import name` counts as pkg.name when that is a
    module, else as pkg)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f'{node.module}.{a.name}'
                if sub in modules:
                    found.add(sub)
                elif node.module in modules:
                    found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {name: _imports(ast.parse(path.read_text(encoding='utf-8')), names) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_among_src_modules() -> None:
    graph = import_graph()
    assert 'training.trainer' in graph and 'training.evaluate' in graph['training.trainer']  # the graph is really read
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph) or [])


def test_cycle_finder_can_fail() -> None:
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    tree = ast.parse('def f():\n    import b\nif TYPE_CHECKING:\n    import c\n')
    assert _imports(tree, {'b', 'c'}) == {'b'}


@pytest.mark.parametrize('path', sorted(SRC.rglob('*.py')), ids=lambda p: str(p.relative_to(SRC)))
def test_no_src_file_over_400_lines(path: Path) -> None:
    assert len(path.read_text(encoding='utf-8').splitlines()) <= MAX_LINES


def test_trainer_class_is_edsr_sized() -> None:
    tree = ast.parse((SRC / 'training' / 'trainer.py').read_text(encoding='utf-8'))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'Trainer')
    assert cls.end_lineno - cls.lineno + 1 <= MAX_TRAINER_LINES


def test_readme_is_a_manual_not_a_notebook() -> None:
    assert len((SRC.parent / 'README.md').read_text(encoding='utf-8').splitlines()) <= MAX_README_LINES
