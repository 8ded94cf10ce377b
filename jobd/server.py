"""The API socket: listening, one task per connection, protocol sniffing, request dispatch and subscriptions.

The first byte a client sends picks the protocol: `{` or `[` is JSON-RPC 2.0, `<` is evQueue's XML protocol (not
served yet: such a client gets an XML error and the connection closes). Requests on one connection run
concurrently, so a `job.wait` does not hold up a `ping` sent after it; each answer carries the request's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Coroutine
from typing import Any

from jobd.api import Api
from jobd.engine.core import JobEvent
from jobd.engine.submit import Peer, identify_peer
from jobd.errors import FrameTooLarge, InvalidRequest, JobdError, StartupError
from jobd.linux import peer_credentials
from jobd.protocol import jsonrpc

log = logging.getLogger("jobd.server")

LINGER_SECONDS = 5.0  # how long a connection ended by an oversized frame keeps swallowing its input
MAX_UNSENT = 4 * 1024 * 1024  # replies: stop reading the client's requests; events: cut the subscriber off


class Server:
    def __init__(self, api: Api, path: str) -> None:
        self.api = api
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[Connection] = set()

    async def bind(self) -> None:
        """Create the listening socket; clients are taken only from `start_serving()` on."""
        _remove_stale_socket(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window in which others could connect
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(lambda: Connection(self), self.path, start_serving=False)
        finally:
            os.umask(old_umask)

    async def start_serving(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def close_connections(self) -> None:
        for connection in list(self.connections):
            connection.abort()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead jobd; refuse to start beside a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    else:
        raise StartupError(f"another jobd is already listening on {path}")
    finally:
        probe.close()


class Connection(asyncio.Protocol):
    """One client. Requests are read in `data_received` and answered in the same callback when they need no
    waiting (most do): a request costs one trip round the event loop, not one task and three wake-ups."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.api = server.api
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.peer = Peer(uid=-1, gid=-1, pid=0, is_admin=False)  # until connection_made
        self._buffer = bytearray()
        self._mode: str | None = None  # "json" once the first byte chose it
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: list[Any] = []
        self._next_subscription = 1
        self._input_ended = False  # EOF from the client: answer what is pending, then close
        self._refusing = False  # an oversized frame ended the conversation; input is swallowed
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        credentials = peer_credentials(transport.get_extra_info("socket"))
        self.peer = identify_peer(credentials.pid, credentials.uid, credentials.gid)
        # Past this many unsent bytes asyncio calls pause_writing(): a client that does not read its replies is
        # not read from either.
        transport.set_write_buffer_limits(high=MAX_UNSENT)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # lingering: swallowed until the client closes or LINGER_SECONDS pass
        if self._mode is None and not self._choose_protocol(data[:1]):
            return
        buffer = self._buffer
        scanned = len(buffer)  # the bytes held before this call contain no newline
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", max(start, scanned))) >= 0:
            line = bytes(buffer[start : end + 1])
            start = end + 1
            if len(line) > jsonrpc.MAX_FRAME + 1:
                del buffer[:start]
                self._frame_too_large()
                return
            if line.strip():
                self._dispatch(line)
            if self._refusing or self.transport.is_closing():
                return
        del buffer[:start]
        if len(buffer) > jsonrpc.MAX_FRAME:
            # The rest of an oversized line cannot be told from the next request: answer, then end.
            self._frame_too_large()

    def eof_received(self) -> bool:
        self._input_ended = True
        if not self._refusing and bytes(self._buffer).strip():  # the client closed its side; a last line may lack "\n"
            self._dispatch(bytes(self._buffer))
        self._buffer.clear()
        self._close_when_answered()
        return True  # keep our side open for the answers still to come

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # the client went away mid-request: its business, not an error of ours
            log.debug("connection from pid %d ended: %s", self.peer.pid, exc)
        self.server.connections.discard(self)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        for task in self._tasks:
            task.cancel()
        if self._linger is not None:
            self._linger.cancel()

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self._input_ended:
            self.transport.resume_reading()

    # -- requests ------------------------------------------------------------------------------------------------

    def _choose_protocol(self, first: bytes) -> bool:
        if first == b"<":
            self.transport.write(
                b'<response status="KO" error="The XML protocol is not served yet" error-code="UNKNOWN_COMMAND"/>\n'
            )
            self.transport.close()
            return False
        if first not in b"{[ \t\r\n":
            self._send(jsonrpc.error(None, InvalidRequest("expected a JSON-RPC 2.0 request, starting with { or [")))
            self.transport.close()
            return False
        self._mode = "json"
        return True

    def _dispatch(self, line: bytes) -> None:
        try:
            frame = jsonrpc.decode(line)
        except JobdError as failure:
            self._send(jsonrpc.error(None, failure))
            return
        if not frame.is_batch:  # the common case
            reply = self._member(frame.members[0])
            if isinstance(reply, Coroutine):
                self._spawn(self._answer_later(reply))
            elif reply is not None:
                self._send(reply)
            return
        replies = [self._member(member) for member in frame.members]
        if any(isinstance(reply, Coroutine) for reply in replies):
            self._spawn(self._answer_batch_later(replies))
            return
        answered = [reply for reply in replies if reply is not None]
        if answered:
            self._send(answered)

    def _member(self, member: jsonrpc.Member) -> Reply | Coroutine[Any, Any, Reply]:
        """The reply to one request, or a coroutine that will produce it when the method has to wait."""
        if isinstance(member, jsonrpc.Invalid):
            return jsonrpc.error(member.id, member.error)
        try:
            value = self.api.call(self, member.method, member.params)
        except Exception as failure:
            return _failure_reply(member, failure)
        if isinstance(value, Coroutine):
            return _await_reply(member, value)
        return None if member.is_notification else jsonrpc.result(member.id, value)

    async def _answer_later(self, reply: Coroutine[Any, Any, Reply]) -> None:
        message = await reply
        if message is not None:
            self._send(message)

    async def _answer_batch_later(self, replies: list[Reply | Coroutine[Any, Any, Reply]]) -> None:
        done = [await reply if isinstance(reply, Coroutine) else reply for reply in replies]
        answered = [reply for reply in done if reply is not None]
        if answered:
            self._send(answered)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # _await_reply answers errors; this is a bug
            log.error("connection from pid %d: reply failed", self.peer.pid, exc_info=task.exception())
        if self._input_ended or self._refusing:
            self._close_when_answered()

    def _close_when_answered(self) -> None:
        if self._tasks or self.transport.is_closing():
            return
        if self._refusing:
            self._lingering_close()
        else:
            self.transport.close()

    def _frame_too_large(self) -> None:
        error = FrameTooLarge(f"a request line is larger than {jsonrpc.MAX_FRAME} bytes")
        self._send(jsonrpc.error(None, error))
        self._refusing = True
        self._buffer.clear()
        self._close_when_answered()

    def _lingering_close(self) -> None:
        """End a connection whose input we stopped reading without losing our replies.

        Closing a Unix socket with unread input resets it, and the client may then never read the replies already
        sent. So: end our side (the client sees EOF after the replies), and swallow its input for a little while.
        """
        if self._linger is not None:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        if self._input_ended:
            self.transport.close()
            return
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)

    def _send(self, message: Any) -> None:
        if not self.transport.is_closing():
            self.transport.write(jsonrpc.encode(message))

    def _send_event(self, message: Any) -> None:
        # Events cannot wait for a slow reader (they come from the engine, not from its requests): a subscriber
        # that lets MAX_UNSENT bytes pile up is cut off rather than grow jobd's memory.
        if self.transport.get_write_buffer_size() > MAX_UNSENT:
            log.warning("pid %d does not read its events: over %d bytes unsent; closing", self.peer.pid, MAX_UNSENT)
            self.abort()
            return
        self._send(message)

    # -- Session -------------------------------------------------------------------------------------------------

    def subscribe(self, jobs: frozenset[int], queues: frozenset[str], types: frozenset[str]) -> int:
        number = self._next_subscription
        self._next_subscription += 1

        def deliver(event: JobEvent) -> None:
            job = event.job
            if event.type not in types or (jobs and job.id not in jobs) or (queues and job.spec.queue not in queues):
                return
            params: dict[str, Any] = {"subscription": number, "type": event.type}
            if event.type == "job.state":
                params["job"] = job.to_json()
            elif event.type == "job.progress":
                params.update(id=job.id, progress=job.progress)
            else:
                params.update(id=job.id, line=event.line)
            self._send_event(jsonrpc.notification("event", params))

        self._unsubscribe.append(self.api.engine.subscribe(deliver))
        return number

    def abort(self) -> None:
        self.transport.abort()


Reply = dict[str, Any] | None


def _failure_reply(member: jsonrpc.Request, failure: Exception) -> Reply:
    if isinstance(failure, JobdError):
        reply = jsonrpc.error(member.id, failure)
    else:  # the request boundary: a bug is logged and answered, never fatal
        log.error("internal error in %s", member.method, exc_info=failure)
        reply = jsonrpc.error(member.id, JobdError(f"internal error: {type(failure).__name__}: {failure}"))
    return None if member.is_notification else reply


async def _await_reply(member: jsonrpc.Request, value: Coroutine[Any, Any, Any]) -> Reply:
    try:
        result = await value
    except Exception as failure:
        return _failure_reply(member, failure)
    return None if member.is_notification else jsonrpc.result(member.id, result)
