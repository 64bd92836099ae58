"""Training loss: a weighted sum of terms written like '1*L1+0.1*MSE', with a per-term log per epoch.

Terms: L1, MSE, Charbonnier (a smooth L1, --charbonnier_eps), VGG22 / VGG54 (perceptual; need torchvision
and its ImageNet weights) and GAN (adversarial, with its own discriminator and optimizer). A weight may be
left out ('L1' = '1*L1').
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from errors import UserError

if TYPE_CHECKING:  # for annotations only: the experiment folder is passed in, never imported
    from runs.experiment import Experiment

PIXEL_TERMS = ('L1', 'MSE', 'Charbonnier')
VGG_TERMS = ('VGG22', 'VGG54')
GAN_TERMS = ('GAN',)
KNOWN_TERMS = PIXEL_TERMS + VGG_TERMS + GAN_TERMS
_TERM = re.compile(r'^\s*(?:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?([A-Za-z0-9_]+)\s*$')


@dataclass(frozen=True)
class Term:
    weight: float
    name: str


def parse_loss(text: str) -> list[Term]:
    """'1*L1+0.1*MSE' -> [Term(1.0, 'L1'), Term(0.1, 'MSE')]; UserError naming --loss otherwise."""
    terms = []
    for part in str(text).split('+'):
        m = _TERM.match(part)
        if m is None:
            raise UserError(f"--loss {text!r}: cannot read {part.strip()!r}; expected terms like '1*L1+0.1*MSE'")
        weight = float(m.group(1)) if m.group(1) is not None else 1.0
        name = {t.upper(): t for t in KNOWN_TERMS}.get(m.group(2).upper())
        if name is None:
            raise UserError(f'--loss {text!r}: unknown term {m.group(2)!r}; known: {", ".join(KNOWN_TERMS)}')
        if weight <= 0:
            raise UserError(f'--loss {text!r}: the weight of {name} must be positive')
        if any(t.name == name for t in terms):
            raise UserError(f'--loss {text!r}: {name} appears twice')
        terms.append(Term(weight, name))
    return terms


def _make_function(term: Term, args: argparse.Namespace) -> nn.Module:
    if term.name == 'L1':
        return nn.L1Loss()
    if term.name == 'MSE':
        return nn.MSELoss()
    if term.name == 'Charbonnier':
        from loss.charbonnier import Charbonnier

        return Charbonnier(args.charbonnier_eps)
    if term.name in VGG_TERMS:
        from loss.vgg import VGG

        return VGG(term.name[3:], rgb_range=args.rgb_range)
    from loss.adversarial import Adversarial

    return Adversarial(args)


class Loss(nn.Module):
    """Weighted sum of the --loss terms; keeps one row of per-term means per epoch in `log`.

    Columns of `log` are `columns`: the terms, then 'DIS' (discriminator loss) with GAN, then 'Total'
    when there is more than one column. Batches are recorded only when the trainer keeps them, so a
    skipped (diverging) batch cannot poison the epoch mean that --skip_threshold compares against.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device | str = 'cpu') -> None:
        super().__init__()
        self.spec = str(args.loss)
        self.terms = parse_loss(self.spec)
        self.functions = nn.ModuleList(_make_function(t, args) for t in self.terms)
        self.columns = [t.name for t in self.terms]
        if any(t.name in GAN_TERMS for t in self.terms):
            self.columns.append('DIS')
        if len(self.columns) > 1:
            self.columns.append('Total')
        self.log = torch.zeros(0, len(self.columns), dtype=torch.float64)
        self._count = 0
        self._last: list[float] = []
        self.to(device)

    def describe(self) -> str:
        return ' + '.join(f'{t.weight:g} * {t.name}' for t in self.terms)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        total = None
        values: list[float] = []
        for term, fn in zip(self.terms, self.functions, strict=True):
            effective = term.weight * fn(sr, hr)
            values.append(effective.item())
            total = effective if total is None else total + effective
        if any(t.name in GAN_TERMS for t in self.terms):
            values.append(next(f.loss_d for f in self.functions if hasattr(f, 'loss_d')))
        if len(self.columns) > 1:
            values.append(total.item())
        self._last = values
        return total

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of terms that train their own network (the GAN discriminator), for the LR schedule."""
        return [f.optimizer for f in self.functions if isinstance(getattr(f, 'optimizer', None), torch.optim.Optimizer)]

    # ---------------------------------------------------------------- per-epoch log
    def start_log(self) -> None:
        self.log = torch.cat([self.log, torch.zeros(1, len(self.columns), dtype=torch.float64)])
        self._count = 0

    def record(self) -> None:
        """Add the values of the latest forward() to this epoch's row."""
        self.log[-1] += torch.tensor(self._last, dtype=torch.float64)
        self._count += 1

    def end_log(self) -> None:
        if self._count:
            self.log[-1] /= self._count
        else:
            self.log[-1] = float('nan')

    def last_values(self) -> list[float]:
        """The latest forward()'s per-column values (terms, then the total when there are several)."""
        return list(self._last)

    def set_last_values(self, values: list[float]) -> None:
        """Replace them, e.g. by their average over processes, before record() and last_total()."""
        if len(values) != len(self._last):
            raise ValueError(f'expected {len(self._last)} loss values, got {len(values)}')
        self._last = list(values)

    def last_total(self) -> float:
        """The latest forward()'s total (the value --skip_threshold is checked against)."""
        return self._last[-1]

    def epoch_mean(self) -> float:
        """Mean total loss of the latest finished epoch."""
        return float(self.log[-1, -1])

    def display(self) -> str:
        """Running means of this epoch, e.g. '[L1: 0.0312][MSE: 0.0011][Total: 0.0323]'."""
        n = max(self._count, 1)
        return ''.join(f'[{c}: {v / n:.4f}]' for c, v in zip(self.columns, self.log[-1].tolist(), strict=True))

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict:
        """Everything resume needs: the spec, the log and the state of stateful terms (GAN)."""
        # Stateful terms (the GAN's discriminator and its optimizer) ride in state_dict().
        return {'spec': self.spec, 'columns': list(self.columns), 'log': self.log.clone(),
                'modules': self.functions.state_dict()}

    def load(self, state: dict, epochs: int) -> None:
        """Restore from state(), keeping the log rows of the first `epochs` epochs."""
        if state['columns'] != self.columns:
            raise UserError(f"--loss {self.spec!r}: the experiment was trained with --loss {state['spec']!r}; "
                            'use the same --loss to continue it (or --pre_train with a new --save)')
        self.functions.load_state_dict(state['modules'])
        self.log = state['log'][:epochs].clone()

    def save(self, experiment: Experiment, by_batch: dict[str, list[tuple[int, float]]] | None = None) -> None:
        """loss_log.pt and one loss_<term>.png per column, in the experiment folder: the loss against the batch
        number when `by_batch` holds (batch, loss) points of the column (loss_curve.csv), else per epoch."""
        from runs.curves import save_loss_plot

        experiment.save_torch(self.log.clone(), 'loss_log.pt')
        epochs = range(1, len(self.log) + 1)
        for i, c in enumerate(self.columns):
            if by_batch and by_batch.get(c):
                if experiment.is_main:
                    save_loss_plot(experiment.path(f'loss_{c}.png'), c, by_batch[c])
                continue
            pts = list(zip(epochs, self.log[:, i].tolist(), strict=True))
            experiment.plot(f'loss_{c}', f'{c} loss', 'Loss', {c: pts})
