"""Paper-layout PSNR/SSIM table from one or more experiments' results.json.

    nlsr-table experiment/Bicubic experiment/EDSR experiment/HSPAN_x4_results

Rows are methods (one per experiment, grouped by scale), columns are test sets, cells are
PSNR/SSIM with the best value of each column and scale in bold. Runs given the same --names label (e.g.
one per --seed) make one row of mean ± sample standard deviation, the best chosen by mean PSNR. The
Markdown is printed and written to table.md (beside results.json for one run; experiment/table.md or
--out for several).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from nlsr.cli import ArgumentParser, run_command
from nlsr.errors import UserError
from nlsr.fileio import atomic_write_text
from nlsr.runs.experiment import experiment_root

# Paper column order; any other set follows in the order first seen.
KNOWN_SETS = ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')
RESULT_KEYS = ('dataset', 'scale', 'psnr', 'ssim')


def load_results(run: Path) -> list[dict]:
    """The entries of <run>/results.json (run may also be the file itself), checked."""
    path = run / 'results.json' if run.is_dir() else run
    if not path.is_file():
        raise UserError(f'{path}: no results.json (run main.py with --test_only or train first)')
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: not readable JSON ({e})') from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f'{path}: expected a JSON list of objects')
    for e in entries:
        missing = [k for k in RESULT_KEYS if k not in e]
        if missing:
            raise UserError(f'{path}: an entry lacks {", ".join(missing)}')
    return entries


def _cell_text(entries: list[dict]) -> tuple[float, str] | None:
    """(PSNR for ranking, cell text) of one method's entries for one set and scale; None without scores."""
    scored = [e for e in entries if e['psnr'] is not None]
    if not scored:
        return None
    psnr = statistics.fmean(e['psnr'] for e in scored)
    ssim = statistics.fmean(e['ssim'] for e in scored)
    if len(scored) == 1:
        return psnr, f'{psnr:.2f} / {ssim:.4f}'
    psnr_sd = statistics.stdev(e['psnr'] for e in scored)
    ssim_sd = statistics.stdev(e['ssim'] for e in scored)
    return psnr, f'{psnr:.2f} ± {psnr_sd:.2f} / {ssim:.4f} ± {ssim_sd:.4f} (n={len(scored)})'


def format_table(runs: Sequence[tuple[str, list[dict]]]) -> str:
    """Markdown table: one row per (scale, method), one column per dataset, best per column in bold; runs
    sharing a name are one row of mean ± standard deviation."""
    sets: list[str] = [s for s in KNOWN_SETS if any(e['dataset'] == s for _, es in runs for e in es)]
    for _, entries in runs:
        for e in entries:
            if e['dataset'] not in sets:
                sets.append(e['dataset'])
    scales = sorted({int(e['scale']) for _, es in runs for e in es})
    names = list(dict.fromkeys(name for name, _ in runs))
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for name, entries in runs:
        for e in entries:
            groups.setdefault((name, int(e['scale']), e['dataset']), []).append(e)
    cell = {key: text for key, es in groups.items() if (text := _cell_text(es)) is not None}

    lines = ['| Method | Scale | ' + ' | '.join(sets) + ' |', '|---|---|' + '---|' * len(sets)]
    for scale in scales:
        # None (no ground truth) is not a score; it never counts as best.
        best = {d: max((cell[(n, scale, d)][0] for n in names if (n, scale, d) in cell), default=None)
                for d in sets}
        for name in names:
            if not any((name, scale, d) in groups for d in sets):
                continue
            row = []
            for d in sets:
                if (name, scale, d) not in cell:
                    row.append('–')
                    continue
                psnr, text = cell[(name, scale, d)]
                row.append(f'**{text}**' if len(names) > 1 and psnr == best[d] else text)
            lines.append(f'| {name} | x{scale} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog='nlsr-table', description='PSNR/SSIM table in the paper layout from results.json files.')
    p.add_argument('runs', nargs='+', type=Path, help='experiment folders (or results.json files)')
    p.add_argument('--names', nargs='+',
                   help='row labels, one per run (default: folder names); repeated labels are averaged')
    p.add_argument('--out', type=Path, help='where to write the Markdown table (default: table.md beside one '
                                             "run's results.json, the experiment folder's table.md for several)")
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        raise UserError(f'--names has {len(args.names)} labels for {len(args.runs)} runs')
    names = args.names or [(r if r.is_dir() else r.parent).resolve().name for r in args.runs]
    table = format_table([(n, load_results(r)) for n, r in zip(names, args.runs, strict=True)])
    if args.out is not None:
        out = args.out
    elif len(args.runs) == 1:
        out = (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / 'table.md'
    else:
        out = experiment_root() / 'table.md'
    atomic_write_text(out, table)
    print(table, end='')
    print(f'(written to {out})', file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `nlsr-table` command: run() through the one bootstrap (cli.run_command); the exit status."""
    return run_command(run, argv)


if __name__ == '__main__':
    sys.exit(main())
