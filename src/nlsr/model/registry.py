"""The networks `--model` can name: an explicit table, imported on demand (a network whose optional
dependencies are missing here is refused only when asked for).

A network module (model/networks/<name>.py) follows model/contract.py; adding one is one line in NETWORKS.
"""

from __future__ import annotations

import argparse
from importlib import import_module
from types import ModuleType

from nlsr.errors import UserError
from nlsr.model.contract import MODEL_FLAGS, SRNetwork

# --model name (lower case) -> module defining make_model(args) and FLAGS.
NETWORKS = {
    'bicubic': 'nlsr.model.networks.bicubic',
    'edsr': 'nlsr.model.networks.edsr',
    'hspan': 'nlsr.model.networks.hspan',
    'msnlan': 'nlsr.model.networks.msnlan',
    # the comparison networks of the paper tables
    'rcan': 'nlsr.model.networks.rcan',
    'han': 'nlsr.model.networks.han',
    'san': 'nlsr.model.networks.san',
    'rdn': 'nlsr.model.networks.rdn',
    'ddbpn': 'nlsr.model.networks.ddbpn',
    'mdsr': 'nlsr.model.networks.mdsr',
    'nlsn': 'nlsr.model.networks.nlsn',
    'csnln': 'nlsr.model.networks.csnln',
    'paedsr': 'nlsr.model.networks.paedsr',
}
# Other names of a network (the MSNLAN code was published as MSDSN); --template applies them too.
ALIASES = {'msdsn': 'msnlan'}


def registered_models() -> list[str]:
    """The --model names, in alphabetical order (aliases not included)."""
    return sorted(NETWORKS)


def resolve_model_name(name: str) -> str:
    """The NETWORKS key for --model `name` (case-insensitive, aliases applied); UserError listing the choices."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in NETWORKS:
        aliases = [f'{a} (= {t})' for a, t in sorted(ALIASES.items())]
        raise UserError(f'--model {name}: unknown model; registered: {", ".join(registered_models() + aliases)}')
    return key


def model_module(args: argparse.Namespace) -> ModuleType:
    """The module of --model; UserError when it cannot be imported here (a missing optional dependency)."""
    key = resolve_model_name(args.model)
    try:
        return import_module(NETWORKS[key])
    except ImportError as e:
        raise UserError(f'--model {args.model}: {NETWORKS[key]} cannot be imported here ({e})') from None


def make_network(args: argparse.Namespace) -> SRNetwork:
    """The plain network named by args.model, built by its module's make_model(args); a value it cannot use
    (ValueError) becomes a UserError."""
    module = model_module(args)
    try:
        net = module.make_model(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not isinstance(net, SRNetwork):
        raise TypeError(f'{module.__name__}.make_model must return a model.contract.SRNetwork')
    return net


def check_model_flags(args: argparse.Namespace) -> None:
    """Refuse a model flag given on the command line that --model does not read."""
    module = model_module(args)
    ignored = [f for f in MODEL_FLAGS if f in args.cli_flags and f not in module.FLAGS]
    if ignored:
        raise UserError(f'--{ignored[0]} is not used by --model {args.model} (it reads: '
                        f'{", ".join("--" + f for f in module.FLAGS) or "no model flags"})')
