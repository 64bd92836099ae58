"""Training curves by batch: the loss curve file (loss_curve.csv) and the loss and PSNR plots.

loss_curve.csv has one row per --print_every batches: the global batch number (batches trained so far,
over all epochs), the epoch, the mean of each loss column over the batches since the previous row (kept
batches only), the learning rate of the row's last batch and the seconds per batch over those batches.
A resume cuts the file back to the batches of the epoch it resumes from, so no batch appears twice.

The plots are drawn on matplotlib Figure objects (no pyplot state) and written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from nlsr.fileio import atomic_write_bytes, atomic_write_text

CURVE_FILE = 'loss_curve.csv'
DISCARDED_FILE = 'loss_curve_discarded.csv'

Points = list[tuple[int, float]]


class LossCurve:
    """experiment/<name>/loss_curve.csv: appended row by row, cut back on resume."""

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.header = ['batch', 'epoch', *columns, 'lr', 'seconds_per_batch']
        self.columns = list(columns)

    def rows(self) -> list[dict[str, float]]:
        """The rows on disk as numbers (an absent file has none)."""
        if not self.path.is_file():
            return []
        with open(self.path, newline='', encoding='utf-8') as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def keep_until(self, batch: int) -> None:
        """Drop the rows after global batch `batch` (the batches a resumed run trains again). A file written
        with other loss columns is moved to loss_curve_discarded.csv and the curve starts afresh."""
        if not self.path.is_file():
            return
        with open(self.path, newline='', encoding='utf-8') as f:
            lines = f.read().splitlines()
        if not lines or lines[0].split(',') != self.header:
            self.path.replace(self.path.with_name(DISCARDED_FILE))
            return
        kept = [ln for ln in lines[1:] if ln and int(float(ln.split(',', 1)[0])) <= batch]
        if len(kept) < len(lines) - 1:
            atomic_write_text(self.path, '\n'.join([lines[0], *kept]) + '\n')

    def append(self, batch: int, epoch: int, values: Sequence[float], lr: float, seconds_per_batch: float) -> None:
        """Add one row (the header first when the file is new)."""
        new = not self.path.is_file()
        with open(self.path, 'a', newline='', encoding='utf-8') as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.header)
            writer.writerow([batch, epoch, *(f'{v:.6g}' for v in values), f'{lr:.6g}', f'{seconds_per_batch:.4g}'])

    def points(self) -> dict[str, Points]:
        """(batch, value) points of each loss column."""
        rows = self.rows()
        return {c: [(int(r['batch']), r[c]) for r in rows] for c in self.columns}


def _ema(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average; non-finite values are passed over."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            acc = beta * acc + (1 - beta) * v
            weight = beta * weight + (1 - beta)
        out.append(acc / weight if weight > 0 else float('nan'))
    return out


def smooth(values: Sequence[float], span: float | None = None) -> list[float]:
    """The mean of a forward and a backward exponential moving average, each bias-corrected (as TensorBoard
    corrects its one-sided one): the lag of the one cancels the lead of the other, so the smoothed curve
    follows a falling loss instead of trailing it, and a constant series stays constant. `span` (default: a
    tenth of the points, from 3 to 50) sets the weight 1 - 2 / (span + 1) of the neighbours."""
    if span is None:
        span = min(max(3.0, len(values) / 10), 50.0)
    beta = 1 - 2 / (span + 1)
    forward, backward = _ema(values, beta), _ema(values[::-1], beta)[::-1]
    return [(a + b) / 2 for a, b in zip(forward, backward, strict=True)]


def _figure(title: str, xlabel: str, ylabel: str) -> tuple:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout='constrained')
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.4)
    return fig, ax


def _save(fig: object, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def loss_figure(column: str, points: Points) -> object:
    """The loss of each logged batch (thin line, one marker per point) and its smoothed curve, against the
    batch number; a logarithmic loss axis when the values span more than a factor of 5."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = _figure(f'{column} loss', 'Batch', 'Loss')
    pts = [(b, v) for b, v in points if math.isfinite(v)]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, color='tab:blue', alpha=0.45, lw=0.8, marker='.', ms=4, label=f'logged ({len(pts)} points)')
        ax.plot(xs, smooth(ys), color='tab:blue', lw=2, label='smoothed')
        if min(ys) > 0 and max(ys) / min(ys) > 5:
            ax.set_yscale('log')
            # Plain numbers (0.02, not 2 x 10^-2): every power of ten and the 2s and 5s between them.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f'{v:g}' if round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ''))
        ax.set_xlim(0, max(xs) * 1.03)
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def psnr_figure(dataset: str, series: dict[str, Points], batches_per_epoch: int) -> object:
    """PSNR at each evaluation against the batch number (epochs, with integer ticks, on the top axis); each
    value is written beside its point (the last and the best ones beyond 12 points); the PSNR axis spans at
    least 1 dB, so one evaluation shows as a labelled point on a readable scale."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(f'SR on {dataset}', 'Batch', 'PSNR (dB)')
    all_x, all_y = [0], []
    for label, pts in series.items():
        pts = [(b, v) for b, v in pts if v is not None and math.isfinite(v)]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        line, = ax.plot(xs, ys, marker='o', ms=5, label=f'{label} (last {ys[-1]:.2f} dB)')
        best = max(range(len(ys)), key=lambda i: ys[i])
        shown = range(len(ys)) if len(ys) <= 12 else sorted({best, len(ys) - 1})
        for i in shown:
            ax.annotate(f'{ys[i]:.2f}', (xs[i], ys[i]), textcoords='offset points', xytext=(0, 7), ha='center',
                        fontsize=8, color=line.get_color())
        all_x += xs
        all_y += ys
    ax.set_xlim(0, max(all_x) * 1.08 or 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if all_y:
        low, high = min(all_y), max(all_y)
        pad = max(0.5 - (high - low) / 2, 0.0) + 0.1 * (high - low)
        ax.set_ylim(low - pad, high + pad + 0.1)
        ax.legend(loc='lower right')
    top = ax.secondary_xaxis('top', functions=(lambda b: b / batches_per_epoch, lambda e: e * batches_per_epoch))
    top.set_xlabel('Epoch')
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def save_loss_plot(path: str | Path, column: str, points: Points) -> None:
    _save(loss_figure(column, points), path)


def save_psnr_plot(path: str | Path, dataset: str, series: dict[str, Points], batches_per_epoch: int) -> None:
    _save(psnr_figure(dataset, series, batches_per_epoch), path)
