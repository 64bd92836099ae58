"""The network of a model file, rebuilt from its configuration: what the export and upscale commands load.

A model file written by this project carries its architecture (model.checkpoint); a published checkpoint
needs main.py's architecture flags beside it (`--model HSPAN --n_feats 192 ...` or `--template HSPAN`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nlsr import model, option
from nlsr.errors import UserError
from nlsr.model.checkpoint import load_into, read_checkpoint
from nlsr.model.contract import SRNetwork


def model_args(pre_train: str, flags: Sequence[str] = (), device_flags: Sequence[str] = ()) -> argparse.Namespace:
    """main.py's arguments for evaluating `pre_train` ('' for the parameter-free Bicubic), completed from the
    file's configuration; `flags` are architecture flags (for published checkpoints)."""
    argv = [*flags, *device_flags, '--test_only', '--n_threads', '0']
    if pre_train:
        argv += ['--pre_train', pre_train]
    args = option.build(argv)[0]  # completed from the file's configuration
    if not pre_train and model.resolve_model_name(args.model) != 'bicubic':
        raise UserError(f'--model {args.model} needs --pre_train MODEL (its weights)')
    return args


def require_configuration(pre_train: str) -> None:
    """Refuse a model file without a stored configuration (a published bare state dict)."""
    if read_checkpoint(pre_train)[1] is None:
        raise UserError(f'--pre_train {pre_train}: the file stores weights only (a published checkpoint); this '
                        'command needs a model file written by this project (main.py --save_models), or use '
                        'nlsr-export, which takes the architecture flags')


def load_network(args: argparse.Namespace) -> SRNetwork:
    """The plain network of args.model with the weights of args.pre_train, in eval mode on the CPU."""
    net = model.make_network(args)
    pre_train = str(args.pre_train)
    if pre_train not in ('', '.'):
        load_into(net, pre_train)
    return net.eval()


def configuration(args: argparse.Namespace, net: SRNetwork) -> dict[str, object]:
    """The network's configuration as a model file stores it: model name first, then its flags."""
    config = {'model': model.resolve_model_name(args.model), **net.config}
    config.setdefault('scale', args.scale[0])
    config.setdefault('rgb_range', args.rgb_range)
    config.setdefault('n_colors', args.n_colors)
    return config
