"""Training loss: a weighted sum of terms written like '1*L1+0.1*MSE', as a pure criterion.

Terms: L1, MSE, Charbonnier (a smooth L1, --charbonnier_eps), VGG22 / VGG54 (perceptual; need torchvision
and its ImageNet weights) and GAN (adversarial, with its own discriminator and optimizer). A weight may be
left out ('L1' = '1*L1'). forward() returns the total and the weighted terms and changes nothing; the GAN's
discriminator is trained only by discriminator_step(), which the training loop calls. The epoch log of these
values, its plots and its files belong to the training loop (runs/loss_log.py).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from nlsr.errors import UserError

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
        if not 0 < weight < math.inf:  # '1e999*L1' reads as inf
            raise UserError(f'--loss {text!r}: the weight of {name} must be a finite positive number')
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
        from nlsr.loss.charbonnier import Charbonnier

        return Charbonnier(args.charbonnier_eps)
    if term.name in VGG_TERMS:
        from nlsr.loss.vgg import VGG

        return VGG(term.name[3:], rgb_range=args.rgb_range)
    from nlsr.loss.adversarial import Adversarial

    return Adversarial(args)


@dataclass(frozen=True)
class LossTerms:
    """One evaluation of the criterion: the total to back-propagate and each weighted term (detached)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Loss(nn.Module):
    """Weighted sum of the --loss terms.

    `columns` names the values one training step reports, in order: the terms, then 'DIS' (the
    discriminator's loss) with GAN, then 'Total' when there is more than one column; step_values() lists them.
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
        self.to(device)

    def describe(self) -> str:
        return ' + '.join(f'{t.weight:g} * {t.name}' for t in self.terms)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> LossTerms:
        """The total and the weighted terms of (sr, hr); no state changes (the GAN term's discriminator is
        read, not trained: see discriminator_step)."""
        total = None
        terms: dict[str, torch.Tensor] = {}
        for term, fn in zip(self.terms, self.functions, strict=True):
            effective = term.weight * fn(sr, hr)
            terms[term.name] = effective.detach()
            total = effective if total is None else total + effective
        return LossTerms(total, terms)

    def discriminator_step(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        """Train the terms that own a network (the GAN discriminator, --gan_k updates on detached `sr` against
        `hr`) before forward() on the same batch; {'DIS': its mean loss}, or {} without such a term."""
        gan = [fn for fn in self.functions if hasattr(fn, 'step_discriminator')]  # at most one (no repeats)
        return {'DIS': gan[0].step_discriminator(sr, hr)} if gan else {}

    def step_values(self, result: LossTerms, discriminator: dict[str, float]) -> list[float]:
        """The values of one step in `columns` order, from forward() and discriminator_step()."""
        named = {**{name: value.item() for name, value in result.terms.items()}, **discriminator,
                 'Total': result.total.item()}
        return [named[c] for c in self.columns]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of terms that train their own network (the GAN discriminator), for the LR schedule."""
        return [f.optimizer for f in self.functions if isinstance(getattr(f, 'optimizer', None), torch.optim.Optimizer)]

    def state(self) -> dict:
        """What resume needs of the criterion: its spec and the state of stateful terms (the GAN's
        discriminator and its optimizer ride in state_dict())."""
        return {'spec': self.spec, 'columns': list(self.columns), 'modules': self.functions.state_dict()}

    def load(self, state: dict) -> None:
        """Restore from state(); UserError naming --loss when it was made with other terms."""
        if state['columns'] != self.columns:
            raise UserError(f"--loss {self.spec!r}: the experiment was trained with --loss {state['spec']!r}; "
                            'use the same --loss to continue it (or --pre_train with a new --save)')
        self.functions.load_state_dict(state['modules'])
