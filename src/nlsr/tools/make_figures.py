"""The README's figures, made from the project's own runs (written to Figs/ by default).

    nlsr-figures architecture
    nlsr-figures ablation experiment/abl_hspa experiment/abl_softmax experiment/abl_none \
        --names HSPA softmax none --set Set5 --scale 2
    nlsr-figures compare --hr HR.png --sr Bicubic=a.png HSPAN=b.png --box 120 80 64

`ablation` plots PSNR against training iterations from each run's psnr_log.pt (epochs x sets x scales)
and config.txt (--test_every); runs given the same --names label (seeds) become one line of means with
standard-deviation error bars; `compare` crops the same box from each image and lays them side by side.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nlsr.cli import ArgumentParser, run_command
from nlsr.errors import UserError
from nlsr.runs.experiment import checkout_root, read_config

FIGS = (checkout_root() or Path('.')) / 'Figs'  # the README's figures


def _pyplot():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _box(ax, x: float, y: float, w: float, h: float, text: str, color: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0.02', fc=color, ec='#333333', lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha='center', va='center', fontsize=8)


def _arrow(ax, x0: float, y0: float, x1: float, y1: float) -> None:
    ax.annotate('', xy=(x1, y1), xytext=(x0, y0), arrowprops={'arrowstyle': '->', 'lw': 1, 'color': '#333333'})


def architecture(out: Path) -> Path:
    """HSPAN overview (top) and the HSPA block (bottom)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.2)
    ax.axis('off')
    top = [('LR', '#ffffff', 0.6), ('conv 3x3', '#d9e8fb', 0.9), ('HSPAM 1', '#fde2c8', 0.9),
           ('...', '#ffffff', 0.5), ('HSPAM G', '#fde2c8', 0.9), ('conv 3x3', '#d9e8fb', 0.9),
           ('+', '#ffffff', 0.4), ('upsampler\n(pixel shuffle)', '#d9e8fb', 1.2), ('conv 3x3', '#d9e8fb', 0.9),
           ('SR', '#ffffff', 0.6)]
    x, y = 0.1, 3.2
    centers = []
    for text, color, w in top:
        _box(ax, x, y, w, 0.6, text, color)
        centers.append((x, x + w))
        x += w + 0.25
    for (_, r), (l2, _) in zip(centers[:-1], centers[1:], strict=True):
        _arrow(ax, r, y + 0.3, l2, y + 0.3)
    ax.text(0.1, 4.0, 'HSPAN: head, G residual groups (HSPAM), global skip, upsampler, tail; '
            'MeanShift at both ends', fontsize=9, weight='bold')
    ax.text(0.1, 2.75, 'HSPAM = B x LEB (conv-ReLU-conv + skip) -> HSPA -> conv 3x3, scaled by res_scale, + input',
            fontsize=9)
    # HSPA block.
    ax.text(0.1, 2.25, 'HSPA (high-similarity-pass attention)', fontsize=9, weight='bold')
    _box(ax, 0.1, 0.9, 0.9, 0.6, 'x (C,H,W)', '#ffffff')
    _box(ax, 1.4, 1.6, 1.6, 0.5, 'conv1x1+PReLU -> q', '#e3f4e1')
    _box(ax, 1.4, 0.95, 1.6, 0.5, 'conv1x1+PReLU -> k', '#e3f4e1')
    _box(ax, 1.4, 0.3, 1.6, 0.5, 'conv1x1+PReLU -> v', '#e3f4e1')
    _box(ax, 3.4, 1.3, 1.6, 0.6, 'scores q k^T\n(HW x HW)', '#d9e8fb')
    _box(ax, 5.4, 1.3, 2.2, 0.6, 'soft thresholding\nmax(s - tau, 0), top-k tau', '#fbd5d5')
    _box(ax, 8.0, 0.9, 1.4, 0.6, 'weights @ v', '#d9e8fb')
    _box(ax, 9.8, 0.9, 1.1, 0.6, 'res_scale*.\n+ x', '#ffffff')
    for yy in (1.85, 1.2, 0.55):
        _arrow(ax, 1.0, 1.2, 1.4, yy)
    _arrow(ax, 3.0, 1.85, 3.4, 1.65)
    _arrow(ax, 3.0, 1.2, 3.4, 1.5)
    _arrow(ax, 5.0, 1.6, 5.4, 1.6)
    _arrow(ax, 7.6, 1.6, 8.0, 1.3)
    _arrow(ax, 3.0, 0.55, 8.0, 1.1)
    _arrow(ax, 9.4, 1.2, 9.8, 1.2)
    ax.text(5.4, 0.95, 'sparse: most weights are exactly 0', fontsize=7, style='italic')
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return out


def _iters_per_epoch(run: Path) -> int:
    config = run / 'config.txt'
    if not config.is_file():
        raise UserError(f'{config}: missing (is {run} an experiment folder?)')
    found = read_config(config).get('test_every', '')
    if not found.isdigit():
        raise UserError(f'{config}: no test_every entry')
    return int(found)


def _psnr_curve(run: Path, dataset: str, scale: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    log = run / 'psnr_log.pt'
    if not log.is_file():
        raise UserError(f'{log}: missing (train with a --data_test set first)')
    table = torch.load(log, weights_only=True)
    config = read_config(run / 'config.txt')
    sets = [s.strip(" '[]") for s in config['data_test'].split(',')] if 'data_test' in config else [dataset]
    scale_list = [int(s) for s in re.findall(r'\d+', config['scale'])] if 'scale' in config else [scale]
    if dataset not in sets or scale not in scale_list:
        raise UserError(f'{run}: no {dataset} x{scale} in its evaluations ({sets}, scales {scale_list})')
    psnr = table[:, sets.index(dataset), scale_list.index(scale)].numpy()
    epochs = np.arange(1, len(psnr) + 1)
    keep = ~np.isnan(psnr)
    return epochs[keep] * _iters_per_epoch(run), psnr[keep]


def mean_curve(name: str, curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Iterations evaluated in every run of `curves` ((iterations, PSNR) pairs), and the mean and sample
    standard deviation of the PSNR there."""
    common = sorted(set.intersection(*(set(i.tolist()) for i, _ in curves)))
    if not common:
        raise UserError(f'{name}: its {len(curves)} runs share no evaluation iteration')
    table = np.array([[p[list(i).index(it)] for it in common] for i, p in curves])
    return np.array(common), table.mean(axis=0), table.std(axis=0, ddof=1)


def ablation(runs: Sequence[Path], names: Sequence[str], dataset: str, scale: int, out: Path,
             baseline: float | None = None) -> Path:
    """PSNR against iterations, one line per name: runs sharing a name (e.g. seeds) are drawn as their mean
    with error bars of one sample standard deviation, over the evaluations all of them have."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for run, name in zip(runs, names, strict=True):
        groups.setdefault(name, []).append(_psnr_curve(run, dataset, scale))
    for name, curves in groups.items():
        if len(curves) == 1:
            iters, psnr = curves[0]
            ax.plot(iters, psnr, marker='o', ms=3, label=f'{name} (final {psnr[-1]:.2f} dB)')
            continue
        common, mean, std = mean_curve(name, curves)
        ax.errorbar(common, mean, yerr=std, marker='o', ms=3, capsize=3,
                    label=f'{name} (final {mean[-1]:.2f} ± {std[-1]:.2f} dB, n={len(curves)})')
    if baseline is not None:
        ax.axhline(baseline, color='gray', ls='--', lw=1, label=f'bicubic ({baseline:.2f} dB)')
    ax.set_xlabel('training iterations')
    ax.set_ylabel(f'PSNR on {dataset} x{scale} (dB, Y)')
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return out


def compare(hr: Path, srs: Sequence[tuple[str, Path]], box: tuple[int, int, int], out: Path) -> Path:
    import imageio.v3 as iio

    plt = _pyplot()
    x, y, size = box
    panels = [(name, iio.imread(path)) for name, path in [*srs, ('HR', hr)]]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    for ax, (name, img) in zip(np.atleast_1d(axes), panels, strict=True):
        if img.shape[0] < y + size or img.shape[1] < x + size:
            raise UserError(f'{name}: image {img.shape[:2]} is smaller than the box {box}')
        ax.imshow(img[y:y + size, x:x + size], interpolation='nearest', cmap='gray')
        ax.set_title(name, fontsize=9)
        ax.axis('off')
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return out


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog='nlsr-figures', description="The README's figures from the project's own runs.")
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    sub = p.add_subparsers(dest='figure', required=True)
    a = sub.add_parser('architecture', help='HSPAN and HSPA diagram')
    a.add_argument('--out', type=Path, default=FIGS / 'architecture.png')
    b = sub.add_parser('ablation', help='PSNR against iterations for several runs')
    b.add_argument('runs', nargs='+', type=Path)
    b.add_argument('--names', nargs='+', help='one label per run; runs sharing a label are averaged')
    b.add_argument('--set', default='Set5')
    b.add_argument('--scale', type=int, default=2)
    b.add_argument('--baseline', type=float, help='bicubic PSNR, drawn as a line')
    b.add_argument('--out', type=Path, default=FIGS / 'ablation.png')
    c = sub.add_parser('compare', help='the same crop of several images side by side')
    c.add_argument('--hr', type=Path, required=True)
    c.add_argument('--sr', nargs='+', required=True, help='NAME=PATH')
    c.add_argument('--box', type=int, nargs=3, metavar=('X', 'Y', 'SIZE'), required=True)
    c.add_argument('--out', type=Path, default=FIGS / 'compare.png')
    args = p.parse_args(argv)
    if args.figure == 'architecture':
        out = architecture(args.out)
    elif args.figure == 'ablation':
        names = args.names or [r.name for r in args.runs]
        if len(names) != len(args.runs):
            raise UserError(f'--names has {len(names)} labels for {len(args.runs)} runs')
        out = ablation(args.runs, names, args.set, args.scale, args.out, args.baseline)
    else:
        pairs = []
        for item in args.sr:
            name, sep, path = item.partition('=')
            if not sep:
                raise UserError(f'--sr {item!r}: expected NAME=PATH')
            pairs.append((name, Path(path)))
        out = compare(args.hr, pairs, tuple(args.box), args.out)
    print(f'written {out}')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `nlsr-figures` command: run() through the one bootstrap (cli.run_command); the exit status."""
    return run_command(run, argv)


if __name__ == '__main__':
    sys.exit(main())
