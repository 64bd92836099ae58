"""D-DBPN (Haris et al., "Deep Back-Projection Networks for Super-Resolution", CVPR 2018).

Same modules, state-dict keys and arithmetic as the copy in laoyangui/HSPAN (src/model/ddbpn.py), so its
checkpoints load strictly. That copy fixes its widths and depth for every scale (n0 = 128 initial features,
nr = 32 per projection, 6 up- and 5 down-projections) and reads no model flags; the scale only sets the
projection kernels (x2: 6/2/2, x4: 8/4/2, x8: 12/8/2 for kernel/stride/padding). There is no x3.
It subtracts and adds the DIV2K mean (std 1) scaled by --rgb_range (the released weights expect 255).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.contract import ChopRule, SRNetwork
from nlsr.model.networks.hspan import HSPAN_CHOP

FLAGS: tuple[str, ...] = ()
# scale -> (kernel size, stride, padding) of the projection convolutions
PROJECTION = {2: (6, 2, 2), 4: (8, 4, 2), 8: (12, 8, 2)}
N0, NR, DEPTH = 128, 32, 6


def make_model(args: argparse.Namespace) -> SRNetwork:
    scale = args.scale[0]
    if scale not in PROJECTION:
        raise ValueError(f'--scale {scale}: DDBPN upsamples by 2, 4 or 8 (its projections have no x3)')
    return DDBPN(scale=scale, n_colors=args.n_colors, rgb_range=args.rgb_range)


def projection_conv(in_channels: int, out_channels: int, scale: int, up: bool) -> nn.Module:
    """Transposed convolution (up) or strided convolution (down) by `scale`."""
    kernel_size, stride, padding = PROJECTION[scale]
    conv = nn.ConvTranspose2d if up else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding)


class DenseProjection(nn.Module):
    """Back-projection unit: (1x1 bottleneck to nr channels + PReLU, when `bottleneck`), then
    a0 = P(x), e = Q(a0) - x, out = a0 + P'(e) with P, P' projecting to the other resolution and Q back."""

    def __init__(self, in_channels: int, nr: int, scale: int, up: bool = True, bottleneck: bool = True) -> None:
        super().__init__()
        self.bottleneck: nn.Module | None = None
        inter = in_channels
        if bottleneck:
            self.bottleneck = nn.Sequential(nn.Conv2d(in_channels, nr, 1), nn.PReLU(nr))
            inter = nr
        self.conv_1 = nn.Sequential(projection_conv(inter, nr, scale, up), nn.PReLU(nr))
        self.conv_2 = nn.Sequential(projection_conv(nr, inter, scale, not up), nn.PReLU(inter))
        self.conv_3 = nn.Sequential(projection_conv(inter, nr, scale, up), nn.PReLU(nr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bottleneck is not None:
            x = self.bottleneck(x)
        a_0 = self.conv_1(x)
        e = self.conv_2(a_0).sub(x)
        return a_0.add(self.conv_3(e))


class DDBPN(SRNetwork):
    """sub_mean -> initial features -> alternating dense up/down projections (each fed the concatenation
    of all earlier outputs of the other kind) -> 3x3 reconstruction over all HR maps -> add_mean."""

    def __init__(self, scale: int = 4, n_colors: int = 3, rgb_range: float = 255,
                 rgb_mean: tuple[float, float, float] = common.DIV2K_MEAN) -> None:
        super().__init__()
        if scale not in PROJECTION:
            raise ValueError(f'--scale {scale}: DDBPN upsamples by 2, 4 or 8 (its projections have no x3)')
        self.config = dict(scale=scale, n_colors=n_colors, rgb_range=rgb_range)
        self.depth = DEPTH
        self.sub_mean = common.MeanShift(rgb_range, rgb_mean, sign=-1, n_colors=n_colors)
        self.initial = nn.Sequential(nn.Conv2d(n_colors, N0, 3, padding=1), nn.PReLU(N0),
                                     nn.Conv2d(N0, NR, 1), nn.PReLU(NR))
        # up-projection i reads i (at least 1) LR maps of nr channels; the first two have no bottleneck
        self.upmodules = nn.ModuleList([DenseProjection(NR * max(i, 1), NR, scale, True, i > 1)
                                        for i in range(DEPTH)])
        # down-projection i reads i + 1 HR maps; the first has no bottleneck
        self.downmodules = nn.ModuleList([DenseProjection(NR * (i + 1), NR, scale, False, i != 0)
                                          for i in range(DEPTH - 1)])
        self.reconstruction = nn.Sequential(nn.Conv2d(DEPTH * NR, n_colors, 3, padding=1))
        self.add_mean = common.MeanShift(rgb_range, rgb_mean, sign=1, n_colors=n_colors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial(self.sub_mean(x))
        h_list: list[torch.Tensor] = []
        l_list: list[torch.Tensor] = []
        for i in range(self.depth - 1):
            low = x if i == 0 else torch.cat(l_list, dim=1)
            h_list.append(self.upmodules[i](low))
            l_list.append(self.downmodules[i](torch.cat(h_list, dim=1)))
        h_list.append(self.upmodules[-1](torch.cat(l_list, dim=1)))
        return self.add_mean(self.reconstruction(torch.cat(h_list, dim=1)))

    def chop_rule(self, scale: int) -> ChopRule:
        return HSPAN_CHOP  # the forward_chop of laoyangui/HSPAN, shared by all its models

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """n_colors and scale read back from a state dict ({} when it has no initial convolution)."""
        first = state.get('initial.0.weight')
        if first is None or first.dim() != 4:
            return {}
        cfg: dict[str, object] = {'n_colors': int(first.shape[1])}
        up = state.get('upmodules.0.conv_1.0.weight')
        if up is not None and up.dim() == 4:
            cfg['scale'] = next((s for s, p in PROJECTION.items() if p[0] == up.shape[2]), None)
        return cfg
