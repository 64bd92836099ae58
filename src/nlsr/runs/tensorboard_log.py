"""--tensorboard: the run's scalars in experiment/<save>/tb/, written by rank 0.

tensorboard is an optional dependency: it is imported here, when the writer is opened, and only then.
Steps are global batch numbers (batches trained so far), the x axis of loss_curve.csv too. A resumed run
opens the writer with purge_step at its first new batch, so TensorBoard hides what the interrupted run had
written from there on and no batch is shown twice.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from nlsr.errors import UserError

INSTALL_HINT = '--tensorboard needs the tensorboard package: pip install tensorboard'


def check_available() -> None:
    """UserError naming the package to install when tensorboard is absent (nothing is imported)."""
    if importlib.util.find_spec('tensorboard') is None:
        raise UserError(INSTALL_HINT)


class TensorBoardLog:
    """A SummaryWriter on `folder`; scalars go in with a step, None values are left out."""

    def __init__(self, folder: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError(f'{INSTALL_HINT} ({e})') from None
        self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
