"""The first thing the `jobctl` command does: make Ctrl-C end it with 130 and no traceback, from its first line on.

Importing jobctl (argparse, json, jobd's client and model, ...) takes a tenth of a second. Python's own SIGINT
handler raises KeyboardInterrupt wherever the interpreter is, so a Ctrl-C in that time printed a traceback from
the middle of an import, and Python then killed itself with SIGINT. This module imports nothing but `os` and
`signal` (both loaded by the interpreter before any script runs), and the entry point installs its handler before it
imports anything else of jobd; jobctl.main takes over with KeyboardInterrupt, which lets it take a progress bar
away, and hands back to this handler when it is done.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

EXIT_INTERRUPTED = 130  # as jobctl.EXIT_INTERRUPTED (not imported from there: that import is what is guarded)


def exit_interrupted(_signum: int, _frame: FrameType | None) -> None:
    """Nothing has been sent or printed yet (or all of it has been): nothing to tidy, so leave at once."""
    os._exit(EXIT_INTERRUPTED)


def guard() -> None:
    """Ctrl-C exits 130 at once from now on. A SIGINT ignored from the start stays ignored: a non-interactive shell
    starts a background command (`jobctl wait 4 &`) so that the terminal's Ctrl-C is not for it."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, exit_interrupted)


def main() -> int:
    """The `jobctl` command: the guard first, then jobctl."""
    guard()
    from jobd import jobctl  # imported only now, under the guard: see the module docstring

    try:
        return jobctl.main()
    except KeyboardInterrupt:  # a second Ctrl-C, as jobctl.main was handling the first
        return EXIT_INTERRUPTED
