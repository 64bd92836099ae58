"""RDN (Zhang et al., "Residual Dense Network for Image Super-Resolution", CVPR 2018).

Same modules, state-dict keys and arithmetic as the copy in laoyangui/HSPAN (src/model/rdn.py), so its
checkpoints load strictly. As published:
- no mean shift: the network sees the input as it comes (the released weights expect --rgb_range 255);
- the convolutions inside the dense blocks are always 3x3; --RDNkSize sizes the others;
- x2 and x3 upsample with one sub-pixel step, x4 with two (UPNet.0, UPNet.2, UPNet.4).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.contract import ChopRule, SRNetwork
from nlsr.model.networks.hspan import HSPAN_CHOP

FLAGS = ('G0', 'RDNkSize', 'RDNconfig')
# --RDNconfig -> (dense blocks D, layers per block C, growth rate G)
CONFIGS = {'A': (20, 6, 32), 'B': (16, 8, 64)}
SCALES = (2, 3, 4)
DENSE_KERNEL = 3  # the published dense layers ignore --RDNkSize


def make_model(args: argparse.Namespace) -> SRNetwork:
    scale = args.scale[0]
    if scale not in SCALES:
        raise ValueError(f'--scale {scale}: RDN upsamples by 2, 3 or 4')
    if args.RDNkSize % 2 == 0:
        raise ValueError(f'--RDNkSize {args.RDNkSize}: expected an odd kernel size (an even one changes the '
                         'feature size)')
    if args.RDNconfig not in CONFIGS:
        raise ValueError(f'--RDNconfig {args.RDNconfig}: expected one of {", ".join(CONFIGS)}')
    return RDN(scale=scale, n_colors=args.n_colors, G0=args.G0, RDNkSize=args.RDNkSize, RDNconfig=args.RDNconfig,
               rgb_range=args.rgb_range)


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, stride=1)


class DenseLayer(nn.Module):
    """conv + ReLU whose G output channels are appended to its input (keys conv.0.*)."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(in_channels, growth, DENSE_KERNEL), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(x)), 1)


class ResidualDenseBlock(nn.Module):
    """C dense layers, then local feature fusion (1x1 conv back to G0 channels) plus the block's input."""

    def __init__(self, G0: int, growth: int, n_layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[DenseLayer(G0 + c * growth, growth) for c in range(n_layers)])
        self.LFF = nn.Conv2d(G0 + n_layers * growth, G0, 1, padding=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LFF(self.convs(x)) + x


class RDN(SRNetwork):
    """Shallow features (SFENet1, SFENet2) -> D residual dense blocks -> global feature fusion over all their
    outputs (GFF) plus SFENet1's output -> sub-pixel upsampling to n_colors (UPNet)."""

    def __init__(self, scale: int = 4, n_colors: int = 3, G0: int = 64, RDNkSize: int = 3, RDNconfig: str = 'B',
                 rgb_range: float = 255) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f'--scale {scale}: RDN upsamples by 2, 3 or 4')
        self.config = dict(scale=scale, n_colors=n_colors, G0=G0, RDNkSize=RDNkSize, RDNconfig=RDNconfig,
                           rgb_range=rgb_range)  # rgb_range: the range its weights were trained at
        n_blocks, n_layers, growth = CONFIGS[RDNconfig]
        k = RDNkSize
        self.SFENet1 = _conv(n_colors, G0, k)
        self.SFENet2 = _conv(G0, G0, k)
        self.RDBs = nn.ModuleList([ResidualDenseBlock(G0, growth, n_layers) for _ in range(n_blocks)])
        self.GFF = nn.Sequential(nn.Conv2d(n_blocks * G0, G0, 1, padding=0, stride=1), _conv(G0, G0, k))
        if scale == 4:
            up: list[nn.Module] = [_conv(G0, growth * 4, k), nn.PixelShuffle(2),
                                   _conv(growth, growth * 4, k), nn.PixelShuffle(2)]
        else:
            up = [_conv(G0, growth * scale * scale, k), nn.PixelShuffle(scale)]
        self.UPNet = nn.Sequential(*up, _conv(growth, n_colors, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.SFENet1(x)
        x = self.SFENet2(shallow)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        x = self.GFF(torch.cat(outs, 1)) + shallow
        return self.UPNet(x)

    def chop_rule(self, scale: int) -> ChopRule:
        return HSPAN_CHOP  # the forward_chop of laoyangui/HSPAN, shared by all its models

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The flags a state dict of this network was built with, as far as its keys and shapes tell
        ({} when it has no SFENet1)."""
        first = state.get('SFENet1.weight')
        if first is None or first.dim() != 4:
            return {}
        cfg: dict[str, object] = {'n_colors': int(first.shape[1]), 'G0': int(first.shape[0]),
                                  'RDNkSize': int(first.shape[2])}
        shape = (common.count_indices(state, r'RDBs\.(\d+)\.'),
                 common.count_indices(state, r'RDBs\.0\.convs\.(\d+)\.'))
        dense = state.get('RDBs.0.convs.0.conv.0.weight')
        growth = int(dense.shape[0]) if dense is not None else 0
        cfg['RDNconfig'] = next((name for name, c in CONFIGS.items() if c == (*shape, growth)), None)
        up = state.get('UPNet.0.weight')
        if 'UPNet.4.weight' in state:
            cfg['scale'] = 4
        elif up is not None and growth:
            cfg['scale'] = round((int(up.shape[0]) // growth) ** 0.5)
        return cfg
