"""The loss's epoch log: one row of per-column means per epoch, its file loss_log.pt and its plots loss_<column>.png.

The columns are the criterion's (loss.Loss.columns: the terms, 'DIS' with GAN, 'Total' with more than one).
The training loop records the values of the batches it keeps, so a skipped (diverging) batch cannot poison
the epoch mean that --skip_threshold compares against. The training state holds the log, for resume.
"""

from __future__ import annotations

import torch

from nlsr.runs.curves import Points, save_loss_plot
from nlsr.runs.experiment import Experiment


class LossLog:
    """start_epoch(), record(values) for each kept batch, end_epoch(); `rows` is epochs x columns (float64)."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = list(columns)
        self.rows = torch.zeros(0, len(self.columns), dtype=torch.float64)
        self._count = 0

    def start_epoch(self) -> None:
        self.rows = torch.cat([self.rows, torch.zeros(1, len(self.columns), dtype=torch.float64)])
        self._count = 0

    def record(self, values: list[float]) -> None:
        """Add one kept batch's values (in `columns` order) to this epoch's row."""
        if len(values) != len(self.columns):
            raise ValueError(f'expected {len(self.columns)} loss values, got {len(values)}')
        self.rows[-1] += torch.tensor(values, dtype=torch.float64)
        self._count += 1

    def end_epoch(self) -> None:
        if self._count:
            self.rows[-1] /= self._count
        else:
            self.rows[-1] = float('nan')

    def epoch_mean(self) -> float:
        """Mean total loss of the latest finished epoch (the last column)."""
        return float(self.rows[-1, -1])

    def display(self) -> str:
        """Running means of this epoch, e.g. '[L1: 0.0312][MSE: 0.0011][Total: 0.0323]'."""
        n = max(self._count, 1)
        return ''.join(f'[{c}: {v / n:.4f}]' for c, v in zip(self.columns, self.rows[-1].tolist(), strict=True))

    def state(self) -> dict:
        return {'columns': list(self.columns), 'log': self.rows.clone()}

    def load(self, state: dict, epochs: int) -> None:
        """Restore from state() (same columns: the criterion checks them), keeping the first `epochs` rows."""
        if state['columns'] != self.columns:
            raise ValueError(f"loss log columns {state['columns']} do not match {self.columns}")
        self.rows = state['log'][:epochs].clone()

    def save(self, experiment: Experiment, by_batch: dict[str, Points] | None = None) -> None:
        """loss_log.pt and one loss_<column>.png per column, in the experiment folder: the loss against the batch
        number when `by_batch` holds (batch, loss) points of the column (loss_curve.csv), else per epoch."""
        experiment.save_torch(self.rows.clone(), 'loss_log.pt')
        epochs = range(1, len(self.rows) + 1)
        for i, c in enumerate(self.columns):
            if by_batch and by_batch.get(c):
                if experiment.is_main:
                    save_loss_plot(experiment.path(f'loss_{c}.png'), c, by_batch[c])
                continue
            pts = list(zip(epochs, self.rows[:, i].tolist(), strict=True))
            experiment.plot(f'loss_{c}', f'{c} loss', 'Loss', {c: pts})
