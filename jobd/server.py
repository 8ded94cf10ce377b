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
        self._connections: set[Connection] = set()

    async def bind(self) -> None:
        """Create the listening socket; clients are taken only from `start_serving()` on."""
        _remove_stale_socket(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window in which others could connect
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, self.path, limit=jsonrpc.MAX_FRAME + 1, start_serving=False
            )
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
        for connection in list(self._connections):
            connection.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        credentials = peer_credentials(writer.get_extra_info("socket"))
        client = identify_peer(credentials.pid, credentials.uid, credentials.gid)
        connection = Connection(self.api, client, reader, writer)
        self._connections.add(connection)
        try:
            await connection.serve()
        except ConnectionError as error:  # the client went away mid-request: its business, not an error of ours
            log.debug("connection from pid %d ended: %s", client.pid, error)
        except Exception:  # the connection boundary: one client's trouble never reaches the daemon
            log.exception("connection from pid %d failed", client.pid)
        finally:
            self._connections.discard(connection)
            connection.close()


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


class Connection:
    def __init__(self, api: Api, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.api = api
        self.peer = peer
        self.reader = reader
        self.writer = writer
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: list[Any] = []
        self._next_subscription = 1

    async def serve(self) -> None:
        first = await self.reader.read(1)
        if not first:
            return
        if first == b"<":
            self.writer.write(
                b'<response status="KO" error="The XML protocol is not served yet" error-code="UNKNOWN_COMMAND"/>\n'
            )
            await self.writer.drain()
            return
        if first not in b"{[ \t\r\n":
            self._send(jsonrpc.error(None, InvalidRequest("expected a JSON-RPC 2.0 request, starting with { or [")))
            await self.writer.drain()
            return
        pending = first
        too_large = False
        while True:
            if self.writer.transport.get_write_buffer_size() > MAX_UNSENT:
                await self.writer.drain()  # a client that does not read its replies is not read from either
            try:
                line = pending + await self.reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as eof:  # the client closed its side; a last line may lack "\n"
                if (pending + eof.partial).strip():
                    self._dispatch(pending + eof.partial)
                break
            except asyncio.LimitOverrunError:
                line = b""  # the buffer holds an unfinished line over the limit
            pending = b""
            if not line or len(line) > jsonrpc.MAX_FRAME + 1:
                # The rest of an oversized line cannot be told from the next request: answer, then end.
                error = FrameTooLarge(f"a request line is larger than {jsonrpc.MAX_FRAME} bytes")
                self._send(jsonrpc.error(None, error))
                too_large = True
                break
            if line.strip():
                self._dispatch(line)
        if self._tasks:  # answer what was asked before the end
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writer.drain()
        if too_large:
            await self._lingering_close()

    async def _lingering_close(self) -> None:
        """End a connection whose input we stopped reading without losing our replies.

        Closing a Unix socket with unread input resets it, and the client may then never read the replies already
        sent. So: end our side (the client sees EOF after the replies), and swallow its input for a little while.
        """
        if self.writer.can_write_eof():
            self.writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await self.reader.read(1 << 16):
                    pass

    def _dispatch(self, line: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(line))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, line: bytes) -> None:
        try:
            frame = jsonrpc.decode(line)
        except JobdError as failure:
            self._send(jsonrpc.error(None, failure))
            return
        if not frame.is_batch:  # the common case, without gather's extra task and future
            reply = await self._member(frame.members[0])
            if reply is not None:
                self._send(reply)
            return
        replies = await asyncio.gather(*(self._member(member) for member in frame.members))
        answered = [reply for reply in replies if reply is not None]
        if answered:
            self._send(answered)

    async def _member(self, member: jsonrpc.Member) -> dict[str, Any] | None:
        if isinstance(member, jsonrpc.Invalid):
            return jsonrpc.error(member.id, member.error)
        try:
            value = await self.api.call(self, member.method, member.params)
        except JobdError as failure:
            reply = jsonrpc.error(member.id, failure)
        except Exception as failure:  # the request boundary: a bug is logged and answered, never fatal
            log.exception("internal error in %s", member.method)
            reply = jsonrpc.error(member.id, JobdError(f"internal error: {type(failure).__name__}: {failure}"))
        else:
            reply = jsonrpc.result(member.id, value)
        return None if member.is_notification else reply

    def _send(self, message: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(jsonrpc.encode(message))

    def _send_event(self, message: Any) -> None:
        # Events cannot wait for a slow reader (they come from the engine, not from its requests): a subscriber
        # that lets MAX_UNSENT bytes pile up is cut off rather than grow jobd's memory.
        if self.writer.transport.get_write_buffer_size() > MAX_UNSENT:
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
        self.writer.transport.abort()

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        for task in self._tasks:
            task.cancel()
        self.writer.close()
