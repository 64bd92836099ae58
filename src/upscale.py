"""Super-resolve images: `python src/upscale.py --pre_train MODEL IN [IN ...] --out DIR` (see tools/upscale.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from tools import upscale
    from tools.command import run_command

    return run_command(upscale.main, sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
    sys.exit(main())
