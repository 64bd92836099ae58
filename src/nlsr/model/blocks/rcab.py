"""Residual channel attention blocks of RCAN (Zhang et al., ECCV 2018), shared by RCAN and HAN.

Module and parameter names follow the published code (yulunzhang/RCAN, wwlCape/HAN: CALayer, RCAB,
ResidualGroup), so released state dicts fit: a residual group's keys are
'<group>.body.<block>.body.{0,2}.*' (the two convolutions), '<group>.body.<block>.body.3.conv_du.{0,2}.*'
(the channel attention) and '<group>.body.<n_resblocks>.*' (the group's last convolution).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from nlsr.model import common


class ChannelAttention(nn.Module):
    """x * sigmoid(conv(relu(conv(avg_pool(x))))): the squeeze to n_feats // reduction channels and back."""

    def __init__(self, n_feats: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = common.squeeze_excitation(n_feats, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(self.avg_pool(x))


class RCAB(nn.Module):
    """Residual channel attention block: x + CA(conv(relu(conv(x)))). The published block takes a
    res_scale but never applies it (its scaling line is commented out), so there is none here."""

    def __init__(self, conv: common.ConvFactory, n_feats: int, kernel_size: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(n_feats, n_feats, kernel_size, bias=True),
            nn.ReLU(True),
            conv(n_feats, n_feats, kernel_size, bias=True),
            ChannelAttention(n_feats, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class ResidualGroup(nn.Module):
    """n_resblocks RCABs and a convolution, with a skip connection around them."""

    def __init__(self, conv: common.ConvFactory, n_feats: int, kernel_size: int, reduction: int,
                 n_resblocks: int) -> None:
        super().__init__()
        body: list[nn.Module] = [RCAB(conv, n_feats, kernel_size, reduction) for _ in range(n_resblocks)]
        body.append(conv(n_feats, n_feats, kernel_size))
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def check_reduction(n_feats: int, reduction: int) -> None:
    """Refuse a --reduction that leaves the channel attention without channels (ValueError naming the flag)."""
    if n_feats // reduction < 1:
        raise ValueError(f'--reduction {reduction} with --n_feats {n_feats}: the channel attention would '
                         f'squeeze to n_feats // reduction = 0 channels')


def residual_groups(n_feats: int, n_resgroups: int, n_resblocks: int, reduction: int) -> nn.Sequential:
    """The body of RCAN and HAN: n_resgroups residual groups, then a convolution (keys 'body.<i>.*')."""
    if n_resblocks:
        check_reduction(n_feats, reduction)
    conv = common.default_conv
    body: list[nn.Module] = [ResidualGroup(conv, n_feats, 3, reduction, n_resblocks) for _ in range(n_resgroups)]
    body.append(conv(n_feats, n_feats, 3))
    return nn.Sequential(*body)


def infer_residual_groups(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """scale, n_feats, n_colors, n_resgroups, n_resblocks and reduction of an RCAN-style state dict (head,
    residual groups, tail), as far as its keys and shapes tell; {} without residual channel attention blocks."""
    squeeze = [v for k, v in state.items() if re.match(r'body\.\d+\.body\.\d+\.body\.3\.conv_du\.0\.weight$', k)]
    if not squeeze:
        return {}
    cfg: dict[str, object] = dict(common.infer_head(state))
    cfg['scale'] = common.infer_scale(state, int(cfg.get('n_feats', 0)))
    cfg['n_resgroups'] = common.count_indices(state, r'body\.(\d+)\.body\.')
    cfg['n_resblocks'] = common.count_indices(state, r'body\.0\.body\.(\d+)\.body\.')
    if cfg.get('n_feats') and squeeze[0].dim() == 4 and squeeze[0].shape[0]:
        cfg['reduction'] = int(cfg['n_feats']) // int(squeeze[0].shape[0])
    return cfg
