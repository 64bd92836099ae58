"""The one bootstrap of every command (nlsr, nlsr-upscale, nlsr-export, nlsr-table, nlsr-paper-table,
nlsr-figures and src/main.py): a user's mistake ends as one line `error: <message>` and exit status 1,
`--debug` adds the traceback; Ctrl-C ends with status 130."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from nlsr.errors import UserError

RANK_ZERO_GRACE = 1.0  # seconds


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one line through run_command), not usage text and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f'{message} (see --help)')


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None,
                interrupted: str = 'interrupted') -> int:
    """body(argv) (None: the process's arguments); its exit status (None: 0), or 1 after printing a
    UserError as one line (under torchrun an error every rank raises alike is printed by rank 0 only),
    or 130 after printing `interrupted` on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    rank = os.environ.get('RANK', '0')
    try:
        return int(body(argv) or 0)
    except UserError as e:
        if getattr(e, 'rank_zero_only', False) and rank != '0':
            time.sleep(RANK_ZERO_GRACE)  # exit after rank 0, which torchrun would otherwise stop before it printed
            return 1
        if debug:
            traceback.print_exc()
        print(f'error: {e}', file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective whose peer died or timed out: one line, not a hang or a traceback
        from nlsr import distributed

        reason = distributed.peer_failure(e)
        if reason is None or debug:
            raise
        print(f'error: rank {rank}: {reason}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == '0':
            print(interrupted, file=sys.stderr)
        return 130
