"""nlsr: single-image super-resolution with non-local attention (HSPAN, MSNLAN and the networks they are
compared with), in the shape of EDSR-PyTorch.

The public face, for networks of your own:

    nlsr.HSPA(channel, reduction=2, res_scale=1, topk=128)    the published High-Similarity-Pass Attention block
    nlsr.hspa(query, key, value)                              exact sparsemax(query @ key^T) @ value, with autograd

Both run what the one dispatcher (nlsr.model.hspa.plan) chooses: on the CPU the native C kernels, built on
first use. The commands: nlsr (train and evaluate, EDSR's main.py flags), nlsr-upscale, nlsr-export,
nlsr-table, nlsr-paper-table, nlsr-figures.
"""

from __future__ import annotations

from typing import Any

__all__ = ['HSPA', 'hspa']


def __getattr__(name: str) -> Any:
    # Imported when first used, so that the commands' --help and nlsr.errors do not import torch.
    if name in __all__:
        from nlsr.model import hspa as operator

        return getattr(operator, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
