"""The Charbonnier loss: a smooth L1, mean(sqrt((sr - hr)^2 + eps^2)), eps 1e-3 by default (as MPRNet and
Restormer write it). BasicSR's CharbonnierLoss adds its eps (1e-12) unsquared: --charbonnier_eps 1e-6 here."""

from __future__ import annotations

import torch
from torch import nn


class Charbonnier(nn.Module):
    """mean(sqrt((sr - hr)^2 + eps^2)); eps in the units of the images (--rgb_range)."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f'--charbonnier_eps {eps}: expected a positive number')
        self.eps = eps

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((sr - hr).square() + self.eps * self.eps).mean()

    def extra_repr(self) -> str:
        return f'eps={self.eps:g}'
