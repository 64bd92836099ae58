"""Train or evaluate a super-resolution network: `python main.py --help` lists every flag.

The only place that exits the process. Mistakes a user can make end as one line, `error: <message>`,
and exit status 1; --debug adds the traceback.

`torchrun --nproc_per_node N main.py ...` runs the same program in N processes (DistributedDataParallel,
see distributed.init_distributed); an error every process hits alike is printed by rank 0 only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import traceback
from collections.abc import Sequence

import option
from errors import UserError

RANK_ZERO_GRACE = 1.0  # seconds


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
    import data
    import distributed
    import loss
    import model
    from runs.experiment import Experiment
    from training.seeding import seed_everything
    from training.trainer import Trainer

    dist_env = distributed.init_distributed(args)  # None unless started by torchrun
    try:
        rank, world = (dist_env.rank, dist_env.world_size) if dist_env else (0, 1)
        # The same seed everywhere while the network is built (DDP also broadcasts rank 0's weights).
        seed_everything(args.seed)
        try:  # the checkpoint's architecture flags, before config.txt is written
            configured = model.configure(args)
        except UserError as e:  # decided alike by every process: reported once under torchrun
            raise distributed.RankZeroError(str(e)) from None
        experiment = Experiment(args, restart=distributed.restart_count())
        try:
            experiment.write_log(f'Experiment folder: {experiment.dir}')
            if configured.adopted:
                experiment.write_log(model.configuration_note(configured.adopted))
            if dist_env is not None:
                experiment.write_log(f'Distributed: {world} processes ({dist_env.backend}); global batch '
                                     f'{args.batch_size} = {args.batch_size // world} per process')
            # The model first: a wrong --model or a checkpoint that does not fit is refused before any data work.
            net = model.Model(args, log=experiment.write_log, configured=configured)
            loader = data.Data(args, rank, world, log=experiment.write_log)
            criterion = None
            if not args.test_only:
                criterion = loss.Loss(args, device=net.device)
                experiment.write_log(f'Loss: {criterion.describe()}')
            t = Trainer(args, loader, net, criterion, experiment)
            while not t.terminate():
                t.train()
                t.test()
            experiment.done()
            # After rank 0's last checkpoint and log line, every process leaves the process group at once.
            distributed.barrier()
        finally:
            experiment.done()
    finally:
        distributed.destroy_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    try:
        args = parse_args(argv)
        run(args)
    except UserError as e:
        # torchrun: an error all processes raise alike (distributed.RankZeroError) is reported by rank 0.
        if getattr(e, 'rank_zero_only', False) and os.environ.get('RANK', '0') != '0':
            # Exit a moment after rank 0, which torchrun would otherwise stop before it has printed.
            time.sleep(RANK_ZERO_GRACE)
            return 1
        if debug:
            traceback.print_exc()
        print(f'error: {e}', file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective whose peer died or timed out: one line, not a hang or a traceback
        import distributed

        reason = distributed.peer_failure(e)
        if reason is None or debug:
            raise
        print(f'error: rank {os.environ.get("RANK", "0")}: {reason}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get('RANK', '0') == '0':
            print('interrupted: resume with --load <name> --resume -1', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
