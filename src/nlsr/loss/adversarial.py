"""Adversarial loss term 'GAN' (SRGAN-style, non-saturating BCE) with its own discriminator.

The training loop calls step_discriminator(), which updates the discriminator --gan_k times on (detached
SR, HR), before the forward, which returns the generator's loss and changes nothing (not even the
discriminator's BatchNorm statistics). The discriminator and its optimizer are saved with the loss
(get_extra_state), so a resumed run continues them too; its learning rate is set by the trainer from the
run's one schedule (schedule.lr_at).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


class Discriminator(nn.Module):
    """VGG-style strided conv stack with global pooling, so any patch size works; one logit per image."""

    def __init__(self, n_colors: int, width: int = 64, depth: int = 7) -> None:
        super().__init__()
        layers = [_block(n_colors, width, 1)]
        c = width
        for i in range(depth):
            c_out = c * 2 if i % 2 == 1 else c
            layers.append(_block(c, c_out, 2 if i % 2 == 0 else 1))
            c = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c, 1024), nn.LeakyReLU(0.2, inplace=True), nn.Linear(1024, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class Adversarial(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.gan_k = max(1, int(args.gan_k))
        self.dis = Discriminator(args.n_colors)
        self.optimizer = torch.optim.Adam(self.dis.parameters(), lr=args.lr, betas=tuple(args.betas),
                                          eps=args.epsilon, weight_decay=args.weight_decay)

    def step_discriminator(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        """--gan_k optimizer steps of the discriminator on (detached fake, real); their mean loss."""
        fake_detached = fake.detach()
        total_d = 0.0
        with torch.enable_grad():
            for _ in range(self.gan_k):
                self.optimizer.zero_grad()
                d_fake = self.dis(fake_detached)
                d_real = self.dis(real)
                loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                          + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
                loss_d.backward()
                self.optimizer.step()
                total_d += loss_d.item()
        return total_d / self.gan_k

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The generator's loss: the discriminator's logits of `fake` against 'real'. Its BatchNorm layers
        update copies of their running statistics, so the criterion has no side effect."""
        state = {**dict(self.dis.named_parameters()), **{k: b.clone() for k, b in self.dis.named_buffers()}}
        d_fake = torch.func.functional_call(self.dis, state, (fake,))
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))

    def get_extra_state(self) -> dict:
        return {'optimizer': self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state['optimizer'])
