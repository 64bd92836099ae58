"""The paper table from a folder of checkpoints: every network scored by one pipeline.

    nlsr-paper-table CHECKPOINTS --dir_data ../.. [--data_test Set5+Set14+B100+Urban100+Manga109]

CHECKPOINTS holds one folder per network, named by its --model name (case-insensitive: RCAN, HSPAN, NLSN,
...), each holding that network's checkpoints with the scale in the file name, however its authors spelled it
(RCAN_BIX4.pt, SAN_BI4X.pt, HSPAN_x4.pt, model_x2.pt); a file without a scale (MDSR.pt) serves every --scale.
Each file runs through `main.py --test_only` with the network's --template (its published configuration,
rgb_range and chop; a checkpoint written by this project brings its own configuration), and the scores become
one Markdown table in the paper layout (PSNR / SSIM, the best of each column in bold) by make_table.
Flags after `--` go to every main.py run (e.g. `-- --self_ensemble --cpu`).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from nlsr.cli import ArgumentParser, run_command
from nlsr.errors import UserError
from nlsr.fileio import atomic_write_text

CHECKPOINT_SUFFIXES = ('.pt', '.pth', '.safetensors')
# x4, X4, BIX4 (RCAN), BI4X (SAN), 4x: the scale as authors write it in file names.
SCALE_IN_NAME = re.compile(r'(?<![a-z0-9])(?:bi)?(?:x(\d+)|(\d+)x)(?![a-z0-9])', re.IGNORECASE)
PAPER_SETS = 'Set5+Set14+B100+Urban100+Manga109'


@dataclass(frozen=True)
class Evaluation:
    """One main.py --test_only run: a network's checkpoint at its scales."""

    network: str  # the folder's name, the table's row label
    checkpoint: Path
    scales: str  # '+'-separated, as --scale takes it

    @property
    def save(self) -> str:
        return f'{self.network}_x{self.scales.replace("+", "_x")}'


def scale_of(path: Path) -> int | None:
    """The scale a checkpoint's file name states, None when it states none; UserError when it states several."""
    found = {int(a or b) for a, b in SCALE_IN_NAME.findall(path.stem)}
    if len(found) > 1:
        raise UserError(f'{path}: the file name states several scales ({", ".join(map(str, sorted(found)))})')
    return found.pop() if found else None


def serves_every_scale(name: str) -> bool:
    """Whether --model `name` is one network for several scales (MDSR), as its module's network class says."""
    from inspect import getmembers, isclass

    from nlsr.model.contract import SRNetwork
    from nlsr.model.registry import NETWORKS, resolve_model_name

    module = import_module(NETWORKS[resolve_model_name(name)])
    return any(issubclass(c, SRNetwork) and c.multi_scale for _, c in getmembers(module, isclass)
               if c.__module__ == module.__name__)


def find_evaluations(folder: Path, scales: Sequence[int]) -> list[Evaluation]:
    """The runs a checkpoint folder asks for: per network folder (a registered --model name), each checkpoint at
    the scale in its name (among `scales`), or, for a network serving every scale (MDSR), at all `scales` when
    its name states none."""
    from nlsr.model.registry import resolve_model_name

    if not folder.is_dir():
        raise UserError(f'{folder}: no such folder (expected one folder per network holding its checkpoints)')
    runs = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name.lower()):
        try:
            resolve_model_name(sub.name)
        except UserError as e:
            raise UserError(f'{sub}: the folder name is not a --model name ({e})') from None
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        if not files:
            raise UserError(f'{sub}: no checkpoint ({", ".join(CHECKPOINT_SUFFIXES)}) in it')
        multi_scale = serves_every_scale(sub.name)
        for f in files:
            s = scale_of(f)
            if s is None and not multi_scale:
                raise UserError(f'{f}: no scale in the file name (x2, X4, BIX3, 4x, ...), and {sub.name} is one '
                                'network per scale')
            if s is None:
                runs.append(Evaluation(sub.name, f, '+'.join(map(str, scales))))
            elif s in scales:
                runs.append(Evaluation(sub.name, f, str(s)))
    if not runs:
        raise UserError(f'{folder}: no network folder with a checkpoint at --scale {"+".join(map(str, scales))}')
    return runs


def main_argv(run: Evaluation, args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """main.py's arguments for one evaluation: the network's template, its checkpoint, the sets."""
    return ['--template', run.network, '--test_only', '--pre_train', str(run.checkpoint), '--scale', run.scales,
            '--data_test', args.data_test, '--dir_data', str(args.dir_data), '--save', f'{args.save}_{run.save}',
            *extra]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='nlsr-paper-table',
                                description='Score a folder of checkpoints (one sub-folder per network) on the '
                                            'benchmark sets and write the paper table.',
                                epilog='Flags after -- go to every main.py run, e.g. -- --self_ensemble --cpu.')
    p.add_argument('checkpoints', type=Path, help='folder with one sub-folder per network, named by its --model')
    p.add_argument('--dir_data', type=Path, default=Path('../..'), help="main.py's --dir_data")
    p.add_argument('--data_test', default=PAPER_SETS, help="test sets, '+'-separated")
    p.add_argument('--scale', default='2+3+4', help="scales to score, '+'-separated")
    p.add_argument('--save', default='paper_table',
                   help='runs go to experiment/<save>_<network>_x<scale>/, the table to experiment/<save>.md')
    p.add_argument('--out', type=Path, help='the Markdown table (default: experiment/<save>.md)')
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    return p


def run(argv: Sequence[str]) -> int:
    import nlsr.main as sr_main
    from nlsr.runs.experiment import experiment_root
    from nlsr.tools import make_table

    argv = list(argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    args = build_parser().parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    try:
        scales = [int(s) for s in args.scale.split('+') if s]
    except ValueError:
        raise UserError(f"--scale {args.scale!r}: expected integers separated by '+'") from None
    runs = find_evaluations(args.checkpoints, scales)
    if '--save' in extra:
        raise UserError('--save after --: the runs are saved as experiment/<--save>_<network>_x<scale>/')
    failed = []
    for ev in runs:
        print(f'== {ev.network} x{ev.scales}: {ev.checkpoint}', file=sys.stderr, flush=True)
        if sr_main.main(main_argv(ev, args, [*extra, *(['--debug'] if args.debug else [])])) != 0:
            failed.append(f'{ev.network} x{ev.scales}')
    root = experiment_root()
    scored = [(r.network, make_table.load_results(root / f'{args.save}_{r.save}')) for r in runs
              if f'{r.network} x{r.scales}' not in failed]
    if scored:
        table = make_table.format_table(scored)
        out = args.out or root / f'{args.save}.md'
        atomic_write_text(out, table)
        print(table, end='')
        print(f'(written to {out})', file=sys.stderr)
    if failed:
        raise UserError(f'{len(failed)} of {len(runs)} evaluations failed ({", ".join(failed)}): see the lines above')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `nlsr-paper-table` command: run() through the one bootstrap (cli.run_command); the exit status."""
    return run_command(run, argv)


if __name__ == '__main__':
    sys.exit(main())
