"""An exponential moving average (EMA) of the network's weights, as BasicSR's `ema_decay`.

After every optimizer step, each trainable weight's average moves towards it:
`ema = decay * ema + (1 - decay) * weight`; buffers and frozen weights are copied. Before optimizer step
--ema_start the average is the weights themselves. Evaluation and the model files use the average
(`applied`), the training continues from the raw weights; the training state keeps both.

Every process of a torchrun job holds the same raw weights after each step (DDP), so each computes the
same average locally: no communication.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from nlsr import distributed
from nlsr.errors import UserError


class WeightAverage:
    """The EMA of `module`'s floating-point state (its own state-dict names), on the module's device."""

    def __init__(self, module: nn.Module, decay: float, start: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f'--ema_decay {decay}: expected a number in (0, 1), or 0 for no averaging')
        self.module, self.decay, self.start = module, decay, start
        self._live = {k: v for k, v in module.state_dict(keep_vars=True).items() if v.is_floating_point()}
        self._averaged = {k for k, v in self._live.items() if isinstance(v, nn.Parameter) and v.requires_grad}
        self.weights = {k: v.detach().clone() for k, v in self._live.items()}

    def reset(self) -> None:
        """The average := the current weights."""
        with torch.no_grad():
            for k, v in self._live.items():
                self.weights[k].copy_(v)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (0-based, counted over the whole run)."""
        if step < self.start:
            self.reset()
            return
        for k, v in self._live.items():
            if k in self._averaged:
                self.weights[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.weights[k].copy_(v)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the average inside the block and its own weights again after it (exactly: the
        tensors are copied in place, so optimizers, DDP and compiled graphs keep their references)."""
        with torch.no_grad():
            raw = {k: v.detach().clone() for k, v in self._live.items()}
            for k, v in self._live.items():
                v.copy_(self.weights[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in self._live.items():
                    v.copy_(raw[k])

    def state_dict(self) -> dict:
        """{'decay', 'start', 'weights'} on the CPU, for the training state."""
        return {'decay': self.decay, 'start': self.start,
                'weights': {k: v.detach().cpu().clone() for k, v in self.weights.items()}}

    def load_weights(self, weights: Mapping[str, torch.Tensor], source: str) -> None:
        """Restore the average from state_dict()['weights'] (the same keys) read from `source`."""
        if set(weights) != set(self.weights):
            missing, extra = sorted(set(self.weights) - set(weights)), sorted(set(weights) - set(self.weights))
            raise UserError(f'{source}: the stored EMA does not fit the network (missing {missing[:3]}, '
                            f'unexpected {extra[:3]})')
        with torch.no_grad():
            for k, v in weights.items():
                self.weights[k].copy_(v)


def average_from_flags(args: argparse.Namespace, module: nn.Module, log: Callable[[str], Any]) -> WeightAverage | None:
    """The --ema_decay average of a training run's weights (None without it), announced in the log."""
    if not args.ema_decay > 0 or args.test_only:
        return None
    start = f' from optimizer step {args.ema_start}' if args.ema_start else ''
    log(f'EMA of the weights: decay {args.ema_decay:g}{start}; evaluation and the model files use the average')
    return WeightAverage(module, args.ema_decay, args.ema_start)


def restore_average(average: WeightAverage | None, stored: dict, source: str) -> dict:
    """Load a training state's average (`stored`, its 'ema' entry) into `average` when both exist; the entry
    without its tensors, to broadcast (share_average sends them)."""
    if average is not None and stored:
        average.load_weights(stored['weights'], source)
    return {k: v for k, v in stored.items() if k != 'weights'}


def share_average(average: WeightAverage | None, stored: bool) -> None:
    """On resume, every process: rank 0's average (it read the stored one) when `stored`, else the resumed
    weights."""
    if average is None:
        return
    if stored:
        distributed.broadcast_tensors([average.weights[k] for k in sorted(average.weights)])
    else:
        average.reset()


def weights_in_use(average: WeightAverage | None) -> contextlib.AbstractContextManager:
    """The weights evaluation and the model files use: the average when there is one."""
    return average.applied() if average is not None else contextlib.nullcontext()
