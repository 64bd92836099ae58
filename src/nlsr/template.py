"""Presets selected with --template: the published configurations of each model, applied as defaults.

A flag written on the command line keeps its value; the template fills in the others.
"""

from __future__ import annotations

from collections.abc import Collection

TEMPLATES: dict[str, dict[str, object]] = {
    'HSPAN': {'model': 'HSPAN', 'n_resgroups': 10, 'n_resblocks': 4, 'n_feats': 192, 'reduction': 2, 'topk': 128,
              'res_scale': 0.1, 'rgb_range': 1, 'chop': True},
    'MSNLAN': {'model': 'MSNLAN', 'n_resgroups': 8, 'n_resblocks': 9, 'n_feats': 64, 'res_scale': 0.1, 'lr': 2e-4,
               'chop': True},
    'EDSR_PAPER': {'model': 'EDSR', 'n_resblocks': 32, 'n_feats': 256, 'res_scale': 0.1},
    'EDSR': {'model': 'EDSR', 'n_resblocks': 16, 'n_feats': 64, 'res_scale': 1},
    # The comparison networks of the paper tables, as their authors' code and test commands set them.
    # RCAN, HAN, SAN: published template + option.py defaults (reduction, rgb_range); their blocks ignore --res_scale.
    'RCAN': {'model': 'RCAN', 'n_resgroups': 10, 'n_resblocks': 20, 'n_feats': 64, 'reduction': 16, 'rgb_range': 255,
             'chop': True},
    'HAN': {'model': 'HAN', 'n_resgroups': 10, 'n_resblocks': 20, 'n_feats': 64, 'reduction': 16, 'rgb_range': 255,
            'chop': True},
    'SAN': {'model': 'SAN', 'n_resgroups': 20, 'n_resblocks': 10, 'n_feats': 64, 'reduction': 16, 'rgb_range': 255,
            'chop': True},
    # RDN, DDBPN, MDSR: laoyangui/HSPAN evaluates them on whole images (its templates set no --chop); MDSR's
    # released weights are built with --scale 2+3+4 and 80 residual blocks.
    'RDN': {'model': 'RDN', 'G0': 64, 'RDNkSize': 3, 'RDNconfig': 'B', 'rgb_range': 255},
    'DDBPN': {'model': 'DDBPN', 'scale': '4', 'rgb_range': 255},
    'MDSR': {'model': 'MDSR', 'scale': '2+3+4', 'n_resblocks': 80, 'n_feats': 64, 'rgb_range': 255},
    'NLSN': {'model': 'NLSN', 'n_resblocks': 32, 'n_feats': 256, 'res_scale': 0.1, 'chunk_size': 144, 'n_hashes': 4,
             'rgb_range': 1, 'chop': True},
    'CSNLN': {'model': 'CSNLN', 'n_feats': 128, 'depth': 12, 'rgb_range': 1, 'chop': True},
    'PAEDSR': {'model': 'PAEDSR', 'n_resblocks': 32, 'n_feats': 256, 'res_scale': 0.1, 'rgb_range': 1, 'chop': True},
}


def template_values(name: str) -> dict[str, object]:
    """The preset named `name` exactly (case-insensitive; a network's other name, MSDSN, names its preset),
    or {}."""
    from nlsr.model.registry import ALIASES  # the networks' other names (--template MSDSN = MSNLAN)

    key = str(name).upper()
    key = ALIASES.get(key.lower(), key.lower()).upper()
    return dict(TEMPLATES.get(key, {}))


def known_names() -> list[str]:
    """The preset names --template accepts: TEMPLATES, then the networks' other names (e.g. MSDSN)."""
    from nlsr.model.registry import ALIASES

    return [*TEMPLATES, *(alias.upper() for alias, target in ALIASES.items() if target.upper() in TEMPLATES)]


def preset(name: str, given: Collection[str] = ()) -> dict[str, object]:
    """The values the preset `name` gives, less the flags in `given` (written on the command line)."""
    return {flag: value for flag, value in template_values(name).items() if flag not in given}
