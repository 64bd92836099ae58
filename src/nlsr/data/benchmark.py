"""Benchmark test sets (Set5, Set14, B100, Urban100, Manga109, or any folder name).

Looked up and read like `folder.Folder` (EDSR `HR/` + `LR_bicubic/X{s}/`, MSNLAN `GTmod12/` +
`LRbicx{s}/x{s}/`, or HR images only). As published, test images are decoded from their files on every
evaluation whatever `--ext` (the sets are small); LR images that have to be made from HR are cached.
"""

from __future__ import annotations

from typing import Any

from nlsr.data.folder import Folder

KNOWN = ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')


class Benchmark(Folder):
    decode_cache = False

    def __init__(self, args: Any, name: str, train: bool = False, **kwargs: Any) -> None:
        super().__init__(args, name=name, train=train, **kwargs)
