"""The ``sparsify`` console script's entry point: signals are handled from the first line.

Importing ``sparsify`` (and torch with it) takes seconds.  A Ctrl-C or SIGTERM in
that time would otherwise end in a traceback (or, for SIGTERM, with no word at
all).  This module imports nothing heavy: it installs handlers that print one
line and exit 130 / 143 (nothing has been written yet), then imports the CLI,
whose own handlers take over.  It lives outside the ``sparsify`` package because
importing anything inside it runs ``sparsify/__init__.py`` (and torch) first.
"""

from __future__ import annotations

import os
import signal
import sys


def _startup_signal(signum: int, _frame: object) -> None:
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    os.write(2, f"sparsify: {word} while starting; no output was written\n".encode())
    os._exit(128 + signum)


def main() -> int:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _startup_signal)
    from sparsify.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
