"""The in-repository reference data (tests/reference) is the published data of ../shared/reference, trimmed
as tests/reference/README.md says; checked when ../shared is beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SHARED, load_reference, reference_path

ST_ROWS = 16  # rows kept per batch element of the soft-thresholding data


def _published(name: str) -> Path:
    path = SHARED / 'reference' / name
    if not path.is_file():
        pytest.skip(f'{path} is absent: nothing to compare the in-repository copy with')
    return path


def _equal(a: object, b: object) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize('name', ['hspan', 'msnlan'])
def test_reference_states_and_outputs_are_the_published_ones(name: str) -> None:
    published = torch.load(_published(f'{name}_reference.pt'), weights_only=True)
    ours = load_reference(name)
    assert sorted(ours) == sorted(published)
    for key, value in published.items():
        if key.startswith('st_'):
            assert value.shape[1] > ST_ROWS and _equal(ours[key], value[:, :ST_ROWS].contiguous()), key
        else:
            assert _equal(ours[key], value), key


@pytest.mark.parametrize('name', ['hspan_layout.json', 'msnlan_layout.json'])
def test_layouts_are_the_published_ones(name: str) -> None:
    published = _published(name)
    assert reference_path(name).read_bytes() == published.read_bytes()
