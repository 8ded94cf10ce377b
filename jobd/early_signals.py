"""The first thing the `jobd` command does: remember SIGTERM, SIGINT and SIGHUP until the daemon's event loop takes
them over (Daemon.run replays them).

Importing the daemon (asyncio, SQLite, peewee, lxml, aiohttp, ...) is most of its start-up, a third of a second; a
signal in that time must neither kill jobd (the default action of SIGHUP and SIGTERM) nor be lost. So this module
imports nothing but `signal`, and the entry point installs the handlers before it imports anything else of jobd.
"""

from __future__ import annotations

import signal

RECEIVED: list[int] = []  # in the order they came; the daemon reads the same list, also those that come later


def remember() -> list[int]:
    """Install the handlers (again: harmless); the list they append to."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda received, _frame: RECEIVED.append(received))
    return RECEIVED


def main() -> int:
    """The `jobd` command: the handlers first, then the daemon."""
    remember()
    from jobd import daemon  # imported only now, under the handlers: see the module docstring

    return daemon.main(early_signals=RECEIVED)
