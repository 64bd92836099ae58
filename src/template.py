"""Presets selected with --template: the published configurations of each model, applied as defaults.

A flag written on the command line keeps its value; the template fills in the others.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection

TEMPLATES: dict[str, dict[str, object]] = {
    'HSPAN': {'model': 'HSPAN', 'n_resgroups': 10, 'n_resblocks': 4, 'n_feats': 192, 'reduction': 2, 'topk': 128,
              'res_scale': 0.1, 'rgb_range': 1, 'chop': True},
    'MSNLAN': {'model': 'MSNLAN', 'n_resgroups': 8, 'n_resblocks': 9, 'n_feats': 64, 'res_scale': 0.1, 'lr': 2e-4,
               'chop': True},
    'EDSR_PAPER': {'model': 'EDSR', 'n_resblocks': 32, 'n_feats': 256, 'res_scale': 0.1},
    'EDSR': {'model': 'EDSR', 'n_resblocks': 16, 'n_feats': 64, 'res_scale': 1},
}


def template_values(name: str) -> dict[str, object]:
    """The preset whose name appears in `name` (case-insensitive; first match in TEMPLATES order), or {}."""
    from model.registry import ALIASES  # the networks' other names (--template MSDSN = MSNLAN)

    key = str(name).upper()
    for alias, target in ALIASES.items():
        key = key.replace(alias.upper(), target.upper())
    return next((dict(values) for t, values in TEMPLATES.items() if t in key), {})


def known_names() -> list[str]:
    """The preset names --template accepts: TEMPLATES, then the networks' other names (e.g. MSDSN)."""
    from model.registry import ALIASES

    return [*TEMPLATES, *(alias.upper() for alias, target in ALIASES.items() if target.upper() in TEMPLATES)]


def set_template(args: argparse.Namespace, given: Collection[str] = ()) -> None:
    """Set the preset's values on args, except for the flags in `given` (written on the command line)."""
    for flag, value in template_values(args.template).items():
        if flag not in given:
            setattr(args, flag, value)
