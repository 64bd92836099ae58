"""Building blocks shared by the networks: conv helper, MeanShift, Upsampler, BasicBlock, ResBlock.

Module and parameter names follow the published EDSR/HSPAN/MSNLAN code so released state dicts fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

ConvFactory = Callable[..., nn.Module]

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


def default_conv(
    in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True, stride: int = 1, groups: int = 1
) -> nn.Conv2d:
    """'Same' convolution for odd kernels (padding kernel_size // 2), as in the published code."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias
    )


class MeanShift(nn.Conv2d):
    """Frozen 1x1 conv adding sign * rgb_range * mean (per channel, divided by std).

    The weight and bias stay in the state dict (released checkpoints carry them) but take no gradient.
    With one colour channel the three means are averaged: the published code only handles RGB.
    """

    def __init__(
        self,
        rgb_range: float,
        rgb_mean: tuple[float, ...] = DIV2K_MEAN,
        rgb_std: tuple[float, ...] = (1.0, 1.0, 1.0),
        sign: int = -1,
        n_colors: int = 3,
    ) -> None:
        super().__init__(n_colors, n_colors, kernel_size=1)
        mean = torch.tensor(rgb_mean, dtype=torch.float32)
        std = torch.tensor(rgb_std, dtype=torch.float32)
        if n_colors == 1:
            mean, std = mean.mean().view(1), std.mean().view(1)
        elif n_colors != 3:
            raise ValueError(f'--n_colors {n_colors}: expected 1 or 3')
        with torch.no_grad():
            self.weight.copy_(torch.eye(n_colors).view(n_colors, n_colors, 1, 1) / std.view(n_colors, 1, 1, 1))
            self.bias.copy_(sign * rgb_range * mean / std)
        for p in self.parameters():
            p.requires_grad = False


class BasicBlock(nn.Sequential):
    """conv (+ BatchNorm) (+ activation) as one Sequential: keys '<name>.0.weight', '<name>.1.weight'."""

    def __init__(
        self,
        conv: ConvFactory,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        bn: bool = False,
        act: nn.Module | None = None,
    ) -> None:
        layers: list[nn.Module] = [conv(in_channels, out_channels, kernel_size, bias=bias)]
        if bn:
            layers.append(nn.BatchNorm2d(out_channels))
        if act is not None:
            layers.append(act)
        super().__init__(*layers)


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv(act(conv(x)))."""

    def __init__(
        self,
        conv: ConvFactory,
        n_feats: int,
        kernel_size: int,
        bias: bool = True,
        bn: bool = False,
        act: nn.Module | None = None,
        res_scale: float = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(2):
            layers.append(conv(n_feats, n_feats, kernel_size, bias=bias))
            if bn:
                layers.append(nn.BatchNorm2d(n_feats))
            if i == 0:
                layers.append(act if act is not None else nn.ReLU(True))
        self.body = nn.Sequential(*layers)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


def squeeze_excitation(channel: int, reduction: int) -> nn.Sequential:
    """conv 1x1 to channel // reduction, ReLU, conv 1x1 back, sigmoid: the gate of the channel attentions (RCAN's,
    MSNLAN's, SAN's second-order one), saved as conv_du.0.* and conv_du.2.*."""
    return nn.Sequential(
        nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=True),
        nn.Sigmoid(),
    )


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: log2(scale) x (conv to 4C, PixelShuffle(2)) for powers of two, or conv to 9C,
    PixelShuffle(3) for scale 3. (The published MSNLAN passes `bias` into the groups slot at x3; its
    weights mean groups=1, which is what this builds.)"""

    def __init__(self, conv: ConvFactory, scale: int, n_feats: int, bn: bool = False, act: str | bool = False,
                 bias: bool = True) -> None:
        layers: list[nn.Module] = []
        if scale >= 1 and scale & (scale - 1) == 0:
            steps = [2] * (scale.bit_length() - 1)
        elif scale == 3:
            steps = [3]
        else:
            raise ValueError(f'--scale {scale}: the upsampler supports powers of 2 and 3')
        for r in steps:
            layers.append(conv(n_feats, r * r * n_feats, 3, bias=bias))
            layers.append(nn.PixelShuffle(r))
            if bn:
                layers.append(nn.BatchNorm2d(n_feats))
            if act == 'relu':
                layers.append(nn.ReLU(True))
            elif act == 'prelu':
                layers.append(nn.PReLU(n_feats))
        super().__init__(*layers)


# ---- reading a configuration back from a state dict (for checkpoint mismatch messages) ----

def count_indices(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct integers captured by `pattern` (one group) over the keys of `state`."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_scale(state: Mapping[str, torch.Tensor], n_feats: int, prefix: str = 'tail.0.') -> int | None:
    """Scale of an Upsampler stored under `prefix` (None when it cannot be told)."""
    rx = re.compile(re.escape(prefix) + r'(\d+)\.weight$')
    outs = [v.shape[0] for k, v in state.items() if rx.match(k) and v.dim() == 4]
    if not outs or not n_feats:
        return None
    if len(outs) == 1 and outs[0] == 9 * n_feats:
        return 3
    if all(o == 4 * n_feats for o in outs):
        return 2 ** len(outs)
    return None


def infer_head(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """n_feats and n_colors from the first conv ('head.0.weight')."""
    w = state.get('head.0.weight')
    if w is None or w.dim() != 4:
        return {}
    return {'n_feats': int(w.shape[0]), 'n_colors': int(w.shape[1])}
