"""What a training run shows as it goes: the progress bar on a terminal (plain lines otherwise), the log.txt
line every --print_every batches, loss_curve.csv, the loss and PSNR plots, and the --tensorboard scalars.

The progress shows the batch, the epoch's running mean loss, the learning rate, the seconds per batch and
the time left in the epoch. Only the main process writes files, prints and logs to TensorBoard; the loss
values it receives are already averaged over processes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from nlsr.runs.curves import CURVE_FILE, LossCurve, Points, save_psnr_plot
from nlsr.runs.experiment import Experiment
from nlsr.runs.loss_log import LossLog
from nlsr.runs.records import HistoryEntry
from nlsr.runs.timer import Timer

# The status goes in as tqdm's description (its postfix would start with a comma).
BAR_FORMAT = 'Epoch {epoch} batch {{n_fmt}}/{{total_fmt}} |{{bar:20}}| {{desc}}'


def format_duration(seconds: float) -> str:
    """'1:02:03', '2:03' or '0:05'."""
    if not math.isfinite(seconds):
        return '?'
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


def progress_text(loss: float, lr: float, seconds_per_batch: float, left: float) -> str:
    """'loss 0.0312  lr 4.00e-03  0.248 s/batch  3:30 left'."""
    return f'loss {loss:.4f}  lr {lr:.2e}  {seconds_per_batch:.3f} s/batch  {format_duration(left)} left'


class Watch:
    """The trainer calls start_epoch(), then data_ready() and batch_done() around each batch, end_epoch(),
    evaluated() after each evaluation and checkpoint() with each checkpoint; close() at the end.

    Made after the resume point is known: a training run cuts loss_curve.csv back to the batches of the
    epochs already done and opens TensorBoard's writer with purge_step at the first batch it will train.
    """

    def __init__(self, args: argparse.Namespace, experiment: Experiment, loss_log: LossLog | None, tty: bool,
                 epoch: int, history: Sequence[HistoryEntry]) -> None:
        self.args, self.exp, self.loss_log, self.tty = args, experiment, loss_log, tty
        self.main = experiment.is_main
        self.training = not args.test_only and loss_log is not None
        self.curve = LossCurve(experiment.path(CURVE_FILE), loss_log.columns) if self.training else None
        self.seen = len(history)  # evaluation entries already logged to TensorBoard by an earlier run
        self.tb = None
        if self.main and self.training:
            self.curve.keep_until(epoch * args.test_every)
        if self.main and args.tensorboard:
            from nlsr.runs.tensorboard_log import TensorBoardLog

            self.tb = TensorBoardLog(experiment.path('tb'),
                                     purge_step=epoch * args.test_every + 1 if self.training else None)

    # ---------------------------------------------------------------- batches
    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.done, self.window = epoch, 0, 0
        self.started = self.window_started = time.perf_counter()
        self.timer_data, self.timer_model = Timer(), Timer()
        self.window_sum: list[float] = [0.0] * len(self.loss_log.columns)
        self.window_kept = self.epoch_kept = 0
        self.epoch_sum = 0.0
        self.bar = tqdm(total=self.args.test_every, ncols=110, leave=False, disable=not self.tty, file=sys.stdout,
                        bar_format=BAR_FORMAT.format(epoch=epoch))

    def data_ready(self) -> None:
        """The batch is on the device: the data wait ends, the model's time starts."""
        self.timer_data.hold()
        self.timer_model.tic()

    def batch_done(self, lr: float, kept: bool, values: list[float]) -> None:
        """After the step of one batch with learning rate `lr` and loss `values` (the loss log's columns, averaged
        over processes; kept: not skipped by --skip_threshold)."""
        self.timer_model.hold()
        self.done += 1
        self.window += 1
        if kept:
            self.window_sum = [a + v for a, v in zip(self.window_sum, values, strict=True)]
            self.window_kept += 1
            self.epoch_sum += values[-1]
            self.epoch_kept += 1
        self.bar.set_description_str(self._status(lr), refresh=False)
        self.bar.update()
        if self.done % self.args.print_every == 0:
            self._log_point(lr)
        self.timer_data.tic()

    def end_epoch(self) -> None:
        self.bar.close()

    def _status(self, lr: float) -> str:
        per_batch = (time.perf_counter() - self.started) / max(self.done, 1)
        mean = self.epoch_sum / self.epoch_kept if self.epoch_kept else float('nan')
        return progress_text(mean, lr, per_batch, per_batch * (self.args.test_every - self.done))

    def _log_point(self, lr: float) -> None:
        """The log.txt line (EDSR's: images so far, running means, model+data seconds), the plain progress
        line when stdout is not a terminal, a loss_curve.csv row and the TensorBoard scalars."""
        args, total = self.args, self.args.test_every
        self.exp.write_log(f'[{self.done * args.batch_size}/{total * args.batch_size}]\t{self.loss_log.display()}'
                           f'\t{self.timer_model.release():.1f}+{self.timer_data.release():.1f}s', echo=False)
        if not self.main:
            return
        if not self.tty:
            print(f'[Epoch {self.epoch} batch {self.done}/{total}]  {self._status(lr)}', flush=True)
        now = time.perf_counter()
        per_batch = (now - self.window_started) / self.window
        means = [s / self.window_kept if self.window_kept else float('nan') for s in self.window_sum]
        step = (self.epoch - 1) * total + self.done
        self.curve.append(step, self.epoch, means, lr, per_batch)
        if self.tb is not None:
            scalars = {f'loss/{c}': v for c, v in zip(self.loss_log.columns, means, strict=True)}
            self.tb.scalars(step, {**scalars, 'lr': lr, 'time/seconds_per_batch': per_batch})
        self.window, self.window_started = 0, now
        self.window_sum = [0.0] * len(self.window_sum)
        self.window_kept = 0

    # ---------------------------------------------------------------- evaluations and checkpoints
    def evaluated(self, history: Sequence[HistoryEntry]) -> None:
        """PSNR and SSIM of the entries added since the last call, at the batch of their epoch."""
        new, self.seen = history[self.seen:], len(history)
        if self.tb is not None:
            for h in new:
                key = f'{h.dataset}_x{h.scale}'
                self.tb.scalars(h.epoch * self.args.test_every, {f'psnr/{key}': h.psnr, f'ssim/{key}': h.ssim})

    def loss_points(self) -> dict[str, Points]:
        """(batch, loss) points of each loss column, from loss_curve.csv."""
        return self.curve.points() if self.main and self.curve is not None else {}

    def checkpoint(self, history: Sequence[HistoryEntry]) -> None:
        """psnr_<set>.png (one line per scale, against the batch) and a TensorBoard flush."""
        if not self.main:
            return
        by_set: dict[str, dict[int, Points]] = {}
        for h in history:
            if h.psnr is not None:
                by_set.setdefault(h.dataset, {}).setdefault(h.scale, []).append((h.epoch * self.args.test_every,
                                                                                  h.psnr))
        for name, scales in by_set.items():
            series = {f'x{s}': pts for s, pts in sorted(scales.items())}
            save_psnr_plot(self.exp.path(f'psnr_{name}.png'), name, series, self.args.test_every)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
