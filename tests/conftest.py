"""Shared test set-up: src/ on sys.path, the in-repository reference data (tests/reference), and ../shared
located (the larger image sets; tests needing them skip without it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / 'src'
SHARED = ROOT.parent / 'shared'
REFERENCE = ROOT / 'tests' / 'reference'
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def reference_path(name: str) -> Path:
    """tests/reference/<name>: the published implementations' outputs, shipped with the repository."""
    path = REFERENCE / name
    if not path.is_file():
        raise FileNotFoundError(f'{path}: reference data missing from the checkout (see tests/reference/README.md)')
    return path


def load_reference(name: str) -> dict:
    """The published model's states and outputs: load_reference('hspan') or load_reference('msnlan')."""
    import torch

    return torch.load(reference_path(f'{name}_reference.pt'), weights_only=True)


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test with the reason when it is absent. Reference data
    ('reference', name) comes from tests/reference, so it never skips."""
    if len(parts) == 2 and parts[0] == 'reference':
        return reference_path(parts[1])
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} is absent: ../shared (the benchmark and training image sets) is not beside this checkout')
    return path


def write_blocky_folders(data: Path, folders: tuple[tuple[str, int, tuple[int, int]], ...], seed: int = 0) -> None:
    """HR-only image folders `data/<name>/im<i>.png` of blocky random colours (structure a 2x upscaler can
    partly learn), for (name, count, (height, width)) in `folders`, drawn in that order from one seed."""
    import imageio.v3 as iio
    import numpy as np

    rng = np.random.default_rng(seed)
    for name, count, (h, w) in folders:
        (data / name).mkdir(parents=True)
        for i in range(count):
            x = np.kron(rng.random((h // 4 + 1, w // 4 + 1, 3)), np.ones((4, 4, 1)))[:h, :w]
            iio.imwrite(data / name / f'im{i}.png', (x * 255).astype(np.uint8))


def tiny_world(base: Path) -> dict:
    """HR folders Tiny (training, 4 images) and Mini (test, 2) under one --dir_data, and an empty experiment
    root: the data of the in-process training runs."""
    write_blocky_folders(base / 'data', (('Tiny', 4, (40, 48)), ('Mini', 2, (24, 28))))
    return {'data': base / 'data', 'exp': base / 'experiment'}


def run_main(world: dict, monkeypatch: pytest.MonkeyPatch, flags: list[str], *argv: str) -> None:
    """main.main(flags + --dir_data <world's data> + argv) in this process, into the world's experiment root;
    it must succeed."""
    from nlsr import main

    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    assert main.main([*flags, '--dir_data', str(world['data']), *argv]) == 0
