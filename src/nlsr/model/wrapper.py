"""The Model wrapper (EDSR shape): the network(s) of --model on their device, checkpoint I/O, test-time forwards.

With several --scale values and a single-scale network, one network per scale is built. Evaluation forwards
run --tile or --chop (each model's published forward_chop) inside --self_ensemble, at --precision; with
--channels_last, weights and network inputs are in channels-last order. Under
torchrun, training forwards go through DistributedDataParallel (distributed.wrap_ddp), which averages
gradients in backward; evaluation forwards use the plain network, so processes evaluating different images
never wait on each other. With --compile both run the torch.compile'd network (HSPA's kernels inside its
graph as registered operators); the wrapper's state dict, and so every file it saves or loads, keeps the
plain network's keys.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nlsr import distributed
from nlsr.errors import UserError
from nlsr.model import tiling
from nlsr.model.checkpoint import (
    CHECKPOINT_SUFFIXES,
    Configured,
    check_state_fits,
    fit_into,
    load_into,
    plain_state_dict,
    write_checkpoint,
)
from nlsr.model.contract import ChopRule, SRNetwork
from nlsr.model.hspa import HSPA, PlanLog
from nlsr.model.registry import check_model_flags, make_network, resolve_model_name


class Model(nn.Module):
    """The network named by --model, on its device, with checkpoint I/O and test-time forwards.

    With several --scale values and a single-scale network, one network per scale is built and
    `forward(lr, idx_scale)` uses the one for that scale; `.model` is the network of the current scale.
    """

    def __init__(self, args: argparse.Namespace, log: Callable[[str], Any] = print,
                 configured: Configured | None = None) -> None:
        super().__init__()
        self.log = log
        self.plan_log = PlanLog(log)
        if configured is None:  # built outside main (tests, tools): --pre_train is read here
            check_model_flags(args)
            configured = Configured()
        self.name = resolve_model_name(args.model)
        pre_train = str(args.pre_train)
        self.scales = list(args.scale)
        self.idx_scale = 0
        self.self_ensemble, self.chop = args.self_ensemble, args.chop
        self.seed = args.seed  # the evaluation draws of random_draws networks when no seed is given
        self.tile, self.tile_overlap = args.tile, args.tile_overlap
        self.save_models, self.save_format = args.save_models, args.save_format
        self.device = distributed.choose_device(args, log)
        first = make_network(args)
        nets = [first]
        if not first.multi_scale:  # single-scale networks: one per scale (its own upsampler and weights)
            for s in self.scales[1:]:
                nets.append(make_network(argparse.Namespace(**{**vars(args), 'scale': [s]})))
        self.nets = nn.ModuleList(nets)
        for i, net in enumerate(self.nets):
            self._log_network(net, self.scales[i] if len(self.nets) > 1 else None)

        self._load_pre_train(pre_train, configured)
        self.nets.to(self.device)
        # --channels_last: weights and every network input in NHWC order (oneDNN's fast convolutions).
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        if args.channels_last:
            self.nets.to(memory_format=torch.channels_last)

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

        self.n_parallel = distributed.data_parallel_gpus(args, self.device)
        # Plain lists: DataParallel, DDP and compiled modules must not re-register the networks' weights.
        self._runners: list[nn.Module] = [torch.compile(n) for n in self.nets] if args.compile else list(self.nets)
        if self.n_parallel > 1:
            if args.compile:
                raise UserError(f'--compile with --n_GPUs {args.n_GPUs}: use torchrun for several GPUs')
            self._runners = [distributed.DataParallel(net, device_ids=list(range(self.n_parallel)))
                             for net in self.nets]
        # Training forwards: DDP under torchrun (the plain list keeps 'module.' out of the wrapper's state dict).
        self._train_runners: list[nn.Module] = self._runners
        if not args.test_only and any(p.requires_grad for p in self.nets.parameters()):
            self._train_runners = [distributed.wrap_ddp(net, self.device) for net in self._runners]

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Training backwards inside the block average gradients across torchrun processes only when
        `enabled` (DDP's no_sync otherwise: the micro-batches of --accumulate before the last one)."""
        stack = contextlib.ExitStack()
        if not enabled:
            for runner in self._train_runners:
                if isinstance(runner, nn.parallel.DistributedDataParallel):
                    stack.enter_context(runner.no_sync())
        return stack

    # ---- set-up helpers

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

    def _load_pre_train(self, pre_train: str, configured: Configured) -> None:
        if pre_train in ('', '.'):
            return
        if len(self.nets) > 1 and '{scale}' not in pre_train:
            raise UserError(f'--pre_train {pre_train}: one checkpoint cannot serve --scale '
                            f'{"+".join(map(str, self.scales))}; put {{scale}} in the path (e.g. HSPAN_x{{scale}}.pt)')
        for i, net in enumerate(self.nets):
            path = self._scaled_path(pre_train, i)
            self.log(f'Loading model from {path}')
            state, config = configured.take(path)
            fit_into(net, state, config, f'--pre_train {path}')

    # ---- access

    def _index(self) -> int:
        return 0 if len(self.nets) == 1 else self.idx_scale

    @property
    def model(self) -> SRNetwork:
        """The plain (unwrapped) network of the current scale."""
        return self.nets[self._index()]

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

    def forward(self, lr: torch.Tensor, idx_scale: int | torch.Tensor = 0, seed: int | None = None) -> torch.Tensor:
        """Training mode: the plain network. Eval mode: --tile or --chop, inside --self_ensemble, at --precision;
        a network with random draws takes them from a generator seeded with `seed` (None: --seed), afresh
        for this call (model.contract)."""
        if isinstance(idx_scale, torch.Tensor):  # one value per batch
            idx_scale = int(idx_scale.reshape(-1)[0])
        self.idx_scale = int(idx_scale)
        self.model.set_scale(self.idx_scale)
        if self.training:
            return self._train_runners[self._index()](lr.contiguous(memory_format=self.memory_format))
        with self._draws(seed):
            if self.self_ensemble:
                return tiling.forward_x8(lr, self._forward_one)
            return self._forward_one(lr)

    def _draws(self, seed: int | None) -> contextlib.AbstractContextManager:
        """The current network's random draws from a generator seeded with `seed` (None: --seed)."""
        if not self.model.random_draws:
            return contextlib.nullcontext()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed if seed is None else seed)
        return self.model.drawing_from(generator)

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile:
            return tiling.tiled(x, self.scales[self.idx_scale], self.tile, self.tile_overlap, self._run)
        if self.chop:
            return self.forward_chop(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One network call at the evaluation precision; float32 out. A network with random draws runs on one
        device: DataParallel's replicas would draw from one generator in thread order."""
        runner = self.model if self.model.random_draws and self.n_parallel > 1 else self._runners[self._index()]
        x = x.contiguous(memory_format=self.memory_format)
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
        rule = replace(rule, shave=rule.shave if shave is None else shave,
                       min_size=rule.min_size if min_size is None else min_size)
        per_call = 1 if self.model.random_draws else self.n_parallel  # quarters in one order, whatever the GPUs
        return tiling.chop(x, self.scales[self.idx_scale], rule, self._run, per_call)

    def extra_repr(self) -> str:
        return f'name={self.name}, scales={self.scales}, device={self.device}'
