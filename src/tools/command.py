"""How a tool command ends: a user's mistake as one line `error: ...` and exit status 1 (--debug: the
traceback too), as main.py does."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from errors import UserError


def run_command(command: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """Run command(argv); 0 on success, 1 after printing a UserError as one line."""
    argv = list(argv)
    try:
        command(argv)
    except UserError as e:
        if '--debug' in argv:
            traceback.print_exc()
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0
