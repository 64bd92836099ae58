"""Model registry and the `Model` wrapper (EDSR shape): build, place, load, save, test-time forwards.

A model is one module `src/model/<name>.py` following model/contract.py; `--model` picks it
case-insensitively (alias MSDSN -> msnlan). The wrapper owns the device, DataParallel, strict checkpoint
loading (a checkpoint's configuration rebuilds the network it was saved from), atomic saving, and the
evaluation-time forwards: --chop (each model's published forward_chop), --tile, --self_ensemble and
--precision half.

Under torchrun (an initialised process group of several processes) each process drives cuda:LOCAL_RANK (or
the CPU) and training forwards go through DistributedDataParallel, which averages gradients across processes
in backward; evaluation forwards use the plain network, so processes evaluating different images never wait
on each other.
"""

from __future__ import annotations

import argparse
import os
import pkgutil
from collections.abc import Callable, Mapping
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from errors import UserError
from model import tiling
from model.checkpoint import (
    CHECKPOINT_SUFFIXES,
    WRAPPER_KEYS,
    check_state_fits,
    load_into,
    plain_state_dict,
    read_checkpoint,
    read_state_dict,
    unwrap_state_dict,
    write_checkpoint,
)
from model.contract import MODEL_FLAGS, ChopRule, SRNetwork
from model.hspa import HSPA, PlanLog
from model.tiling import tile_starts, tile_weights

ALIASES = {'msdsn': 'msnlan'}


def _distributed() -> bool:
    """True inside a torchrun job of more than one process (process group initialised)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- registry

def _module_names() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith('_'))


def registered_models() -> list[str]:
    """Names of the modules of this package that define make_model, found by importing them (a module
    whose optional dependencies are missing here, e.g. a Triton kernel, is left out)."""
    names = []
    for name in _module_names():
        try:
            module = import_module(f'model.{name}')
        except ImportError:
            continue
        if hasattr(module, 'make_model'):
            names.append(name)
    return names


def resolve_model_name(name: str) -> str:
    """Module name for --model `name` (case-insensitive, aliases applied); UserError listing the choices."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    names = registered_models()
    if key not in names:
        if key in _module_names():
            try:
                import_module(f'model.{key}')
            except ImportError as e:
                raise UserError(f'--model {name}: model/{key}.py cannot be imported here ({e})') from None
        aliases = [f'{a} (= {t})' for a, t in sorted(ALIASES.items()) if t in names]
        raise UserError(f'--model {name}: unknown model; registered: {", ".join(names + aliases)}')
    return key


def model_module(args: argparse.Namespace) -> ModuleType:
    return import_module(f'model.{resolve_model_name(args.model)}')


def make_network(args: argparse.Namespace) -> SRNetwork:
    """The plain network named by args.model, built by its module's make_model(args); a value it cannot use
    (ValueError) becomes a UserError."""
    module = model_module(args)
    try:
        net = module.make_model(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not isinstance(net, SRNetwork):
        raise TypeError(f'model.{module.__name__}.make_model must return a model.contract.SRNetwork')
    return net


def check_model_flags(args: argparse.Namespace) -> None:
    """Refuse a model flag given on the command line that --model does not read."""
    module = model_module(args)
    ignored = [f for f in MODEL_FLAGS if f in args.cli_flags and f not in module.FLAGS]
    if ignored:
        raise UserError(f'--{ignored[0]} is not used by --model {args.model} (it reads: '
                        f'{", ".join("--" + f for f in module.FLAGS) or "no model flags"})')


def adopt_checkpoint_config(args: argparse.Namespace, config: Mapping[str, object], source: str) -> list[str]:
    """Set the flags a checkpoint's configuration states, so `--pre_train X` rebuilds its network; a flag
    given on the command line that contradicts it is refused, naming both values. Returns the flags set
    ('--n_feats 64', ...). With several --scale values the checkpoint's scale is left to the per-scale files."""
    adopted = []
    for key, value in config.items():
        if key not in vars(args) or (key == 'scale' and len(args.scale) > 1):
            continue
        if key == 'model':
            given, current = args.model, resolve_model_name(args.model)
            value = resolve_model_name(str(value))
        elif key == 'scale':
            given, current = '+'.join(map(str, args.scale)), args.scale
            value = [int(value)]
        else:
            given = current = getattr(args, key, None)
        if current == value:
            continue
        if key in args.cli_flags:
            shown = '+'.join(map(str, value)) if key == 'scale' else value
            raise UserError(f'--{key} {given} contradicts {source}, which was saved with --{key} {shown}')
        setattr(args, key, value)
        adopted.append(f'--{key} {"+".join(map(str, value)) if key == "scale" else value}')
    return adopted


def configuration_note(adopted: list[str]) -> str:
    return f"From the checkpoint's configuration: {' '.join(adopted)}"


def configure(args: argparse.Namespace) -> list[str]:
    """Complete args from the --pre_train checkpoint's configuration and refuse model flags --model does not
    read; returns the flags the checkpoint set. Called before anything is written (main), and again,
    then setting nothing, by Model."""
    adopted = []
    pre_train = str(args.pre_train)
    if pre_train not in ('', '.'):
        config = read_checkpoint(pre_train.replace('{scale}', str(args.scale[0])))[1]
        adopted = adopt_checkpoint_config(args, config or {}, f'--pre_train {pre_train}')
    check_model_flags(args)
    return adopted


# ---------------------------------------------------------------- the wrapper

class Model(nn.Module):
    """The network named by --model, on its device, with checkpoint I/O and test-time forwards.

    With several --scale values and a single-scale network, one network per scale is built and
    `forward(lr, idx_scale)` uses the one for that scale; `.model` is the network of the current scale.
    """

    def __init__(self, args: argparse.Namespace, log: Callable[[str], Any] = print) -> None:
        super().__init__()
        self.log = log
        self.plan_log = PlanLog(log)
        adopted = configure(args)
        if adopted:
            log(configuration_note(adopted))
        self.name = resolve_model_name(args.model)
        pre_train = str(args.pre_train)
        self.scales = list(args.scale)
        self.idx_scale = 0
        self.self_ensemble, self.chop = args.self_ensemble, args.chop
        self.tile, self.tile_overlap = args.tile, args.tile_overlap
        self.save_models, self.save_format = args.save_models, args.save_format
        self.device = self._choose_device(args, log)
        first = make_network(args)
        nets = [first]
        if not first.multi_scale:  # single-scale networks: one per scale (its own upsampler and weights)
            for s in self.scales[1:]:
                nets.append(make_network(argparse.Namespace(**{**vars(args), 'scale': [s]})))
        self.nets = nn.ModuleList(nets)
        for i, net in enumerate(self.nets):
            self._log_network(net, self.scales[i] if len(self.nets) > 1 else None)

        self._load_pre_train(pre_train)
        self.nets.to(self.device)

        # --precision half: CUDA only. Evaluation-only runs convert the weights (published behaviour, half
        # the memory); training runs keep float32 weights and evaluate under float16 autocast. --precision bf16:
        # evaluation under bfloat16 autocast on any device (HSPA computes its scores in float32 inside).
        want_half = args.precision == 'half'
        self.half_weights = want_half and self.device.type == 'cuda' and args.test_only
        self.eval_autocast: torch.dtype | None = None
        if args.precision == 'bf16':
            self.eval_autocast = torch.bfloat16
        elif want_half and self.device.type == 'cuda' and not self.half_weights:
            self.eval_autocast = torch.float16
        if want_half and self.device.type != 'cuda':
            log('--precision half needs CUDA: evaluating in float32 on the CPU')
        if self.half_weights:
            self.nets.half()

        self.n_parallel = 1
        self._runners: list[nn.Module] = list(self.nets)  # plain list: DataParallel must not re-register
        if self.device.type == 'cuda' and args.n_GPUs > 1:
            if args.n_GPUs > torch.cuda.device_count():
                raise UserError(f'--n_GPUs {args.n_GPUs}: only {torch.cuda.device_count()} CUDA devices are visible')
            self.n_parallel = args.n_GPUs
            self._runners = [nn.DataParallel(net, device_ids=list(range(args.n_GPUs))) for net in self.nets]
        # Training forwards: DDP under torchrun. Its construction broadcasts rank 0's weights, so every process
        # starts equal; the plain list keeps 'module.' out of the wrapper's state dict.
        self._train_runners: list[nn.Module] = self._runners
        trainable = any(p.requires_grad for p in self.nets.parameters())
        if _distributed() and trainable and not args.test_only:
            if self.n_parallel > 1:
                raise UserError(f'--n_GPUs {args.n_GPUs} cannot be combined with torchrun: drop --n_GPUs')
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self._train_runners = [nn.parallel.DistributedDataParallel(net, device_ids=ids) for net in self.nets]

    # ---- set-up helpers

    @staticmethod
    def _choose_device(args: argparse.Namespace, log: Callable[[str], Any]) -> torch.device:
        if args.cpu:
            return torch.device('cpu')
        if not torch.cuda.is_available():
            log('CUDA is not available: running on the CPU')
            return torch.device('cpu')
        if _distributed():
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))  # one GPU per torchrun process
        return torch.device('cuda')

    def _log_network(self, net: SRNetwork, scale: int | None) -> None:
        n_params = sum(p.numel() for p in net.parameters())
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        cfg = ' '.join(f'{k}={v}' for k, v in net.config.items())
        at = f' x{scale}' if scale is not None else ''
        at += f' ({cfg})' if cfg else ''
        self.log(f'Model {type(net).__name__}{at}: {n_params:,} parameters '
                 f'({n_train:,} trainable), device {self.device}')
        for m in net.modules():
            if isinstance(m, HSPA):
                m.plan_log = self.plan_log  # the network's HSPA plans, each said once in the run's log

    def _scaled_path(self, path: str, index: int) -> str:
        """Checkpoint path of network `index`: '{scale}' replaced; with several networks and no
        placeholder, '_x<scale>' is inserted before the suffix."""
        scale = self.scales[index] if len(self.nets) > 1 else self.scales[0]
        if '{scale}' in path:
            return path.replace('{scale}', str(scale))
        if len(self.nets) == 1:
            return path
        p = Path(path)
        return str(p.with_name(f'{p.stem}_x{scale}{p.suffix}'))

    def _load_pre_train(self, pre_train: str) -> None:
        if pre_train in ('', '.'):
            return
        if len(self.nets) > 1 and '{scale}' not in pre_train:
            raise UserError(f'--pre_train {pre_train}: one checkpoint cannot serve --scale '
                            f'{"+".join(map(str, self.scales))}; put {{scale}} in the path (e.g. HSPAN_x{{scale}}.pt)')
        for i, net in enumerate(self.nets):
            path = self._scaled_path(pre_train, i)
            self.log(f'Loading model from {path}')
            load_into(net, path)

    # ---- access

    def _index(self) -> int:
        return 0 if len(self.nets) == 1 else self.idx_scale

    @property
    def model(self) -> SRNetwork:
        """The plain (unwrapped) network of the current scale."""
        return self.nets[self._index()]

    def get_model(self) -> SRNetwork:
        return self.model

    # ---- checkpoints

    def checkpoint_path(self, folder: str | Path, stem: str) -> Path:
        """folder/model/<stem>.pt (or .safetensors when only that exists) of the first network."""
        base = Path(folder) / 'model'
        for suffix in CHECKPOINT_SUFFIXES:
            if Path(self._scaled_path(str(base / f'{stem}{suffix}'), 0)).is_file():
                return base / f'{stem}{suffix}'
        return base / f'{stem}{CHECKPOINT_SUFFIXES[0]}'

    def load_state(self, path: str | Path, flag: str = 'checkpoint') -> None:
        """Strictly load a checkpoint written by save() (per-scale files when there are several networks)."""
        for i in range(len(self.nets)):
            file = Path(self._scaled_path(str(path), i))
            if not file.is_file():
                have = sorted(p.name for p in file.parent.glob('model_*')) if file.parent.is_dir() else []
                raise UserError(f'{flag}: {file} does not exist (have: {", ".join(have) or "none"}; '
                                'per-epoch files need --save_models)')
        for i, net in enumerate(self.nets):
            load_into(net, self._scaled_path(str(path), i), flag=flag)

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strictly load this wrapper's own state dict (as in a training state); UserError naming the keys."""
        check_state_fits(self, state, source)
        self.load_state_dict(state, strict=True)

    def save(self, apath: str | Path, epoch: int, is_best: bool = False) -> None:
        """Write apath/model/model_latest (+ model_best, model_<epoch> with --save_models) in --save_format,
        each with the network's configuration, atomically. Several networks: model_latest_x<scale> etc."""
        names = ['model_latest']
        if is_best:
            names.append('model_best')
        if self.save_models:
            names.append(f'model_{epoch}')
        folder = Path(apath) / 'model'
        suffix = '.safetensors' if self.save_format == 'safetensors' else '.pt'
        for i, net in enumerate(self.nets):
            state = plain_state_dict(net)
            config = None if self.save_format == 'bare_pt' else {'model': self.name, **net.config}
            for name in names:
                write_checkpoint(self._scaled_path(str(folder / f'{name}{suffix}'), i), state, config)

    # ---- forwards

    def forward(self, lr: torch.Tensor, idx_scale: int | torch.Tensor = 0) -> torch.Tensor:
        """Training mode: the plain network. Eval mode: --tile or --chop, inside --self_ensemble, at --precision."""
        if isinstance(idx_scale, torch.Tensor):  # one value per batch
            idx_scale = int(idx_scale.reshape(-1)[0])
        self.idx_scale = int(idx_scale)
        self.model.set_scale(self.idx_scale)
        if self.training:
            return self._train_runners[self._index()](lr)
        if self.self_ensemble:
            return tiling.forward_x8(lr, self._forward_one)
        return self._forward_one(lr)

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile:
            return tiling.tiled(x, self.scales[self.idx_scale], self.tile, self.tile_overlap, self._run)
        if self.chop:
            return self.forward_chop(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One network call at the evaluation precision; float32 out."""
        runner = self._runners[self._index()]
        if self.half_weights:
            return runner(x.half()).float()
        if self.eval_autocast is not None:
            with torch.autocast(self.device.type, dtype=self.eval_autocast):
                return runner(x).float()
        return runner(x)

    def chop_rule(self) -> ChopRule:
        """The --chop rule of the current network at the current scale."""
        return self.model.chop_rule(self.scales[self.idx_scale])

    def forward_chop(self, x: torch.Tensor, shave: int | None = None, min_size: int | None = None) -> torch.Tensor:
        """The network's published forward_chop (tiling.chop), optionally with another shave or min_size."""
        rule = self.chop_rule()
        rule = ChopRule(rule.shave if shave is None else shave, rule.min_size if min_size is None else min_size,
                        rule.h_mult, rule.w_mult)
        return tiling.chop(x, self.scales[self.idx_scale], rule, self._run, self.n_parallel)

    forward_x8 = staticmethod(tiling.forward_x8)

    def extra_repr(self) -> str:
        return f'name={self.name}, scales={self.scales}, device={self.device}'


__all__ = ['ALIASES', 'CHECKPOINT_SUFFIXES', 'WRAPPER_KEYS', 'ChopRule', 'Model', 'SRNetwork', 'check_state_fits',
           'load_into', 'make_network', 'plain_state_dict', 'read_checkpoint', 'read_state_dict', 'registered_models',
           'resolve_model_name', 'tile_starts', 'tile_weights', 'unwrap_state_dict', 'write_checkpoint']
