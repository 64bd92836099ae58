"""Shared test set-up: src/ on sys.path, and ../shared located (tests needing it skip without it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / 'src'
SHARED = ROOT.parent / 'shared'
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} is absent: ../shared (reference data) is not beside this checkout')
    return path
