"""Train or evaluate a super-resolution network: `python main.py --help` lists every flag.

The only place that exits the process. Mistakes a user can make end as one line, `error: <message>`,
and exit status 1; --debug adds the traceback.

The flow: option.build(argv) is the configuration, built once (the command line, the --template preset, the
--pre_train checkpoint's configuration) and frozen; the experiment decides what the run resumes from
(Experiment.resume_point); both are passed down to the parts, which read them and never change them.

`torchrun --nproc_per_node N main.py ...` runs the same program in N processes (DistributedDataParallel,
see distributed.init_distributed); an error every process hits alike is printed by rank 0 only.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

import option
from errors import UserError

if TYPE_CHECKING:
    from config import Config
    from model.checkpoint import Configured

RANK_ZERO_GRACE = 1.0  # seconds


def parse_args(argv: Sequence[str]) -> tuple[Config, Configured]:
    """option.build (the configuration, built once, and the --pre_train file it read), with argparse's own
    usage-and-exit errors turned into a one-line UserError."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return option.build(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help (printed on stdout)
            raise
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        message = lines[-1] if lines else f'invalid arguments (exit status {e.code})'
        message = message.split(': error: ', 1)[-1]
        raise UserError(f'{message} (see --help)') from None


def run(args: Config, configured: Configured | None = None) -> None:
    """Train or evaluate with the configuration `args` (option.build) and the --pre_train file it read."""
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
        configured = configured if configured is not None else model.Configured()
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
            t = Trainer(args, loader, net, criterion, experiment, resume=experiment.resume_point)
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
        run(*parse_args(argv))
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
