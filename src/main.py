"""Train or evaluate a super-resolution network: `python main.py --help` lists every flag.

The only place that exits the process. Mistakes a user can make end as one line, `error: <message>`,
and exit status 1; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import traceback
from collections.abc import Sequence

import option
from errors import UserError


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """option.parse, with argparse's own usage-and-exit errors turned into a one-line UserError."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return option.parse(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help (printed on stdout)
            raise
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        message = lines[-1] if lines else f'invalid arguments (exit status {e.code})'
        message = message.split(': error: ', 1)[-1]
        raise UserError(f'{message} (see --help)') from None


def run(args: argparse.Namespace) -> None:
    import torch

    import data
    import loss
    import model
    import utility
    from trainer import Trainer

    utility.seed_everything(args.seed)
    ckp = utility.Checkpoint(args)
    try:
        ckp.write_log(f'Experiment folder: {ckp.dir}')
        loader = data.Data(args, log=ckp.write_log)
        net = model.Model(args, log=ckp.write_log)
        criterion = None
        if not args.test_only:
            criterion = loss.Loss(args, device=getattr(net, 'device', torch.device('cpu')))
            ckp.write_log(f'Loss: {criterion.describe()}')
        t = Trainer(args, loader, net, criterion, ckp)
        while not t.terminate():
            t.train()
            t.test()
    finally:
        ckp.done()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    try:
        args = parse_args(argv)
        run(args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f'error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted: resume with --load <name> --resume -1', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
