"""The first thing the `jobd` command does: remember SIGTERM, SIGINT and SIGHUP until the daemon's event loop takes
them over (Daemon.run replays them).

Importing the daemon (asyncio, SQLite, peewee, lxml, aiohttp, ...) is most of its start-up, a third of a second; a
signal in that time must neither kill jobd (the default action of SIGHUP and SIGTERM) nor be lost. So this module
imports nothing but `signal`, and the entry point installs the handlers before it imports anything else of jobd.
"""

from __future__ import annotations

import signal

RECEIVED: list[int] = []  # in the order they came; the daemon reads the same list, also those that come later

# Ignored by Python itself from its start (a write to a closed socket or past RLIMIT_FSIZE fails rather than kills
# jobd); subprocess puts them back to their default in every child it starts (restore_signals).
_IGNORED_BY_PYTHON = {signal.SIGPIPE, signal.SIGXFSZ}


def remember() -> list[int]:
    """Install the handlers (again: harmless), then drop what jobd's starter ignored or blocked; the list the
    handlers append to."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda received, _frame: RECEIVED.append(received))
    _start_clean()
    return RECEIVED


def _start_clean() -> None:
    """No signal ignored and none blocked, as systemd starts a service, whoever started jobd.

    An exec resets a handler, but not an ignored signal or the signal mask: jobs inherit those from jobd, and jobd
    from its starter. `jobd &` in a script ignores SIGINT and SIGQUIT, `nohup` SIGHUP, and a supervisor may leave
    signals blocked: every job had them so, and one with SIGTERM blocked lived through a cancel or a timeout until
    its SIGKILL. Called after the handlers are in place, so that a SIGTERM or SIGHUP that was pending while blocked
    is remembered, not fatal."""
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP) or number in _IGNORED_BY_PYTHON:
            continue
        if signal.getsignal(number) == signal.SIG_IGN:
            signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def main() -> int:
    """The `jobd` command: the handlers first, then the daemon."""
    remember()
    from jobd import daemon  # imported only now, under the handlers: see the module docstring

    return daemon.main(early_signals=RECEIVED)
