"""How a tool command ends: a user's mistake as one line `error: ...` and exit status 1 (--debug: the
traceback too), as main.py does."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from errors import UserError


def run_command(command: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Run command(argv); its exit status (None: 0), or 1 after printing a UserError as one line."""
    argv = list(argv)
    try:
        return int(command(argv) or 0)
    except UserError as e:
        if '--debug' in argv:
            traceback.print_exc()
        print(f'error: {e}', file=sys.stderr)
        return 1
