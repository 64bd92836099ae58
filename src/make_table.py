"""Paper-layout PSNR/SSIM table from one or more experiments' results.json.

    python src/make_table.py experiment/Bicubic experiment/EDSR experiment/HSPAN_x4_results

Rows are methods (one per experiment, grouped by scale), columns are test sets, cells are
PSNR/SSIM with the best value of each column and scale in bold. The Markdown is printed and written to
table.md (beside results.json for one run; experiment/table.md or --out for several).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from errors import UserError
from fileio import atomic_write_text

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


def format_table(runs: Sequence[tuple[str, list[dict]]]) -> str:
    """Markdown table: one row per (scale, method), one column per dataset, best per column in bold."""
    sets: list[str] = [s for s in KNOWN_SETS if any(e['dataset'] == s for _, es in runs for e in es)]
    for _, entries in runs:
        for e in entries:
            if e['dataset'] not in sets:
                sets.append(e['dataset'])
    scales = sorted({int(e['scale']) for _, es in runs for e in es})
    cell = {(name, int(e['scale']), e['dataset']): e for name, es in runs for e in es}

    lines = ['| Method | Scale | ' + ' | '.join(sets) + ' |', '|---|---|' + '---|' * len(sets)]
    for scale in scales:
        best = {}
        for d in sets:
            # None (no ground truth) is not a score; it never counts as best.
            scores = [cell[(n, scale, d)]['psnr'] for n, _ in runs
                      if (n, scale, d) in cell and cell[(n, scale, d)]['psnr'] is not None]
            best[d] = max(scores) if scores else None
        for name, _ in runs:
            if not any((name, scale, d) in cell for d in sets):
                continue
            row = []
            for d in sets:
                e = cell.get((name, scale, d))
                if e is None or e['psnr'] is None:
                    row.append('–')
                    continue
                text = f"{e['psnr']:.2f} / {e['ssim']:.4f}"
                row.append(f'**{text}**' if len(runs) > 1 and e['psnr'] == best[d] else text)
            lines.append(f'| {name} | x{scale} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description='PSNR/SSIM table in the paper layout from results.json files.')
    p.add_argument('runs', nargs='+', type=Path, help='experiment folders (or results.json files)')
    p.add_argument('--names', nargs='+', help='row labels, one per run (default: folder names)')
    p.add_argument('--out', type=Path, help='where to write the Markdown table')
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    args = p.parse_args(argv)
    try:
        if args.names and len(args.names) != len(args.runs):
            raise UserError(f'--names has {len(args.names)} labels for {len(args.runs)} runs')
        names = args.names or [(r if r.is_dir() else r.parent).resolve().name for r in args.runs]
        table = format_table([(n, load_results(r)) for n, r in zip(names, args.runs, strict=True)])
        if args.out is not None:
            out = args.out
        elif len(args.runs) == 1:
            out = (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / 'table.md'
        else:
            out = Path(__file__).resolve().parents[1] / 'experiment' / 'table.md'
        atomic_write_text(out, table)
    except UserError as e:
        if args.debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(table, end='')
    print(f'(written to {out})', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
