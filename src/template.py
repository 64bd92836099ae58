"""Presets selected with --template: the published configurations of each model."""

from __future__ import annotations

import argparse


def set_template(args: argparse.Namespace) -> None:
    """Overwrite args in place with the preset named by args.template (case-insensitive)."""
    name = str(args.template).upper()
    if 'HSPAN' in name:
        args.model = 'HSPAN'
        args.n_resgroups = 10
        args.n_resblocks = 4
        args.n_feats = 192
        args.reduction = 2
        args.topk = 128
        args.res_scale = 0.1
        args.rgb_range = 1
        args.chop = True
    elif 'MSNLAN' in name or 'MSDSN' in name:
        args.model = 'MSNLAN'
        args.n_resgroups = 8
        args.n_resblocks = 9
        args.n_feats = 64
        args.res_scale = 0.1
        args.lr = 2e-4
        args.chop = True
    elif 'EDSR_PAPER' in name:
        args.model = 'EDSR'
        args.n_resblocks = 32
        args.n_feats = 256
        args.res_scale = 0.1
    elif 'EDSR' in name:
        args.model = 'EDSR'
        args.n_resblocks = 16
        args.n_feats = 64
        args.res_scale = 1
