"""Completion callbacks: `on_success`, `on_failure` and `on_finish` of a task, a queue or a single job.

When a job reaches a final state, the callbacks that match it are committed as rows of the `callback` table (just
after the job's own commit; a job that jobd died between the two commits has its rows made at the next start-up),
then delivered on the event loop: an exec callback is a process of its own (its own process group, no queue slot)
reading a JSON job summary on stdin; an http callback POSTs that summary (or GETs the URL with `jobid=ID`). A
failed delivery is retried after 1, 2, 4 … seconds (at most MAX_DELAY apart), up to MAX_TRIES tries, each recorded.
Pending deliveries are re-armed from the table when jobd starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from jobd import redact
from jobd.engine.core import DEFAULT_PATH, Engine
from jobd.engine.http_task import JOB_ID, HttpSpecError, check_headers, check_url, new_session
from jobd.errors import OutOfResources, UnknownJob, did_you_mean, json_repr
from jobd.model import HTTP_CALLBACKS_AT_ONCE, Job, JobState
from jobd.proc import Child, ExitInfo, LaunchSpec, SpawnError
from jobd.store import STORE_RETRY_SECONDS, CallbackDelivery, Store, store_failure
from jobd.users import job_account

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("jobd.callbacks")

EVENTS = ("on_success", "on_failure", "on_finish")
MAX_TRIES = 8  # tries of one delivery before it is recorded as failed
FIRST_DELAY = 1.0  # seconds before the second try; doubled after each failed try
MAX_DELAY = 300.0
HTTP_TIMEOUT = 30.0  # default seconds for one HTTP try
# HTTP tries under way at most (model.HTTP_CALLBACKS_AT_ONCE); the others wait their turn before their timeout
# starts, so that a hundred callbacks to a server that hangs delay the others, not fail them.
HTTP_AT_ONCE = HTTP_CALLBACKS_AT_ONCE
EXEC_TIMEOUT = 300.0  # seconds an exec callback may run before it is stopped (a failed try)
EXEC_OUTPUT = 64 * 1024  # bytes of an exec callback's output kept
SHUTDOWN_GRACE = 5.0  # seconds a stopping jobd lets deliveries under way finish; the rest stay pending
STOP_KILL_GRACE = 1.0  # then an exec callback still running gets SIGTERM, and SIGKILL this much later
SHUTDOWN_TAKES = SHUTDOWN_GRACE + STOP_KILL_GRACE + 1.0  # close() at most, the reaping included
_HTTP_KEYS = ("url", "method", "headers", "timeout")


# -- validation (the one place: the configuration and job.submit both call it) -------------------------------


class BadCallback(ValueError):
    """What is wrong with callback definitions. `key` is the path, below the `where` they were checked as, of the
    deepest key at fault: ("[2]", "http", "timeout") for the timeout of an array's second callback (an element
    spelled as jobd.config spells key paths), ("on_success", "[1]", "exec") in job.submit's `callbacks`, () for the
    value as a whole; a configuration error points at its line, a JSON-RPC refusal names it (`data.key`)."""

    def __init__(self, message: str, key: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.key = key

    @property
    def dotted(self) -> str:
        """`key` as one string: `on_success[1].http.timeout`."""
        return "".join(part if part.startswith("[") or not index else f".{part}" for index, part in enumerate(self.key))


def check_list(value: object, where: str) -> list[dict[str, Any]]:
    """An array of callback definitions, normalized; BadCallback says what is wrong, and where."""
    if not isinstance(value, list):
        raise BadCallback(f"{where}: expected an array of callbacks such as [{{ exec = [...] }}, {{ http = {{...}} }}]")
    checked = []
    for number, item in enumerate(value, 1):
        try:
            checked.append(_check_one(item, f"{where}[{number}]"))
        except BadCallback as error:
            raise BadCallback(str(error), (f"[{number}]", *error.key)) from None
    return checked


def _check_one(item: object, where: str) -> dict[str, Any]:
    expected = "expected { exec = [argv...] } or { http = { url = ..., method = ... } }"
    if isinstance(item, dict) and len(item) == 1 and (key := str(next(iter(item)))) not in ("exec", "http"):
        raise BadCallback(f"{where}: unknown key {key!r}{did_you_mean(key, ('exec', 'http'))}; {expected}", (key,))
    if not isinstance(item, dict) or len(item) != 1:
        raise BadCallback(f"{where}: {expected}")
    if "exec" in item:
        argv = item["exec"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise BadCallback(
                f"{where}.exec: expected a non-empty array of strings, the first one the program", ("exec",)
            )
        if not argv[0].startswith("/"):
            raise BadCallback(
                f"{where}.exec: the program must be an absolute path, got {json_repr(argv[0])}", ("exec",)
            )
        if any("\0" in arg for arg in argv):
            raise BadCallback(f"{where}.exec: an argument contains NUL, which no program can be given", ("exec",))
        return {"exec": list(argv)}
    http = item["http"]
    if not isinstance(http, dict):
        raise BadCallback(f"{where}.http: expected a table such as {{ url = ..., method = ... }}", ("http",))
    for key in http:
        if key not in _HTTP_KEYS:
            hint = did_you_mean(key, _HTTP_KEYS)
            raise BadCallback(
                f"{where}.http: unknown key {key!r}{hint}; allowed keys: {', '.join(_HTTP_KEYS)}", ("http", str(key))
            )
    url = http.get("url")
    if not isinstance(url, str):
        raise BadCallback(f"{where}.http.url: expected an http:// or https:// URL", ("http", "url"))
    method = http.get("method", "POST")
    if method not in ("POST", "GET"):
        raise BadCallback(f'{where}.http.method: expected "POST" or "GET", got {json_repr(method)}', ("http", "method"))
    result: dict[str, Any] = {"url": url, "method": method}
    headers = http.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise BadCallback(f"{where}.http.headers: expected a table of strings", ("http", "headers"))
    try:  # as an HTTP job's: what aiohttp would refuse at every delivery is refused now
        check_url(url)
        check_headers(url, headers)
    except HttpSpecError as error:  # its key: url or headers
        raise BadCallback(f"{where}.http: {error}", ("http", error.key or "url")) from None
    if headers:
        result["headers"] = dict(headers)
    timeout = http.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise BadCallback(
                f"{where}.http.timeout: expected a number of seconds > 0 and <= 3600, got {json_repr(timeout)}",
                ("http", "timeout"),
            )
        result["timeout"] = float(timeout)
    return {"http": result}


def check_callbacks(value: object, where: str) -> dict[str, list[dict[str, Any]]]:
    """{"on_success"|"on_failure"|"on_finish": [callback, ...]} (job.submit's `callbacks`), normalized;
    BadCallback says what is wrong, and where."""
    if not isinstance(value, dict):
        raise BadCallback(f"{where}: expected an object with keys {', '.join(EVENTS)}")
    result = {}
    for event, callbacks in value.items():
        if event not in EVENTS:
            raise BadCallback(f"{where}: unknown event {event!r}; allowed: {', '.join(EVENTS)}", (str(event),))
        try:
            result[event] = check_list(callbacks, f"{where}.{event}")
        except BadCallback as error:
            raise BadCallback(str(error), (event, *error.key)) from None
    return result


def has_exec(callbacks: Mapping[str, Any] | None) -> bool:
    return callbacks is not None and any("exec" in item for items in callbacks.values() for item in items)


def merge(*parts: Mapping[str, Any] | None) -> dict[str, list[Any]] | None:
    """Lists concatenated event by event, in the order given (task, queue, job); None when there are none."""
    result: dict[str, list[Any]] = {}
    for part in parts:
        if not part:  # most jobs: no callbacks anywhere
            continue
        for event in EVENTS:
            if part.get(event):
                result.setdefault(event, []).extend(part[event])
    return result or None


def matching_events(state: JobState) -> tuple[str, ...]:
    if state is JobState.SUCCEEDED:
        return ("on_success", "on_finish")
    return ("on_failure", "on_finish")  # failed, timed_out, cancelled


def _target(spec: Mapping[str, Any]) -> str:
    """Where a callback goes, as its row and jobd's log name it: an http target without its URL's credentials
    (the log goes to the journal and the table to every admin; the delivery itself uses the URL as given)."""
    if "exec" in spec:
        return " ".join(spec["exec"])
    return f"{spec['http']['method']} {redact.url(spec['http']['url'])}"


# -- delivery --------------------------------------------------------------------------------------------------


class Callbacks:
    def __init__(self, engine: Engine, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._children: dict[int, tuple[Child, asyncio.Future[ExitInfo]]] = {}  # exec callbacks running, and their ends
        self._session: aiohttp.ClientSession | None = None
        self._http_turns = asyncio.Semaphore(HTTP_AT_ONCE)
        self._closing = False
        engine.finish_listeners.append(self._job_finished)

    def start(self) -> None:
        """Queue the callbacks of jobs that finished just before a previous jobd died (their rows are made in a
        transaction after the job's own), then re-arm every pending delivery."""
        for job in self.store.unqueued_callback_jobs():
            log.warning(
                "job=%d finished but its callbacks were never queued (jobd stopped in between): queued now", job.id
            )
            self._queue(job)
        for delivery in self.store.pending_callbacks():
            if delivery.id not in self._timers and delivery.id not in self._tasks:  # not those just queued above,
                self._arm(delivery)  # nor those of jobs that the engine's recovery has just finished

    def _job_finished(self, job: Job) -> None:
        if job.spec.callbacks and not self._closing:
            self._queue(job)

    def _queue(self, job: Job) -> None:
        callbacks = job.spec.callbacks or {}
        wanted = [
            (event, _target(item), item) for event in matching_events(job.state) for item in callbacks.get(event, ())
        ]
        if not wanted:
            return
        try:
            deliveries = self.store.insert_callbacks(job.id, wanted, self.clock())
        except Exception:  # the job has finished; a full disk must not take the engine down with it
            log.exception("job=%d: could not queue its callbacks (the next start of jobd will)", job.id)
            return
        self.engine.history.held_for_callbacks()
        for delivery in deliveries:
            self._arm(delivery)

    def _arm(self, delivery: CallbackDelivery) -> None:
        loop = asyncio.get_running_loop()
        # At most the back-off after its tries so far: `next_try_at` is on the wall clock of the try that failed,
        # and a clock set back since (while jobd was down) would add however far it went back to the wait.
        wait = min(max(0.0, (delivery.next_try_at or 0.0) - self.clock()), _back_off(delivery.tries))
        self._timers[delivery.id] = loop.call_later(wait, self._try, delivery)

    def _try(self, delivery: CallbackDelivery) -> None:
        self._timers.pop(delivery.id, None)
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks[delivery.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(delivery.id, None))

    async def _deliver(self, delivery: CallbackDelivery) -> None:
        tries = delivery.tries + 1
        try:
            job = self.engine.get(delivery.job_id)
        except UnknownJob:
            job = None
        what = f"job={delivery.job_id} {delivery.event} callback {delivery.target!r}"
        if job is None:  # retention keeps a job until its deliveries are done: gone by other means
            delivery = _replace(delivery, state="failed", next_try_at=None, last_error="the job is gone")
            log.warning("%s given up: the job is gone from the history", what)
            self._record(delivery, what)
            return
        summary = self._summary(job)
        error: str | None
        try:
            if "exec" in delivery.spec:
                error = await self._exec(delivery, job, summary, tries)
            else:
                error = await self._http(delivery, job, summary, tries)
        # OutOfResources: the job's user could not be looked up for want of a descriptor (users.account); a failed
        # try, as a spawn short of descriptors is, rather than an exec with less than the user's groups.
        except (TimeoutError, OSError, SpawnError, ValueError, OutOfResources) as exc:
            error = _failure(exc)
        if error is not None and "http" in delivery.spec:
            # The error is logged and kept in the row, which name the target masked: aiohttp's InvalidURL is the
            # whole URL (a port out of range, a host it refuses), user:password and token parameters included.
            given = delivery.spec["http"]["url"]
            error = redact.error(error, given.replace(JOB_ID, str(job.id)), given)
        now = self.clock()
        if error is None:
            delivery = _replace(delivery, state="delivered", tries=tries, next_try_at=None, delivered_at=now)
            log.info("%s delivered (try %d)", what, tries)
        elif tries >= MAX_TRIES:
            delivery = _replace(delivery, state="failed", tries=tries, next_try_at=None, last_error=error)
            log.warning("%s failed for good after %d tries: %s", what, tries, error)
        else:
            delay = _back_off(tries)
            delivery = _replace(delivery, tries=tries, next_try_at=now + delay, last_error=error)
            log.info("%s: try %d failed (%s); next in %gs", what, tries, error, delay)
        self._record(delivery, what)

    def _record(self, delivery: CallbackDelivery, what: str, *, again: bool = False) -> None:
        """Record a try, then arm the next one or let the job expire. A record the store refuses (a full disk) is
        tried again every STORE_RETRY_SECONDS, the delivery waiting meanwhile; should jobd stop first, the delivery
        stays as last recorded and is tried again at the next start (at least once)."""
        self._timers.pop(delivery.id, None)
        try:
            job_may_expire = self.store.record_callback_try(delivery)
        except Exception as error:
            if store_failure(error) is None:
                raise  # a bug, with its traceback
            if not again:  # said once, not at every retry
                log.error(
                    "%s: cannot record its try %d: %s; trying again every %gs",
                    what,
                    delivery.tries,
                    error,
                    STORE_RETRY_SECONDS,
                )
            if not self._closing:
                loop = asyncio.get_running_loop()
                self._timers[delivery.id] = loop.call_later(
                    STORE_RETRY_SECONDS, lambda: self._record(delivery, what, again=True)
                )
            return
        if again:
            log.info("%s: its try %d is recorded", what, delivery.tries)
        if delivery.state == "pending":
            if not self._closing:
                self._arm(delivery)
        elif job_may_expire:  # its last pending delivery: the job goes, if the history's rules no longer keep it
            self.engine.history.callbacks_done()

    def _summary(self, job: Job) -> dict[str, Any]:
        attempts = self.store.attempts(job.id)
        return {**job.to_json(), "last_attempt": attempts[-1].to_json() if attempts else None}

    async def _http(self, delivery: CallbackDelivery, job: Job, summary: dict[str, Any], tries: int) -> str | None:
        async with self._http_turns:
            return await self._http_try(delivery, job, summary, tries)

    async def _http_try(self, delivery: CallbackDelivery, job: Job, summary: dict[str, Any], tries: int) -> str | None:
        import aiohttp  # on first use: see jobd/engine/http_task.py

        spec = delivery.spec["http"]
        if self._session is None:
            self._session = new_session()
        url = spec["url"].replace(JOB_ID, str(job.id))
        headers = {**spec.get("headers", {}), "X-Jobd-Event": delivery.event, "X-Jobd-Try": str(tries)}
        timeout = aiohttp.ClientTimeout(total=spec.get("timeout", HTTP_TIMEOUT))
        # No redirect is followed: aiohttp would turn the POST into a GET without the summary and count the page it
        # lands on as the delivery. A 3xx is a failed try, as any status from 300 on.
        if spec["method"] == "GET":
            request = self._session.get(
                url, params={"jobid": str(job.id)}, headers=headers, timeout=timeout, allow_redirects=False
            )
        else:
            request = self._session.post(url, json=summary, headers=headers, timeout=timeout, allow_redirects=False)
        try:
            async with request as response:
                # The status decides; the body is never read: an endless (or only huge) one would be held in jobd's
                # memory. Leaving it unread closes the connection instead of keeping it for another callback.
                if response.status >= 300:
                    return f"HTTP status {response.status}"
        except aiohttp.ClientError as exc:
            return _failure(exc)
        return None

    async def _exec(self, delivery: CallbackDelivery, job: Job, summary: dict[str, Any], tries: int) -> str | None:
        user = job_account(job.spec)  # the job's own user (None: jobd's)
        # Beside the job's own output, so that it expires with the job (its directory is removed whole).
        base = os.path.join(self.engine.output_dir, str(job.id), f"callback-{delivery.id}")
        env = {
            "PATH": DEFAULT_PATH,
            "JOBD_JOB_ID": str(job.id),
            "JOBD_QUEUE": job.spec.queue,
            "JOBD_STATE": str(job.state),
            "JOBD_EXIT_CODE": "" if job.exit_code is None else str(job.exit_code),
            "JOBD_EVENT": delivery.event,
            "JOBD_CALLBACK_TRY": str(tries),
        }
        if user is not None:
            name = user.name or str(user.uid)
            env.update(HOME=user.home, USER=name, LOGNAME=name)
        launch = LaunchSpec(
            argv=delivery.spec["exec"],
            env=env,
            cwd=user.home if user is not None and os.path.isdir(user.home) else "/",
            cwd_fallback="/",  # a home its user may not enter: as a login does
            stdin=json.dumps(summary).encode(),
            stdout_path=base + ".stdout",
            stderr_path=base + ".stderr",
            log_path=base + ".log",
            max_output=EXEC_OUTPUT,
            uid=user.uid if user is not None else None,
            gid=user.gid if user is not None else None,
            groups=user.groups if user is not None else (),
        )
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[ExitInfo] = loop.create_future()

        def exited(info: ExitInfo) -> None:
            if not ended.done():
                ended.set_result(info)

        # The try before this one wrote the same files: a stream this try leaves empty (it makes no file) would show
        # the earlier try's output as its own.
        _remove_output(base)
        child = Child.spawn(launch, loop, on_exit=exited, on_progress=_ignore, on_log=_ignore_log, on_output=_nothing)
        self._children[delivery.id] = (child, ended)
        try:
            try:
                info = await asyncio.wait_for(asyncio.shield(ended), EXEC_TIMEOUT)
            except TimeoutError:
                child.stop(2.0)
                await ended
                return f"timed out after {EXEC_TIMEOUT:g}s"
        finally:
            self._children.pop(delivery.id, None)
            self._forget_output_of_expired(job.id, base)
        if info.internal_error is not None:  # its exit status says nothing: jobd lost it (proc.Child._contained)
            return f"internal error in jobd (see its log): {info.internal_error}"
        if info.exit_code == 0:
            return None
        return f"exit code {info.exit_code}" if info.exit_code is not None else f"signal {info.signal}"

    def _forget_output_of_expired(self, job_id: int, base: str) -> None:
        """The job expired from the history while its callback ran: the callback's output, written after its
        directory went, made the directory anew; nothing would ever remove it again."""
        if self.store.get_job(job_id) is not None:
            return  # the history removes the directory, callback output and all, when the job expires
        _remove_output(base)
        with contextlib.suppress(OSError):  # gone already, or holding the output of another of its callbacks
            os.rmdir(os.path.dirname(base))

    async def close(self) -> None:
        """Stop delivering: what is pending stays in the table for the next start."""
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks.values())
        if tasks:  # deliveries under way get a moment to end (and be recorded) before they are abandoned
            await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
        # An exec callback still running is stopped, and waited for: left to run, it would outlive jobd and run again,
        # beside itself, at the next start. Its delivery is abandoned first, so that the stop does not count as one
        # of its tries: it stays pending as it was.
        ends = []
        for child, ended in list(self._children.values()):
            child.stop(STOP_KILL_GRACE)
            ends.append(ended)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ends:
            await asyncio.wait(ends)  # SIGKILL after STOP_KILL_GRACE: not long
        if self._session is not None:
            await self._session.close()
            self._session = None


def _replace(delivery: CallbackDelivery, **changes: Any) -> CallbackDelivery:
    return dataclasses.replace(delivery, **changes)


def _remove_output(base: str) -> None:
    """Remove an exec callback's output files (BASE.stdout, .stderr, .log), those that exist."""
    for suffix in (".stdout", ".stderr", ".log"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base + suffix)


def _ignore(_: object) -> None:
    pass


def _nothing() -> None:
    pass


def _ignore_log(_line: str, _cut: bool) -> None:
    pass


def _back_off(tries: int) -> float:
    """Seconds between a delivery's try number `tries` that failed and its next (0 before its first)."""
    return 0.0 if tries == 0 else min(MAX_DELAY, FIRST_DELAY * 2 ** (tries - 1))


def _failure(error: BaseException) -> str:
    """A failed delivery, said in the delivery's record: the exception's type and text."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
