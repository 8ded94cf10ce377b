"""History retention: finished jobs expire after `keep_days`, or beyond the newest `keep_last`.

No periodic sweep: one loop timer sleeps until the oldest finished job is due, trims, and sleeps again until the
next one is. `keep_last` is applied whenever a job finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from jobd.model import History
from jobd.store import Store

SECONDS_PER_DAY = 86400


class HistoryKeeper:
    def __init__(
        self, store: Store, rules: History, clock: Callable[[], float], remove_output: Callable[[int], None]
    ) -> None:
        self._store = store
        self._rules = rules
        self._clock = clock
        self._remove_output = remove_output
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, rules: History) -> None:
        """New retention rules (a reload): the next expiry time is computed from them at once."""
        self._rules = rules
        self.rearm()

    def job_finished(self) -> None:
        if self._rules.keep_last is not None:
            self._trim()
        if self._timer is None:
            self.rearm()

    def rearm(self) -> None:
        """Sleep until the oldest finished job expires."""
        self.stop()
        oldest = self._store.oldest_finished_at()
        if self._rules.keep_days is None or oldest is None:
            return
        due = oldest + self._rules.keep_days * SECONDS_PER_DAY
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - self._clock()), self._due)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        self._timer = None
        self._trim()
        self.rearm()

    def _trim(self) -> None:
        keep_days = self._rules.keep_days
        before = None if keep_days is None else self._clock() - keep_days * SECONDS_PER_DAY
        for job_id in self._store.expire(before, self._rules.keep_last):
            self._remove_output(job_id)
