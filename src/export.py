"""Export a trained model to ONNX: `python src/export.py --pre_train MODEL OUT.onnx` (see tools/export.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from tools import export
    from tools.command import run_command

    return run_command(export.main, sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
    sys.exit(main())
