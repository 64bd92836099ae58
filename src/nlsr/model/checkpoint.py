"""Model files: reading (bare or wrapped state dicts, .pt or .safetensors), strict fitting, writing, and the
flag values a --pre_train file's configuration states (checkpoint_flags: option.build applies them).

The model files this project writes carry the network's configuration (contract.SRNetwork.config plus the
model name): in a .pt file as {'config': {...}, 'state_dict': {...}}, in a .safetensors file as the
metadata entry 'sr_config' (JSON). Published checkpoints are bare state dicts and load as before; with
config=None, write_checkpoint writes that bare layout too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nlsr.errors import UserError
from nlsr.fileio import atomic_write, atomic_write_bytes
from nlsr.model.contract import HOW_FLAGS, SRNetwork
from nlsr.model.registry import resolve_model_name

# Checkpoint containers: a state dict is looked for under these keys, in this order.
WRAPPER_KEYS = ('params_ema', 'params', 'state_dict', 'model')
# Model files this project reads and writes, in the order they are looked for.
CHECKPOINT_SUFFIXES = ('.pt', '.safetensors')
SAFETENSORS_CONFIG = 'sr_config'


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint object: bare, or under one of WRAPPER_KEYS (nested wrappers are
    unwrapped too); 'module.' prefixes (DataParallel/DDP) are stripped."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = {}
            for key, value in obj.items():
                key = str(key)
                while key.startswith('module.'):
                    key = key[len('module.'):]
                state[key] = value
            return state
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    raise UserError(f'{source}: no state dict found (expected a dict of tensors, bare or under one of '
                    f'{", ".join(repr(k) for k in WRAPPER_KEYS)})')


def read_checkpoint(path: str | Path, flag: str = '--pre_train') -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict on the CPU, configuration or None) of a .pt (weights_only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{flag} {path}: no such file')
    config = None
    try:
        if path.suffix == '.safetensors':
            from safetensors import safe_open

            with safe_open(str(path), framework='pt', device='cpu') as f:
                meta = f.metadata() or {}
                obj = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            config = json.loads(meta[SAFETENSORS_CONFIG]) if SAFETENSORS_CONFIG in meta else None
        else:
            obj = torch.load(path, map_location='cpu', weights_only=True)
            if isinstance(obj, Mapping) and isinstance(obj.get('config'), Mapping):
                config = dict(obj['config'])
    except Exception as e:  # unpickling errors come in many types; the user needs the first line only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{flag} {path}: cannot read it as a weights file ({first})') from e
    return unwrap_state_dict(obj, f'{flag} {path}'), config


def read_state_dict(path: str | Path, flag: str = '--pre_train') -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file, on the CPU."""
    return read_checkpoint(path, flag)[0]


def write_checkpoint(path: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, object] | None) -> None:
    """Write a model file atomically: .safetensors (config in its metadata) or .pt (config beside the state
    dict; a bare state dict, the published layout, when config is None)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == '.safetensors':
        from safetensors.torch import save

        meta = {SAFETENSORS_CONFIG: json.dumps(dict(config))} if config is not None else None
        atomic_write_bytes(path, save(tensors, metadata=meta))
    else:
        obj = tensors if config is None else {'config': dict(config), 'state_dict': tensors}
        atomic_write(path, lambda f: torch.save(obj, f))


def _few(items: list[str], limit: int = 6) -> str:
    shown = ', '.join(items[:limit])
    return shown + (f', ... (+{len(items) - limit} more)' if len(items) > limit else '')


def likely_cause(net: nn.Module, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """Best guess at why `state` does not fit `net`, from the configuration each set of keys implies
    (SRNetwork.infer_config), else from how many keys the two share."""
    if isinstance(net, SRNetwork):
        try:
            mine, theirs = net.infer_config(own), net.infer_config(state)
        except Exception:  # a foreign layout can break the inference; fall back to the generic hints
            mine, theirs = {}, {}
        if mine and not theirs:
            return f'the checkpoint is not laid out like {type(net).__name__}: a checkpoint of a different --model?'
        diffs = [f'--{k} {theirs[k]} (built with {mine[k]})' for k in mine
                 if theirs.get(k) not in (None, 0, '') and theirs[k] != mine[k]]
        if diffs:
            return 'the checkpoint looks like ' + ', '.join(diffs)
    common_keys = len(set(own) & set(state))
    if common_keys < 0.5 * min(len(own), len(state)):
        return (f'only {common_keys} of {len(state)} checkpoint keys exist in {type(net).__name__}: '
                'a checkpoint of a different --model?')
    return 'a different configuration (--scale, --n_feats, --n_resgroups, --n_resblocks, --reduction, ...)'


def published_entries_dropped(net: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the published checkpoints' entries that `net` names as unused (SRNetwork.unused_keys)."""
    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    unused = net.unused_keys() if isinstance(net, SRNetwork) else frozenset()
    return {k: v for k, v in state.items() if k not in unused}


def check_state_fits(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one UserError naming missing, unexpected and shape-mismatched keys when `state` does not fit
    (the published entries the network names as unused aside)."""
    own = net.state_dict()
    state = published_entries_dropped(net, state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k} checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}'
                  for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        return
    parts = [f'{source} does not fit {type(net).__name__}']
    if missing:
        parts.append(f'{len(missing)} missing keys: {_few(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys: {_few(unexpected)}')
    if mismatched:
        parts.append(f'{len(mismatched)} shape mismatches: {_few(mismatched)}')
    parts.append(f'likely cause: {likely_cause(net, own, state)}')
    raise UserError('; '.join(parts))


def config_mismatches(config: Mapping[str, object], own: Mapping[str, object]) -> list[str]:
    """'--flag stored (here built with value)' for each flag both configurations state differently (flags
    that choose how a network computes, HOW_FLAGS, never differ in what it is)."""
    return [f'--{k} {config[k]} (built with {own[k]})' for k in own
            if k in config and k not in HOW_FLAGS and config[k] != own[k]]


def fit_into(net: nn.Module, state: Mapping[str, torch.Tensor], config: Mapping[str, object] | None,
             source: str) -> None:
    """Strictly load `state` (read from `source`) into `net`, refusing (UserError) before changing anything:
    keys and shapes must fit, values must be finite."""
    check_state_fits(net, state, source)
    state = published_entries_dropped(net, state)
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise UserError(f'{source}: values not finite (NaN or infinite) in {len(broken)} tensors: {_few(broken)}')
    diffs = config_mismatches(config or {}, net.config if isinstance(net, SRNetwork) else {})
    if diffs:
        raise UserError(f'{source}: the checkpoint was built with {", ".join(diffs)}')
    net.load_state_dict(state, strict=True)


def load_into(net: nn.Module, path: str | Path, flag: str = '--pre_train') -> None:
    """Strictly load the checkpoint at `path` into `net`, refusing (UserError) before changing anything."""
    state, config = read_checkpoint(path, flag)
    fit_into(net, state, config, f'{flag} {path}')


def checkpoint_flags(args: argparse.Namespace, config: Mapping[str, object], source: str,
                     accepts: Callable[[str, object, object], bool]) -> tuple[dict[str, object], list[str]]:
    """The flag values a checkpoint's configuration states where they differ from args, so `--pre_train X`
    rebuilds its network: (flag -> value, the same as '--n_feats 64' texts). args is not changed: the caller
    builds the configuration. A flag given on the command line (args.cli_flags) that contradicts the file is
    refused, naming both values, except a flag of HOW_FLAGS (how the network computes: the command line
    wins); an entry the flag cannot take (`accepts(flag, value, current)` is False) is refused. With several
    --scale values the scale of a single-scale network's checkpoint is left to the per-scale files (a
    multi-scale network's list of scales is adopted or checked like any flag)."""
    changes: dict[str, object] = {}
    adopted = []
    for key, value in config.items():
        if key not in vars(args) or (key == 'scale' and len(args.scale) > 1 and not isinstance(value, list)):
            continue
        if key in HOW_FLAGS and key in args.cli_flags:
            continue
        if not accepts(key, value, getattr(args, key)):
            raise UserError(f'{source}: its configuration entry {key!r} = {value!r} is not a value --{key} can take')
        if key == 'model':
            given, current = args.model, resolve_model_name(args.model)
            value = resolve_model_name(str(value))
        elif key == 'scale':
            given, current = '+'.join(map(str, args.scale)), args.scale
            value = list(value) if isinstance(value, list) else [int(value)]  # a list: a multi-scale network
        else:
            given = current = getattr(args, key, None)
        if current == value:
            continue
        if key in args.cli_flags:
            shown = '+'.join(map(str, value)) if key == 'scale' else value
            raise UserError(f'--{key} {given} contradicts {source}, which was saved with --{key} {shown}')
        changes[key] = value
        adopted.append(f'--{key} {"+".join(map(str, value)) if key == "scale" else value}')
    return changes, adopted


def configuration_note(adopted: list[str]) -> str:
    return f"From the checkpoint's configuration: {' '.join(adopted)}"


@dataclass
class Configured:
    """What option.build read from --pre_train: the flags its configuration set, and the file, kept until the
    wrapper takes it (path -> (state dict, configuration)), so the file is read once."""

    adopted: list[str] = field(default_factory=list)
    files: dict[str, tuple[dict[str, torch.Tensor], dict | None]] = field(default_factory=dict)

    def take(self, path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
        """The checkpoint at `path`: the one read while building the configuration (handed over once), else
        read now."""
        return self.files.pop(path, None) or read_checkpoint(path)


def plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict on the CPU, without 'module.' prefixes, in contiguous order (the same file
    with or without --channels_last)."""
    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
