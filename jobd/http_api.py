"""The HTTP listener (docs/http.md): Queue Server compatible endpoints, JSON endpoints mirroring the JSON-RPC
methods, Server-Sent Events and Prometheus metrics, on aiohttp.web.

Who a client is: a bearer token from `[http.tokens.NAME]` (compared in constant time on its SHA-256), or on a unix
socket, the peer credentials (SO_PEERCRED) as on the API socket. Either gives a `Peer`, and every call goes through
`Api.call`, so the rights are those of the socket API.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import hmac
import logging
import os
import re
import socket
import weakref
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from jobd import activation, users
from jobd.api import EVENT_TYPES, AfterReplyWork, Api, EventFilter, Params, checked_job
from jobd.engine import access
from jobd.engine.core import JobEvent
from jobd.engine.http_task import HttpSpecError, check_request
from jobd.engine.instances import InstanceEvent
from jobd.errors import (
    InsufficientRights,
    InvalidParams,
    JobdError,
    MethodNotFound,
    OutOfResources,
    OutputMissing,
    ParseError,
    StartupError,
    StoreFailed,
    TimedOut,
    UnknownInstance,
    UnknownJob,
    UnknownQueue,
    UnknownSchedule,
    UnknownTask,
    UnknownWorkflow,
    memory_shortage,
)
from jobd.linux import peer_credentials
from jobd.model import (
    DEFAULT_PRIORITY,
    FINISHED_STATES,
    MAX_PRIORITY,
    Config,
    Job,
    JobState,
    ObjectKind,
    Outcome,
    Right,
    host_port,
)
from jobd.peer import Peer, identify_peer
from jobd.protocol import jsonrpc
from jobd.protocol.jsonrpc import encode_text
from jobd.server import LINGER_SECONDS, REFUSED_LINGERING, bind_unix
from jobd.store import refused_request

log = logging.getLogger("jobd.http")
# What aiohttp raises about a request that is not HTTP it can read (a bad request line or header, a chunk length
# that is none): the client's mistake, never jobd's. (Content-Encoding is jobd's to read: _decoded.)
_UNREADABLE = (HttpProcessingError, web.RequestPayloadError)


class _NoClientMistakes(logging.Filter):
    """Leaves out aiohttp's errors, each with its traceback, about requests that are not HTTP it can read: a request
    line or header it refuses, a body it cannot frame (also one jobd left unread, which aiohttp reads after the
    answer, a 401's too). The client is answered 400 (or 401); logged, anyone who reaches the port could fill
    jobd's log without a token. aiohttp's other errors are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        return not isinstance(failure, _UNREADABLE)


_SERVER_LOG = logging.getLogger("jobd.http.server")  # aiohttp's own messages about connections and requests
_SERVER_LOG.addFilter(_NoClientMistakes())

EVENT_RING = 10_000  # events kept for a reconnect with Last-Event-ID (docs/http.md)
# ... and at most about this many bytes of them. A job's fd 3 log lines are up to 64 KiB each (proc.MAX_LOG_LINE):
# counted in events alone, the ring of a job printing long lines held 10,000 of them, 690 MB of jobd's memory, for
# good (until 10,000 other events pushed them out).
EVENT_RING_BYTES = 16 * 1024 * 1024
MAX_BODY = 1024 * 1024
# At a stop, seconds a request still under way (its body coming, its answer going) gets to end, and as long again
# to end once cancelled: jobd's stop answers the requests that wait (job.wait, job.output) before it closes HTTP.
SHUTDOWN_GRACE = 1.0
SHUTDOWN_TAKES = 2 * SHUTDOWN_GRACE + 1.0  # HttpApi.close() at most
QS_DEFAULT_PRIORITY = 500  # Queue Server's default; higher runs sooner there
SSE_QUEUE = 10_000  # events pending for one slow SSE client before it is cut off
SSE_QUEUE_BYTES = 16 * 1024 * 1024  # or bytes of them: its events stay alive for it when the ring has let them go
EVENT_OVERHEAD = 1024  # about what an event takes besides the texts counted by _event_size (its dicts, ids, times)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
_NOT_FOUND = (UnknownJob, UnknownQueue, UnknownTask, UnknownWorkflow, UnknownInstance, UnknownSchedule, MethodNotFound)
_CLIENT_KEY = "jobd.client"
_EVENT_FILTERS = ("instances", "jobs", "queues", "types", "workflows")  # GET /events's query parameters
_LAST_EVENT_ID_PARAMETER = "lastEventId"  # ... and where EventSource polyfills put Last-Event-ID on a reconnect
# A handler whose client has gone is cancelled, as the API socket cancels a gone client's requests. From aiohttp 3.9
# on it is asked for; Debian 12's aiohttp 3.8 does not do it, and jobd does it itself (HttpApi._cancel_when_gone).
# Without it, an event stream that nothing is written to (its filter matches nothing now) would wait for its next
# event, holding its place against max_connections, long after its client left.
_RUNNER_OPTIONS: dict[str, Any] = (
    {"handler_cancellation": True} if tuple(map(int, aiohttp.__version__.split(".")[:2])) >= (3, 9) else {}
)


def _seconds(variable: str, default: float) -> float:
    # JOBD_HTTP_FIRST_REQUEST_SECONDS and JOBD_HTTP_KEEPALIVE_SECONDS are for tests only (docs/http.md): they cannot
    # wait 30 s for an idle connection or a quiet stream.
    try:
        value = float(os.environ.get(variable, ""))
    except ValueError:
        return default
    return value if value > 0 else default


# A connection that sends no request within this long is closed.
FIRST_REQUEST_SECONDS = _seconds("JOBD_HTTP_FIRST_REQUEST_SECONDS", 30.0)
# A request's body must have come whole within this long of its head: one that never comes (a Content-Length it does
# not send) held its request, and its place against max_connections, for good.
BODY_SECONDS = FIRST_REQUEST_SECONDS
# A GET /events stream with nothing to send for this long gets a comment line. Proxies in front of jobd close a
# response that stays silent (nginx's proxy_read_timeout is 60 s), and a client gone without a word (a laptop
# suspended, a NAT mapping dropped) is found only by a write. The timer runs only while a stream is open and quiet:
# an idle jobd with no stream open still makes no system call.
KEEPALIVE_SECONDS = _seconds("JOBD_HTTP_KEEPALIVE_SECONDS", 30.0)


def _address_of(server: asyncio.Server) -> tuple[str, int]:
    """(host, port) of a TCP listener, its port as bound (port 0 picks one)."""
    host, port = server.sockets[0].getsockname()[:2]
    return str(host), int(port)


class _Refused(asyncio.Protocol):
    """A connection over the limit: one 503 answer, then the end of the connection, ended gently as the API
    socket's refusals are: jobd's side is shut (the client reads the answer, then an end of file) and what the client
    sends is read and dropped until it closes its side, for LINGER_SECONDS at the most. Closed at once, a request the
    client sent after the answer was written (as clients do: they connect, then send) met a reset, and the client saw
    a broken pipe or a reset connection instead of the 503. At most REFUSED_LINGERING linger (`lingering`, shared by
    the listener's refusals), each holding a descriptor; past that, one is closed once its answer is written."""

    def __init__(self, message: str, lingering: set[_Refused]) -> None:
        self.message = message
        self.lingering = lingering
        self.transport: asyncio.BaseTransport | None = None  # while it lingers
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        body = encode_text({"error": {"code": "TOO_MANY_CONNECTIONS", "message": self.message}}).encode()
        head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        transport.write(head.encode() + body)
        if len(self.lingering) >= REFUSED_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        self.lingering.add(self)
        self.transport = transport
        transport.write_eof()
        self.deadline = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        """Dropped: the request has been answered."""

    def eof_received(self) -> bool:
        return False  # the client has closed its side: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lingering.discard(self)
        if self.deadline is not None:
            self.deadline.cancel()


def qs_priority(value: int) -> int:
    """Queue Server's priority (higher first, default 500) onto jobd's (lower first, default 1024):
    jobd = 1024 + (500 - value), clamped to 0..MAX_PRIORITY; so 500 is jobd's default and 800 runs before it."""
    return max(0, min(MAX_PRIORITY, DEFAULT_PRIORITY + QS_DEFAULT_PRIORITY - value))


@dataclass(slots=True)
class _Event:
    """One event of the ring: what it says (`data`), and what the filters and rights look at."""

    id: int
    type: str
    data: dict[str, Any]
    job: tuple[int, str | None, str] | None = None  # a job event's (job id, task, queue)
    instance: InstanceEvent | None = None  # an instance event
    size: int = EVENT_OVERHEAD  # about the bytes it holds: what EVENT_RING_BYTES and SSE_QUEUE_BYTES count


class _Pending(asyncio.Queue["_Event | None"]):
    """The events of one GET /events client not written yet (None: it is cut off), and about how many bytes; and
    who the client is, which a reload may change (HttpApi.reloaded)."""

    def __init__(self, peer: Peer, authorization: str = "", connection: asyncio.Transport | None = None) -> None:
        super().__init__()
        self.size = 0
        self.peer = peer
        self.authorization = authorization  # the request's Authorization header, "" without one
        self.connection = connection

    def cut_off(self) -> None:
        """End the stream: its events go now, and its connection too, not once the client reads again. Its handler
        may wait for a write that a client not reading never lets finish: the events queued behind it would stay
        alive meanwhile, and the connection with its buffers for as long as the client liked."""
        while not self.empty():
            self.get_nowait()
        self.size = 0
        self.put_nowait(None)
        if self.connection is not None:
            # What the kernel holds already still reaches the client, then the end; the handler's waiting write
            # fails and it returns.
            self.connection.abort()


def _event_size(event: JobEvent, data: dict[str, Any]) -> int:
    """About the bytes a job event holds: what varies is a log line, and a state event's texts that a client chose
    (its command, context, key, HTTP request; each up to a request's 1 MiB)."""
    if event.line is not None:
        return EVENT_OVERHEAD + len(event.line)
    if event.type != "job.state":
        return EVENT_OVERHEAD
    job = event.job
    spec = job.spec
    size = EVENT_OVERHEAD + sum(map(len, spec.command)) + len(spec.context or "") + len(spec.key or "")
    size += len(spec.task or "") + len(job.error or "")
    if spec.http is not None:
        size += _text_size(data["job"]["http"])
    return size


def _text_size(value: Any) -> int:
    """About the bytes of the texts in a JSON value (its strings, keys included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(key) + _text_size(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_size(item) for item in value)
    return 0


class _TokenGone(Exception):
    """The token a request came with is no longer configured: the request is answered as one without a valid
    token is (401).

    Not a JobdError, and never in an audit entry: Api.call asks for the peer of a method's entry first (this, raised
    there, ends the request with nothing done), and the coroutine of a method that waits is awaited at once (rpc),
    so that its own checks run in that same step of the loop, under the same configuration. Only what follows its
    first wait meets a reload: the re-checks of reads (api.while_allowed), which are not audited; a method that
    changes something (job.cancel) does not ask for its client again once it has waited."""


@dataclass(slots=True)
class _Client:
    """Who sent a request: its Authorization header ("" without one), and its peer as `config` saw it."""

    authorization: str
    peer: Peer
    config: Config


class _HttpSession:
    """An `api.Session` for one HTTP request: events are served by /events, not by events.subscribe. Its peer is
    its client as the configuration in force sees it: a request still waiting at a reload (job.wait, instance.wait)
    is checked again as its token now is (api.while_allowed), not as it was when the request came."""

    methods_not_served = frozenset({"events.subscribe"})

    def __init__(self, http: HttpApi, client: _Client) -> None:
        self._http = http
        self._client = client
        self.handed_over = AfterReplyWork()

    @property
    def peer(self) -> Peer:
        client = self._client
        config = self._http.api.engine.config
        if client.config is not config:  # a reload since the client was identified
            peer = self._http.peer_now(client.authorization, client.peer)
            if peer is None:
                raise _TokenGone
            self._client = _Client(client.authorization, peer, config)
        return self._client.peer

    def subscribe(self, selection: EventFilter) -> int:
        raise InvalidParams("events.subscribe is not available over HTTP; use GET /events (Server-Sent Events)")

    def after_reply(self, work: Callable[[], None]) -> None:
        self.handed_over.add(work)

    async def ready_for_reply(self) -> None:
        """One request at a time on an HTTP connection: its answer is the only one jobd makes for it."""


class HttpApi:
    def __init__(self, api: Api, listen: tuple[str, int] | str, connection_count: Callable[[], int]) -> None:
        self.api = api
        self.listen = listen
        self.connection_count = connection_count  # the API and evQueue sockets' clients
        self.address: str | None = None  # `host:port` (`[host]:port` for IPv6) or the unix socket path, once bound
        self.tcp_address: tuple[str, int] | None = None  # a TCP listener's (host, port) as bound
        self.ring: deque[_Event] = deque()  # at most EVENT_RING events, and about EVENT_RING_BYTES
        self.ring_size = 0  # the sum of its events' sizes
        self.next_id = 1
        self.clients: set[_Pending] = set()
        self.active = 0
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.spawn_failures = 0
        self._unsubscribe = api.engine.subscribe(self._on_event)
        self._unsubscribe_instances = api.instances.subscribe(self._on_instance_event)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._accepted = 0  # connections taken in this turn of the loop, before aiohttp counts them (see _connection)
        self._refused_lingering: set[_Refused] = set()  # refused connections reading what their clients still send
        self._served: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()  # connections a request came on
        self._requests: dict[asyncio.BaseTransport, asyncio.Task[Any]] = {}  # the request each connection serves now
        # Each open connection's FIRST_REQUEST_SECONDS timer (_connection), cancelled when the connection is lost: a
        # timer left to run held its closed connection's handler for those 30 s, thousands under a busy web page.
        self._idle_deadlines: dict[asyncio.BaseProtocol, asyncio.TimerHandle] = {}
        self.adopted = False  # listening on a socket systemd passed (bind)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        app.router.add_post("/jobs/add", self.jobs_add)
        app.router.add_get("/jobs/status", self.jobs_status)
        app.router.add_get("/jobs/status/{id}", self.job_status)
        app.router.add_post("/api/{method}", self.rpc)
        # No HEAD: aiohttp would run the stream for it, its events sent as a body no HEAD answer may have.
        app.router.add_get("/events", self.events, allow_head=False)
        app.router.add_get("/metrics", self.metrics)
        self.app = app

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def bind(self, passed: socket.socket | None = None, access: tuple[int, int | None] = (0o660, None)) -> None:
        """Listen on `self.listen`, or on `passed`, a socket systemd handed over (jobd.activation): then served as
        it is (its unit set its mode), `self.listen` becomes its address, and it is not unlinked on close. A unix
        socket of jobd's own gets `access`, the mode and group of the API socket."""
        # auto_decompress=False: aiohttp would inflate a compressed body as it arrives, whoever sends it (before the
        # token is looked at) and however far it inflates; jobd does it itself, up to MAX_BODY (_decoded).
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            logger=_SERVER_LOG,
            auto_decompress=False,
            **_RUNNER_OPTIONS,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self._forget_idle_deadlines(self._runner.server)
        if not _RUNNER_OPTIONS:
            self._cancel_when_gone(self._runner.server)
        loop = asyncio.get_running_loop()
        # aiohttp's sites would take every connection; jobd's own listener takes at most max_connections at once
        # (connections nobody sends a request on held descriptors until jobd had none left).
        try:
            if passed is not None:
                self.adopted = True
                self.listen = activation.socket_address(passed)
                adopted = await loop.create_server(self._connection, sock=passed, start_serving=False)
                self._listener = adopted
                if not isinstance(self.listen, str):
                    self.tcp_address = _address_of(adopted)
            elif isinstance(self.listen, str):  # mode and group as the API socket's
                self._listener = await bind_unix(self.listen, self._connection, *access)
            else:
                host, port = self.listen
                tcp = await loop.create_server(self._connection, host, port, reuse_address=True, start_serving=False)
                self._listener = tcp
                self.tcp_address = _address_of(tcp)
            self.address = host_port(*self.tcp_address) if self.tcp_address is not None else str(self.listen)
            await self._listener.start_serving()
        except OSError as error:
            # asyncio's bind error has errno but its own strerror, which quotes the address as a tuple
            reason = os.strerror(error.errno) if error.errno else str(error)
            where = self.listen if isinstance(self.listen, str) else host_port(*self.listen)
            raise StartupError(f"cannot listen for HTTP on {where} ([http] listen): {reason}") from None

    def own_unix_socket(self) -> list[str]:
        """The unix socket jobd bound for HTTP (its mode and group are the API socket's), if it did."""
        return [self.listen] if isinstance(self.listen, str) and not self.adopted and self._listener else []

    def _connection(self) -> asyncio.BaseProtocol:
        """aiohttp's handler for a new connection, or, past `[daemon] max_connections` HTTP connections open at
        once, a 503 answer and the end of the connection. One that sends no request within FIRST_REQUEST_SECONDS is
        closed: idle connections would keep the places of those that have requests."""
        assert self._runner is not None and self._runner.server is not None
        limit = self.api.engine.config.daemon.max_connections
        # aiohttp counts a connection once its connection_made has run, in a later turn of the loop than this one:
        # the connections taken in one batch of accepts are counted here until then.
        if len(self._runner.server.connections) + self._accepted >= limit:
            message = f"too many connections: {limit} HTTP connections are open ([daemon] max_connections)"
            return _Refused(message, self._refused_lingering)
        loop = asyncio.get_running_loop()
        if not self._accepted:
            loop.call_soon(loop.call_soon, self._counted_by_aiohttp)  # after the connection_made calls now due
        self._accepted += 1
        handler = self._runner.server()
        self._idle_deadlines[handler] = loop.call_later(FIRST_REQUEST_SECONDS, self._close_if_idle, handler)
        return handler

    def _forget_idle_deadlines(self, server: web.Server) -> None:
        """Cancel a connection's FIRST_REQUEST_SECONDS timer when aiohttp tells its server the connection is lost."""
        lost = server.connection_lost

        def connection_lost(handler: RequestHandler, failure: BaseException | None) -> None:
            lost(handler, failure)
            deadline = self._idle_deadlines.pop(handler, None)
            if deadline is not None:
                deadline.cancel()

        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]

    def _cancel_when_gone(self, server: web.Server) -> None:
        """Cancel the request under way on a connection when the connection is lost, as aiohttp does from 3.9 on when
        asked. Debian 12's aiohttp 3.8 let it run on: an event stream whose client had left stayed, counted against
        max_connections, until an event came for it (for a filter matching nothing now, never): with a handful of
        such streams every request was answered 503 for good (found by a soak test); and a client gone in the middle
        of its body was logged as a bug in jobd, with its traceback. aiohttp tells its server of each lost
        connection, the connection's transport still known."""
        lost = server.connection_lost

        def connection_lost(handler: RequestHandler, failure: BaseException | None) -> None:
            transport = handler.transport
            lost(handler, failure)
            request = self._requests.pop(transport, None) if transport is not None else None
            if request is not None:
                request.cancel()

        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]

    def _counted_by_aiohttp(self) -> None:
        self._accepted = 0

    def _close_if_idle(self, handler: asyncio.BaseProtocol) -> None:
        self._idle_deadlines.pop(handler, None)
        transport = getattr(handler, "transport", None)  # None once the connection is over
        if transport is not None and transport not in self._served:
            transport.close()

    async def close(self) -> None:
        """Stop serving: the event streams end, each request still under way gets SHUTDOWN_GRACE to end and is then
        cancelled, and the connections close; at most SHUTDOWN_TAKES."""
        self._unsubscribe()
        self._unsubscribe_instances()
        for client in list(self.clients):
            if client.connection is not None and client.connection.get_write_buffer_size():
                client.cut_off()  # its client has not read what it was sent: the end would wait for it
            else:
                client.put_nowait(None)
        if self._listener is not None:
            self._listener.close()
        for refused in list(self._refused_lingering):  # their answers are written; what they send is not waited for
            if refused.transport is not None:
                refused.transport.close()
        if self._runner is not None:
            if self._runner.server is not None:
                # runner.cleanup() alone waited for requests under way up to aiohttp's minute, twice (from 3.9 on),
                # and for a stream whose client did not read; aiohttp 3.8's ended no connection (it ends its sites'
                # only, and jobd has none), and the loop's end then waited for a kept-alive one to time out (75 s).
                # systemd SIGKILLed jobd after TimeoutStopSec= instead. Idle connections close at once.
                for handler in list(self._runner.server.connections):
                    handler.close()
                await self._runner.server.shutdown(SHUTDOWN_GRACE)
            await self._runner.cleanup()
        if isinstance(self.listen, str) and not self.adopted:  # an adopted socket is its socket unit's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen)

    # -- authentication and limits -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        limit = self.api.engine.config.daemon.max_connections
        if self.active + self.connection_count() >= limit:
            return _error(503, "TOO_MANY_CONNECTIONS", f"too many connections: {limit} ([daemon] max_connections)")
        self.active += 1
        try:
            config = self.api.engine.config
            peer = self._identify(request)
            if peer is None:
                return _unauthorized()
            request[_CLIENT_KEY] = _Client(request.headers.get("Authorization", ""), peer, config)
            transport, task = request.transport, asyncio.current_task()
            if transport is None or task is None:  # the client has gone already
                return await handler(request)
            self._served.add(transport)
            self._requests[transport] = task  # what _cancel_when_gone cancels
            try:
                return await handler(request)
            finally:
                if self._requests.get(transport) is task:
                    del self._requests[transport]
        except web.HTTPException:
            raise
        except _TokenGone:  # at a reload while the request waited, or while its body came
            # Logged, as an event stream ended for its token is: its client had been let in. Not audited, as no
            # request without a valid token is (the audit entry of a method is made only once its client is known
            # under the configuration in force, Api.call).
            log.info("a %s %s client's token is no longer configured; answered 401", request.method, request.path)
            return _unauthorized()
        except JobdError as failure:
            answer = _failure(failure)
            if isinstance(failure, _BODY_NOT_READ):
                # `Connection: close`: what comes of the body after the answer is no next request. aiohttp reads and
                # drops it for up to 10 s (its lingering close), so that the client reads the answer, not a reset.
                answer.force_close()
            return answer
        except Exception as failure:  # the request boundary, as the API socket's: a bug is logged and answered
            what = f"{request.method} {request.path}"
            if (store_failed := refused_request(what, failure)) is not None:
                self.api.engine.write_refused(what, store_failed)
                return _failure(store_failed)
            if (short := memory_shortage(failure)) is not None:
                return _failure(short)
            log.error("internal error in %s", what, exc_info=failure)
            return _failure(JobdError(f"internal error: {type(failure).__name__}: {failure}"))
        finally:
            self.active -= 1

    def _identify(self, request: web.Request) -> Peer | None:
        header = request.headers.get("Authorization", "")
        if _has_token(header):
            return self._token_peer(header)
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        if sock is not None and sock.family == socket.AF_UNIX:  # asyncio's TransportSocket
            credentials = peer_credentials(sock)
            return identify_peer(credentials.pid, credentials.uid, credentials.gid, self.api.engine.config.access)
        return None

    def _token_peer(self, header: str) -> Peer | None:
        """Who the bearer token of an Authorization header is, under the configuration in force; None for a token
        that is none of `[http.tokens]`."""
        # The token's bytes as sent: aiohttp hands bytes that are not UTF-8 over as surrogate escapes, which a plain
        # encode() refuses (an unauthenticated client's 500 and traceback); they match no token.
        digest = hashlib.sha256(header[7:].strip().encode(errors="surrogateescape")).hexdigest()
        config = self.api.engine.config
        found = None
        for token in config.http.tokens.values():
            if hmac.compare_digest(digest, token.token_sha256):
                found = token
        if found is None:
            return None
        admin = found.admin or access.is_admin(config.access, found.user, found.groups)
        try:  # a local account: what ad-hoc commands and run_as = "caller" tasks run as
            # OutOfResources, answered 503, when jobd has no descriptor to read the passwd database with: "no such
            # user" then would make a local user a remote client, refused what its account may do.
            uid, gid = users.user_ids(found.user, "ask again later")
        except KeyError:
            uid = gid = -1  # a remote user: configured tasks only
        return Peer(uid=uid, gid=gid, pid=0, is_admin=admin, user=found.user, groups=found.groups)

    def peer_now(self, authorization: str, peer: Peer) -> Peer | None:
        """Who a client identified as `peer` (by the Authorization header `authorization`) is under the configuration
        in force; None when its token is no longer configured. A token's client is wholly what its table says (its
        `admin` too, whatever uid its user has); a unix socket client without one stays who it is, but whether it
        is an admin is what `[access] admins` now says (Peer.under). OutOfResources as for _token_peer."""
        if _has_token(authorization):
            return self._token_peer(authorization)
        return peer.under(self.api.engine.config.access)

    def reloaded(self) -> None:
        """After a reload, each GET /events stream follows its client as the configuration now says (peer_now). A
        stream whose token is gone ends now, as a request with it would be refused."""
        for client in list(self.clients):
            try:
                peer = self.peer_now(client.authorization, client.peer)
            except OutOfResources as short:
                # Who its user is now cannot be told (no descriptor to read the passwd database with): the stream
                # ends, as one whose token is gone does, rather than follow its client as someone it may not be.
                log.warning("disconnecting a GET /events client: %s", short.message)
                self._disconnect(client)
                continue
            if peer is None:
                log.info("a GET /events client's token is no longer configured; disconnecting it")
                self._disconnect(client)
            else:
                client.peer = peer

    def _disconnect(self, client: _Pending) -> None:
        self.clients.discard(client)
        client.cut_off()

    # -- JSON endpoints ------------------------------------------------------------------------------------

    def _call(self, request: web.Request, method: str, params: dict[str, Any]) -> Any:
        """api.Api.call, then what the call handed over to be done after its reply. aiohttp sends the response
        only after the handler returns, so here that work comes first; the result is made before it all the same
        (a submitted job reads as committed, `queued`, as over the socket)."""
        session = _HttpSession(self, request[_CLIENT_KEY])
        session.handed_over.begin()
        try:
            return self.api.call(session, method, params)
        finally:
            session.handed_over.run()

    async def rpc(self, request: web.Request) -> web.Response:
        params = await _json_body(request)
        if not isinstance(params, dict):
            raise InvalidParams("the body must be a JSON object: the method's params")
        method = request.match_info["method"]
        if method.startswith("event."):
            raise MethodNotFound(f"{method} is not available over HTTP; use GET /events", method=method)
        value = self._call(request, method, params)
        if asyncio.iscoroutine(value):
            value = await value
        return _json_response({"result": value})

    # -- Queue Server ----------------------------------------------------------------------------------------

    async def jobs_add(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidParams("the body must be a Queue Server job object")
        priority = body.get("priority", QS_DEFAULT_PRIORITY)
        if isinstance(priority, str):  # PHP clients may send it as a string
            priority = _integer(priority)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidParams("priority: expected an integer (higher runs sooner, default 500)", param="priority")
        context = body.get("context")
        command = body.get("command")
        if not isinstance(command, dict) or command.get("type") not in ("http", "exec"):
            raise InvalidParams('command: expected {"type": "http", "url": ...} or {"type": "exec", "cmd": ...}')
        params: dict[str, Any] = {"priority": qs_priority(priority)}
        if command["type"] == "exec":
            cmd = command.get("cmd")
            if not isinstance(cmd, str) or not cmd:
                raise InvalidParams("command.cmd: expected a non-empty string (run by /bin/sh -c)", param="cmd")
            params["command"] = ["/bin/sh", "-c", cmd]
        else:
            try:  # an HTTP job (jobd.engine.http_task), its request checked as job.submit's "http"
                params["http"] = _as_form(check_request(command))
            except HttpSpecError as error:
                raise InvalidParams(f"command: {error}", param="command") from None
        if context is not None:  # Queue Server's free label: a number or an object kept as the JSON it was sent as
            params["context"] = context if isinstance(context, str) else encode_text(context)
        callbacks = _callbacks(body.get("callback_done"))
        if callbacks is not None:
            params["callbacks"] = callbacks
        # Submitted as job.submit itself: the same rights, the same audit entry, and with durability = "fsync" the
        # answer waits for the fsync, as over the socket.
        value = self._call(request, "job.submit", params)
        if asyncio.iscoroutine(value):
            value = await value
        return _json_response({"status": "OK", "job_id": value["id"]})

    async def jobs_status(self, request: web.Request) -> web.Response:
        peer = _peer(request)
        config = self.api.engine.config
        waiting = working = slots = 0
        for queue in self.api.engine.queue_list():
            if not access.may(config.access, peer, Right.READ, ObjectKind.QUEUE, queue.name):
                continue
            waiting += queue.ready_count() + self.api.engine.delayed_count(queue.name)
            working += len(queue.running)
            slots += queue.definition.concurrency
        data = {"waiting": waiting, "working": working, "max_threads": slots, "free_threads": max(0, slots - working)}
        return _json_response({"status": 200, "data": data})

    async def job_status(self, request: web.Request) -> web.Response:
        job_id = _integer(request.match_info["id"])
        if job_id is None:  # no job has such an id
            return _error(404, "UNKNOWN_JOB", "no such job")
        job = checked_job(self.api, _peer(request), Right.READ, job_id)
        worker_status = {JobState.RUNNING: 1, JobState.SUCCEEDED: 3}.get(job.state, 0)
        if job.state in FINISHED_STATES and job.state != JobState.SUCCEEDED:
            worker_status = 99
        data = job.to_json()
        return _json_response(
            {
                "id": job.id,
                "worker_status": worker_status,
                "time_added": data["created_at"],
                "time_completed": data["finished_at"],
                "priority": job.spec.priority,
                "state": data["state"],
            }
        )

    # -- events ------------------------------------------------------------------------------------------------

    def _on_event(self, event: JobEvent) -> None:
        job = event.job
        if event.type == "job.state" and job.state in FINISHED_STATES:
            self._finished(job)
        where = (job.id, job.spec.task, job.spec.queue)
        data = event.to_json()
        self._add(_Event(self.next_id, event.type, data, job=where, size=_event_size(event, data)))

    def _on_instance_event(self, event: InstanceEvent) -> None:
        # An instance's parameters, comment and custom attributes are a client's, up to a request's 1 MiB.
        data = event.to_json()
        self._add(_Event(self.next_id, event.type, data, instance=event, size=EVENT_OVERHEAD + _text_size(data)))

    def _add(self, item: _Event) -> None:
        self.next_id += 1
        self.ring.append(item)
        self.ring_size += item.size
        while len(self.ring) > EVENT_RING or (self.ring_size > EVENT_RING_BYTES and len(self.ring) > 1):
            self.ring_size -= self.ring.popleft().size
        for client in list(self.clients):
            if client.qsize() >= SSE_QUEUE or client.size + item.size > SSE_QUEUE_BYTES:
                log.warning(
                    "a GET /events client does not read its events (%d, about %d bytes, wait unsent); disconnecting it",
                    client.qsize(),
                    client.size,
                )
                self.clients.discard(client)
                client.cut_off()
            else:
                client.size += item.size
                client.put_nowait(item)

    def _finished(self, job: Job) -> None:
        started, finished = job.started_at, job.finished_at
        if job.state == JobState.FAILED and job.exit_code is None and job.signal is None:
            # No exit status: a program that could not start, but also an HTTP job's failed request or an attempt
            # lost in a crash, which ran. The last attempt tells them apart (a read only for such failures).
            tries = self.api.engine.attempts(job.id)
            if tries and tries[-1].outcome == Outcome.SPAWN_ERROR:
                self.spawn_failures += 1
                return
        if started is not None and finished is not None:
            seconds = max(0.0, finished - started)
            self.duration_sum += seconds
            self.duration_count += 1
            for index, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    self.durations[index] += 1
                    break
            else:
                self.durations[-1] += 1

    async def events(self, request: web.Request) -> web.StreamResponse:
        peer = _peer(request)
        # Read as events.subscribe reads its params, and refused alike: a name jobd does not know (`?job=3`) and a
        # value it cannot read, each named with what is allowed, the value quoted as the client sent it. Dropped,
        # either would widen the stream to every event the client may read.
        query = Params("GET /events", request.query)
        for name in (*_EVENT_FILTERS, _LAST_EVENT_ID_PARAMETER):
            query.take(name)
        query.done()
        types = frozenset(_split(query.raw.get("types")))
        if not types <= set(EVENT_TYPES):
            raise query.bad("types", " | ".join(EVENT_TYPES))
        selection = EventFilter(
            jobs=_ids(query, "jobs", "job"),
            queues=frozenset(_split(query.raw.get("queues"))),
            instances=_ids(query, "instances", "instance"),
            workflows=frozenset(_split(query.raw.get("workflows"))),
            types=types,
        )
        # The header, as EventSource sends it; or the parameter, as its polyfills send it where they cannot set one.
        given = request.headers.get("Last-Event-ID", request.query.get(_LAST_EVENT_ID_PARAMETER, ""))
        last = _integer(given)  # None: no event is replayed
        if last is not None and last < 0:  # no event has such an id: unreadable, as any other text that is none
            last = None

        pending = _Pending(peer, request.headers.get("Authorization", ""), request.transport)

        def wanted(event: _Event) -> bool:
            rules = self.api.engine.config.access
            if event.instance is not None:
                return selection.wants_instance(rules, pending.peer, event.instance)
            assert event.job is not None
            return selection.wants_job(rules, pending.peer, event.type, *event.job)

        # Registered before the replay is taken, with no await between: nothing falls between ring and live.
        backlog = [event for event in self.ring if last is not None and event.id > last]
        self.clients.add(pending)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await response.write(b": jobd events\n\n")
            for event in backlog:
                if pending not in self.clients:
                    break  # cut off during the replay (it did not read): the rest is not written
                if wanted(event):
                    await response.write(_sse(event))
            del backlog
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_SECONDS):
                        item = await pending.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")  # a comment: EventSource ignores it
                    continue
                if item is None:
                    break
                pending.size -= item.size
                if wanted(item):
                    await response.write(_sse(item))
        except ConnectionResetError:  # the client went away
            pass
        finally:
            self.clients.discard(pending)
        return response

    # -- metrics -----------------------------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        access.require_admin(_peer(request), "read the metrics")
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("jobd_jobs", "gauge", "Jobs on record by state.")
        states = dict.fromkeys((str(state) for state in JobState), 0)
        states.update(await self.api.engine.history_counts())
        for state, count in sorted(states.items()):
            out.append(f'jobd_jobs{{state="{_label(state)}"}} {count}')
        queues = self.api.engine.queue_list()
        for name, kind, help_text, value in (
            ("jobd_queue_depth", "gauge", "Jobs waiting in a queue (ready and delayed).", None),
            ("jobd_queue_running", "gauge", "Jobs running in a queue.", None),
            ("jobd_queue_concurrency", "gauge", "A queue's concurrency.", None),
        ):
            del value
            family(name, kind, help_text)
            for queue in queues:
                if name == "jobd_queue_depth":
                    number = queue.ready_count() + self.api.engine.delayed_count(queue.name)
                elif name == "jobd_queue_running":
                    number = len(queue.running)
                else:
                    number = queue.definition.concurrency
                out.append(f'{name}{{queue="{_label(queue.name)}"}} {number}')
        family("jobd_job_duration_seconds", "histogram", "Run time of finished jobs since jobd started.")
        total = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.durations, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'jobd_job_duration_seconds_bucket{{le="{le}"}} {total}')
        out.append(f"jobd_job_duration_seconds_sum {self.duration_sum!r}")
        out.append(f"jobd_job_duration_seconds_count {self.duration_count}")
        family("jobd_spawn_failures_total", "counter", "Jobs that failed because their program could not start.")
        out.append(f"jobd_spawn_failures_total {self.spawn_failures}")
        return web.Response(text="\n".join(out) + "\n", content_type="text/plain", charset="utf-8")


def _has_token(authorization: str) -> bool:
    return authorization[:7].lower() == "bearer "


def _peer(request: web.Request) -> Peer:
    """The request's client as it was identified when the request came (_HttpSession: as it is now)."""
    client = request[_CLIENT_KEY]
    assert isinstance(client, _Client)
    return client.peer


def _unauthorized() -> web.Response:
    response = _error(401, "UNAUTHORIZED", "a valid bearer token is required (Authorization: Bearer …)")
    response.headers["WWW-Authenticate"] = 'Bearer realm="jobd"'
    return response


def _split(text: str | None) -> list[str]:
    return [part for part in (text or "").split(",") if part]


# What _integer takes: at most 19 digits, so int() is cheap and never meets its limit of 4,300 digits.
_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _integer(text: str) -> int | None:
    """`text` as a client's decimal integer (a job id in a path, a Last-Event-ID, a priority sent as a string):
    ASCII digits, a minus at most, and a value that fits SQLite's 64 bits; None for anything else. int() alone
    also takes " 1", "+1", "1_0" and "²" (as 10 and 2), raises on "--5", and SQLite refuses 2**63."""
    if _INTEGER.fullmatch(text) is None:
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def _ids(query: Params, name: str, what: str) -> frozenset[int]:
    ids = [_integer(part) for part in _split(query.raw.get(name))]
    if not all(number is not None and number >= 0 for number in ids):
        raise query.bad(name, f"{what} ids, comma-separated")
    return frozenset(number for number in ids if number is not None)


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _json_response(data: Any, *, status: int = 200) -> web.Response:
    # Names the OS gave undecoded (a Latin-1 file name) as \xNN, as the socket API shows them; json.dumps would
    # send them as JSON's \udcNN escapes, which many decoders refuse.
    return web.json_response(data, status=status, dumps=encode_text)


def _sse(event: _Event) -> bytes:
    body = encode_text(event.data)
    return f"id: {event.id}\nevent: {event.type}\ndata: {body}\n\n".encode()


def _as_form(http: dict[str, Any]) -> dict[str, Any]:
    """Queue Server sends `params` as a form body (Guzzle's form_params): so does a POST, PUT, PATCH or DELETE job
    from /jobs/add without a body of its own. A GET or HEAD keeps them in the query string, where servers look."""
    if not http["params"] or http["method"] in ("GET", "HEAD") or http["body"] is not None:
        return http
    headers = dict(http["headers"])
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    return {**http, "params": {}, "body": urlencode(http["params"]), "headers": headers}


def _callbacks(raw: Any) -> dict[str, Any] | None:
    """Queue Server's `callback_done` as jobd's callbacks: on_finish (it fires on failure too)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") not in ("http", "exec"):
        raise InvalidParams('callback_done: expected {"type": "http", "url": ...} or {"type": "exec", "cmd": ...}')
    if raw["type"] == "http":
        url = raw.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidParams("callback_done.url: expected a URL", param="callback_done")
        method = raw.get("method", "GET")
        return {"on_finish": [{"http": {"url": url, "method": str(method).upper()}}]}
    cmd = raw.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise InvalidParams("callback_done.cmd: expected a non-empty string", param="callback_done")
    return {"on_finish": [{"exec": ["/bin/sh", "-c", cmd]}]}


# Codecs Python knows that are no character set of a body but encodings of host names, whose decoders take time
# growing with the square of the length: a 1 MiB body labelled `charset=punycode`, from any token, held jobd's loop
# (every client, every job's end) for half a minute.
_HOST_NAME_CODECS = frozenset({"punycode", "idna"})


_TOO_LARGE = f"the body is over {MAX_BODY // 1024 // 1024} MiB ({MAX_BODY} bytes)"


class _BodyTooLarge(InvalidParams):
    """A body its Content-Length declares over MAX_BODY: refused before any of it is read, as it may never come."""


class _BodyLate(TimedOut):
    """A body that has not come whole within BODY_SECONDS of its head: 408."""


_BODY_NOT_READ = (_BodyTooLarge, _BodyLate)  # answered before the body's end: the connection ends with the answer
# Content-Encoding -> zlib's wbits for it: gzip's header and trailer, or zlib's (deflate).
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _decoded(data: bytes, encoding: str) -> bytes:
    """The body `data` (at most MAX_BODY bytes as sent) in its Content-Encoding `encoding`, inflated to MAX_BODY
    bytes at the most: a megabyte of gzip can inflate to a gigabyte, and aiohttp, left to inflate it, held jobd's
    loop for seconds at a time (8 s of work for one such body, sent without a token)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    wbits = _ENCODINGS.get(encoding)
    if wbits is None:
        raise InvalidParams(
            f"Content-Encoding: {encoding} is not supported; send the body as it is, or in gzip or deflate"
        )
    if encoding == "deflate" and data[:1] and data[0] & 0xF != 8:
        wbits = -zlib.MAX_WBITS  # deflate without zlib's header, as some clients send it (aiohttp took it too)
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(data, MAX_BODY + 1)
    except zlib.error as error:
        raise InvalidParams(f"the body cannot be read: it is not valid {encoding} ({error})") from None
    if len(body) > MAX_BODY:
        raise InvalidParams(_TOO_LARGE)
    if not inflater.eof:
        raise InvalidParams(f"the body cannot be read: its {encoding} data ends before the end of the stream")
    return body


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body ({} when empty), taken as the API socket takes a request (jsonrpc.parse: UTF-8,
    no deeper than jsonrpc.MAX_DEPTH, no lone surrogate escape). A body that cannot be read or is not such JSON
    is the client's mistake: INVALID_PARAMS (400), never an exception of aiohttp's, a codec's or SQLite's."""
    declared = request.content_length
    if declared is not None and declared > MAX_BODY:
        raise _BodyTooLarge(f"{_TOO_LARGE}: its Content-Length is {declared}; send at most {MAX_BODY}", limit=MAX_BODY)
    try:
        async with asyncio.timeout(BODY_SECONDS):
            sent = await request.read()
    except TimeoutError:
        late = f"the body did not come whole within {BODY_SECONDS:g} s of the request's head; send it with the head"
        raise _BodyLate(late) from None
    except _UNREADABLE as error:  # not HTTP aiohttp can read (a chunk length that is none)
        raise InvalidParams(f"the body cannot be read: {error}") from None
    except web.HTTPRequestEntityTooLarge:  # aiohttp's 413 was text/plain, not the JSON error docs/http.md promises
        raise InvalidParams(_TOO_LARGE) from None
    data = _decoded(sent, request.headers.get("Content-Encoding", ""))
    charset = request.charset or "utf-8"
    if charset.lower() not in ("utf-8", "utf8"):  # JSON is UTF-8 (RFC 8259); one labelled otherwise is read so
        try:
            if codecs.lookup(charset).name in _HOST_NAME_CODECS:
                raise LookupError(charset)
            data = data.decode(charset).encode()
        except LookupError:
            raise InvalidParams(f"Content-Type: charset={charset} is not a known character set; use UTF-8") from None
        except UnicodeError:
            raise InvalidParams(f"the body is not valid {charset} (its Content-Type's charset)") from None
    if not data.strip():
        return {}
    try:
        return jsonrpc.parse(data, "the body")
    except ParseError as error:
        raise InvalidParams(error.message) from None


def _error(status: int, code: str, message: str, **details: Any) -> web.Response:
    return _json_response({"error": {"code": code, "message": message, **details}}, status=status)


def _failure(failure: JobdError) -> web.Response:
    if isinstance(failure, InsufficientRights):
        status = 403
    elif isinstance(failure, _NOT_FOUND):
        status = 404
    elif isinstance(failure, InvalidParams):
        status = 400
    elif isinstance(failure, _BodyLate):
        status = 408
    elif isinstance(failure, OutputMissing):
        status = 410  # the output was there, and is gone for good
    elif isinstance(failure, StoreFailed | OutOfResources):
        status = 503  # the machine's trouble (a full disk, no descriptor left); the same request may succeed later
    else:
        status = 409 if failure.code not in ("INTERNAL_ERROR",) else 500
    return _error(status, failure.code, failure.message, **failure.details)
