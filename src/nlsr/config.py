"""The run's configuration: frozen once built, and the steps option.build takes after reading the command line.

    option.build(argv): the command line -> the --template preset (template.preset) -> normalised values
    (normalised) -> option.validate -> the --pre_train checkpoint's configuration (with_checkpoint) -> Config

runs.experiment.Experiment then decides what the run resumes from (Experiment.resume_point) without changing
it. No layer below main sets an attribute of a Config (tests/test_structure.py checks it); `replace` makes a
changed copy. This module does not import the parser: option passes in what it knows of each flag.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nlsr.errors import UserError

if TYPE_CHECKING:
    from nlsr.model.checkpoint import Configured


class Config(argparse.Namespace):
    """A run's configuration, frozen once built (option.build/parse): the layers below main read it and never
    set it; `config.replace(flag=value)` is a changed copy (for tests and tools that vary one setting)."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f'the configuration is built once and frozen: cannot set {name!r} '
                             f'(make a changed copy with .replace({name}=...))')

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f'the configuration is built once and frozen: cannot delete {name!r}')

    def replace(self, **changes: object) -> Config:
        return Config(**{**vars(self), **changes})


def _int_list(text: str, sep: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(sep) if v != '']
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers separated by '{sep}'") from None
    if not values:
        raise UserError(f'{flag} {text!r}: expected at least one integer')
    return values


def normalised(args: argparse.Namespace) -> dict[str, object]:
    """The parsed values in the form the layers read: lists of scales and of dataset names, the decay
    milestones, --epochs 0 as no limit, --betas as a tuple."""
    scale = _int_list(args.scale, '+', '--scale')
    if any(s < 1 for s in scale):
        raise UserError(f'--scale {scale}: scales must be positive integers')
    data_test = [d for d in str(args.data_test).split('+') if d]
    if not data_test:
        raise UserError('--data_test: expected at least one dataset name')
    return {'scale': scale, 'data_train': [d for d in str(args.data_train).split('+') if d], 'data_test': data_test,
            'decay_milestones': _int_list(args.decay, '-', '--decay') if str(args.decay).strip() else [],
            'epochs': int(1e8) if args.epochs == 0 else args.epochs, 'betas': tuple(args.betas)}


def with_checkpoint(config: Config, flag_type: Callable[[str], type | None], at_least: Mapping[str, int],
                    check_model_flags: bool = True) -> tuple[Config, Configured]:
    """`config` completed from the --pre_train checkpoint's configuration (model.checkpoint.checkpoint_flags:
    the command line wins, a contradiction is refused), and the file as read, for model.Model (so it is read
    once); with check_model_flags, model flags --model does not read are refused. `flag_type` and `at_least`
    say which values a flag takes. Errors are decided alike by every process (reported once under torchrun)."""
    from nlsr import distributed
    from nlsr.model.checkpoint import Configured, checkpoint_flags, read_checkpoint
    from nlsr.model.registry import check_model_flags as check

    def accepts(flag: str, value: object, current: object) -> bool:
        kind = flag_type(flag)
        if flag == 'scale':  # one int, or the list of a multi-scale network
            values = value if isinstance(value, list) and value else [value]
            return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        if isinstance(current, bool):
            return isinstance(value, bool)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool) and value >= at_least.get(flag, value)
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return isinstance(value, str)  # strings, and flags whose default is None (--attention)

    out = Configured()
    pre_train = str(config.pre_train)
    try:
        if pre_train not in ('', '.'):
            path = pre_train.replace('{scale}', str(config.scale[0]))
            out.files[path] = read_checkpoint(path)
            changes, out.adopted = checkpoint_flags(config, out.files[path][1] or {}, f'--pre_train {pre_train}',
                                                    accepts)
            config = config.replace(**changes)
        if check_model_flags:
            check(config)
    except UserError as e:
        raise distributed.RankZeroError(str(e)) from None
    return config, out
