"""Train or evaluate a super-resolution network: the `nlsr` command, `python -m nlsr` and `src/main.py` (the
EDSR entry point); `--help` lists every flag. Mistakes a user can make end as one line (cli.run_command).

The flow: option.build(argv) is the configuration, built once (the command line, the --template preset, the
--pre_train checkpoint's configuration) and frozen; the experiment decides what the run resumes from
(Experiment.resume_point); both are passed down to the parts, which read them and never change them.

`torchrun --nproc_per_node N main.py ...` (from src/) runs the same program in N processes (DistributedDataParallel,
see distributed.init_distributed); an error every process hits alike is printed by rank 0 only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nlsr import option
from nlsr.cli import run_command

if TYPE_CHECKING:
    from nlsr.config import Config
    from nlsr.model.checkpoint import Configured


def run(args: Config, configured: Configured | None = None) -> None:
    """Train or evaluate with the configuration `args` (option.build) and the --pre_train file it read."""
    from nlsr import data, distributed, loss, model
    from nlsr.runs.experiment import Experiment
    from nlsr.training.seeding import seed_everything
    from nlsr.training.trainer import Trainer

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
    """The `nlsr` command (and src/main.py): train or evaluate; the exit status."""
    return run_command(lambda a: run(*option.build(a)), argv,
                       interrupted='interrupted: resume with --load <name> --resume -1')


if __name__ == '__main__':
    sys.exit(main())
