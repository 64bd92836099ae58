"""The one learning-rate schedule: a pure function of the batch number, for every optimizer of a run.

The network's optimizer and the GAN discriminator's follow the same curve; nothing is kept in step, so a
resumed run recomputes the learning rate of its next batch from the flags alone.
"""

from __future__ import annotations

import argparse
import bisect
import math
from collections.abc import Iterable

import torch


def lr_at(args: argparse.Namespace, batch: int) -> float:
    """LR of training batch `batch` (0-based, counted over all epochs) under --lr_schedule and --warmup.

    step (published): --lr times --gamma for every --decay milestone (in epochs of --test_every batches)
    already passed. cosine: from --lr to --min_lr over --epochs x --test_every batches. The warm-up scales
    the first --warmup batches linearly up to the scheduled value.
    """
    if args.lr_schedule == 'cosine':
        progress = min(1.0, batch / max(1, args.epochs * args.test_every))
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        epochs_done = batch // args.test_every
        lr = args.lr * args.gamma ** bisect.bisect_right(sorted(args.decay_milestones), epochs_done)
    if batch < args.warmup:
        lr *= (batch + 1) / args.warmup
    return lr


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> float:
    """Put `lr` into every parameter group of every optimizer; returns it."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['lr'] = lr
    return lr
