"""A small synchronous JSON-RPC 2.0 client for jobd's API socket, used by jobctl and by the tests.

It owns one AF_UNIX stream connection and its framing (one JSON text per line). Replies are matched to requests
by `id`; `event` notifications that arrive while a reply is awaited are queued for `next_event()`. Everything
blocks on the socket itself (with socket timeouts for deadlines), or in poll() on it and the descriptors the caller
asked it to watch too (its output's reader, signals): it never wakes up to look.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from types import TracebackType
from typing import Any, NamedTuple

from jobd.wakeup_io import drain

DEFAULT_SOCKET = "/run/jobd/jobd.sock"
# Replies are read into one buffer per client, made once: recv(RECV_SIZE) would allocate a new object of this
# size per read, which glibc serves with mmap, mremap and munmap (above its 128 KiB threshold): three system
# calls and a page fault per reply, a third of a small call's CPU time.
RECV_SIZE = 256 * 1024

# Fallback tokens for error replies without `data.code` (a JSON-RPC server that is not jobd, or a bug).
_STANDARD_CODES = {
    -32700: "PARSE_ERROR",
    -32600: "INVALID_REQUEST",
    -32601: "METHOD_NOT_FOUND",
    -32602: "INVALID_PARAMS",
    -32603: "INTERNAL_ERROR",
}


SOCKET_VARIABLE = "JOBD_SOCKET"


class EmptySocketVariable(ValueError):
    """$JOBD_SOCKET is set but empty."""

    def __init__(self) -> None:
        super().__init__(
            f"{SOCKET_VARIABLE} is set but empty: expected the path of jobd's API socket "
            f"(unset it for the default, {DEFAULT_SOCKET})"
        )


def default_socket_path() -> str:
    """The socket jobctl and the tests talk to unless told otherwise: $JOBD_SOCKET, else jobd's default. Set but
    empty is refused, as `--socket ""` is: it is how a script's `JOBD_SOCKET=$SOCK` reads with SOCK unset, and
    taking the default for it would talk to the system's jobd instead of the one the script meant."""
    value = os.environ.get(SOCKET_VARIABLE)
    if value == "":
        raise EmptySocketVariable()
    return DEFAULT_SOCKET if value is None else value


class ConnectError(OSError):
    """The socket could not be connected to; the message names the path and the OS error."""

    def __init__(self, path: str, cause: OSError) -> None:
        super().__init__(f"cannot connect to {path}: {cause}")
        self.path = path
        self.cause = cause
        self.errno = cause.errno


class ConnectionClosed(ConnectionError):
    """jobd closed the connection (or it broke) before the awaited reply or event arrived."""


class ProtocolError(Exception):
    """The peer sent something that is not JSON-RPC 2.0 as jobd speaks it."""


class EncodeError(ValueError):
    """A request cannot be encoded, e.g. it holds text that is not valid Unicode (undecodable argv bytes)."""


class RemoteError(Exception):
    """An error reply. `code` is the stable token (`error.data.code`); match on it, not on the message."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None, rpc_code: int = -32603):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data: dict[str, Any] = data if data is not None else {}
        self.rpc_code = rpc_code

    @classmethod
    def from_error(cls, error: Any) -> RemoteError:
        """Builds the exception from a reply's `error` member."""
        if not isinstance(error, dict):
            raise ProtocolError(f"malformed error member: {error!r}")
        rpc_code = error.get("code")
        rpc_code = rpc_code if isinstance(rpc_code, int) else -32603
        data = error.get("data")
        data = data if isinstance(data, dict) else {}
        code = data.get("code")
        if not isinstance(code, str):
            code = _STANDARD_CODES.get(rpc_code, "UNKNOWN_ERROR")
        return cls(code, str(error.get("message", "")), data, rpc_code)


# Made once: json.dumps() with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_message(message: Any) -> bytes:
    """One frame: compact JSON, UTF-8, newline-terminated (JSON escapes any newline inside strings)."""
    try:
        return _ENCODER.encode(message).encode("utf-8") + b"\n"
    except UnicodeEncodeError as exc:
        # Surrogates come from argv or file names that are not valid UTF-8 (Python's surrogateescape).
        bad = exc.object[exc.start : exc.end]
        raise EncodeError(f"request holds text that is not valid UTF-8 ({bad!r})") from None


def is_event(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "event" and "id" not in message


def result_of(reply: dict[str, Any]) -> Any:
    """The `result` of a reply, or its error raised as RemoteError."""
    if "error" in reply:
        raise RemoteError.from_error(reply["error"])
    if "result" not in reply:
        raise ProtocolError(f"reply has neither result nor error: {reply!r}")
    return reply["result"]


class Reply(NamedTuple):
    """The result of a request sent with `Client.send_request`, as `next_event_or_reply` hands it over."""

    result: Any


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class Client:
    """One connection to jobd. Not thread-safe; one caller at a time (pipelining is the daemon's business)."""

    def __init__(self, path: str | None = None, connect_timeout: float | None = None) -> None:
        self.path = path if path is not None else default_socket_path()
        # Seconds connect() waits for a place in the listener's queue (see there); None: as long as it takes.
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        # Set when the connection ended under us; I/O then fails instead of silently reconnecting.
        self._ended: str | None = None
        self._buffer = bytearray()
        self._chunk: memoryview | None = None  # the receive buffer, made on the first read
        self._next_id = 1
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        # Messages read while waiting for something else and claimed by nobody yet; read_line() returns them.
        self._set_aside: collections.deque[Any] = collections.deque()
        # Ids of requests whose caller gave up (timeout): their late replies are dropped.
        self._abandoned: set[int] = set()
        self._blocking = True  # a new socket blocks; see _arm()
        self._output_fd: int | None = None  # see end_with_reader_of()
        self._signal_fd: int | None = None  # see woken_by_signals()

    # -- connection -------------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Opens the connection; the first request does it if nobody did. After close() or a lost connection
        it opens a new one (a lost one is not reopened behind the caller's back)."""
        if self._sock is not None:
            return
        self._ended = None
        self._buffer.clear()
        self._abandoned.clear()  # their replies would have come on the old connection
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A Unix socket's connect(2) waits while the listener's queue of connections not accepted yet is full: a
            # jobd stuck (its disk hung, or stopped) fills it, and then every client waited for good. SO_SNDTIMEO
            # bounds that wait (connect then fails with EAGAIN), and is taken off again: sends have their own.
            if self.connect_timeout is not None:
                _set_send_timeout(sock, self.connect_timeout)
            sock.connect(self.path)
            if self.connect_timeout is not None:
                _set_send_timeout(sock, 0)
        except OSError as exc:
            sock.close()
            raise ConnectError(self.path, exc) from exc
        self._sock = sock
        self._blocking = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ended = None
        self._buffer.clear()

    def end_with_reader_of(self, output_fd: int) -> None:
        """While waiting for jobd, also watch `output_fd`, where the caller writes what jobd sends: once it is a
        pipe whose reader has gone (`jobctl log -f 5 | head -1`, `| grep -q`), the wait ends with BrokenPipeError
        instead of lasting until jobd next has something to say, which for a silent job can be hours."""
        self._output_fd = output_fd

    def wake_on_signals(self, signal_fd: int | None) -> None:
        """While waiting for jobd, also watch `signal_fd`, the reading end of Python's signal wake-up pipe (see
        woken_by_signals(), which calls this); None: no more."""
        self._signal_fd = signal_fd

    @property
    def signal_fd(self) -> int | None:
        """The signal wake-up pipe this client's waits watch (wake_on_signals), for its caller's own waits to watch
        too (jobd.wakeup_io); None when there is none."""
        return self._signal_fd

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Sends one request and returns its result; raises RemoteError for an error reply.

        `timeout` bounds the whole call (TimeoutError); None waits as long as the daemon takes (job.wait does).
        """
        deadline = _deadline(timeout)
        request_id = self._new_id()
        self._send(encode_message(self._request(request_id, method, params)), deadline, {request_id})
        try:
            reply = self._await(lambda m: isinstance(m, dict) and m.get("id") == request_id, deadline)
        except TimeoutError:
            self._abandoned.add(request_id)
            raise
        return result_of(reply)

    def batch(
        self, calls: Sequence[tuple[str, dict[str, Any] | None]], timeout: float | None = None
    ) -> list[Any | RemoteError]:
        """Sends the calls as one JSON-RPC batch; returns their results in order, errors as RemoteError values."""
        if not calls:
            return []  # an empty batch is an invalid request; nothing to ask
        deadline = _deadline(timeout)
        ids = [self._new_id() for _ in calls]
        requests = [self._request(i, method, params) for i, (method, params) in zip(ids, calls, strict=True)]
        self._send(encode_message(requests), deadline, set(ids))
        wanted = set(ids)
        try:
            replies = self._await(lambda m: isinstance(m, list) and _reply_ids(m) == wanted, deadline)
        except TimeoutError:
            self._abandoned.update(ids)
            raise
        by_id = {reply["id"]: reply for reply in replies}
        return [_result_or_error(by_id[i]) for i in ids]

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Sends a notification (no id, no reply)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._send(encode_message(message), None)

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The `params` of the next `event` notification (queued ones first); TimeoutError after `timeout`."""
        if self._events:
            return self._events.popleft()
        deadline = _deadline(timeout)
        while not self._events:
            self._route(self._read_message(deadline), lambda m: False)
        return self._events.popleft()

    def send_request(self, method: str, params: dict[str, Any] | None = None) -> int:
        """Sends a request without waiting for its reply; returns its id for `next_event_or_reply`. For a request
        that waits in the daemon (job.wait) while the events of a subscription on this connection are followed."""
        request_id = self._new_id()
        self._send(encode_message(self._request(request_id, method, params)), None, {request_id})
        return request_id

    def next_event_or_reply(self, request_id: int, timeout: float | None = None) -> dict[str, Any] | Reply:
        """The `params` of the next event, or Reply(result) once the reply to `request_id` has come (after every
        event sent before it); an error reply raises RemoteError. TimeoutError after `timeout`."""
        if self._events:
            return self._events.popleft()

        def is_reply(message: Any) -> bool:
            return isinstance(message, dict) and message.get("id") == request_id

        for index, message in enumerate(self._set_aside):
            if is_reply(message):
                del self._set_aside[index]
                return Reply(result_of(message))
        deadline = _deadline(timeout)
        while not self._events:
            message = self._read_message(deadline)
            if self._route(message, is_reply):
                return Reply(result_of(message))
        return self._events.popleft()

    # -- raw access for protocol tests ------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Writes bytes as they are, no framing added (tests of the daemon's parser)."""
        self._send(data, None)

    def read_line(self, timeout: float | None = None) -> Any:
        """The next JSON message: a dict (reply or notification) or a list (batch reply).

        Messages that call()/batch()/next_event() read but did not claim come first; queued events do not.
        """
        if self._set_aside:
            return self._set_aside.popleft()
        return self._read_message(_deadline(timeout))

    # -- internals --------------------------------------------------------------------------------------------

    def _new_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id

    @staticmethod
    def _request(request_id: int, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        return request

    def _connected(self) -> socket.socket:
        if self._ended is not None:
            raise ConnectionClosed(self._ended)
        self.connect()
        assert self._sock is not None
        return self._sock

    def _end(self, reason: str) -> None:
        """The connection is over (peer closed, broke, or a frame was cut): keep the buffer, refuse more I/O."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ended = reason

    def _send(self, data: bytes, deadline: float | None, ids: Collection[int] = ()) -> None:
        """Writes a frame. If jobd closed the connection while we wrote and left an error reply about `ids` (or
        about an unreadable request), that reply is raised as RemoteError rather than the broken pipe."""
        sock = self._connected()
        self._arm(sock, deadline)
        try:
            sock.sendall(data)
        except TimeoutError:
            # Part of a frame may be out: the stream cannot be resynchronised, so this connection is done.
            self._end(f"connection to {self.path} abandoned: a request was cut off by a timeout")
            raise
        except OSError as exc:
            self._drain_readable(sock)
            self._end(f"connection to {self.path} broke while sending: {exc}")
            if ids:
                self._raise_buffered_error(ids)
            raise ConnectionClosed(self._ended) from exc

    def _arm(self, sock: socket.socket, deadline: float | None) -> None:
        """Give the socket the time left until `deadline`. settimeout() costs two fcntl() calls each time, so a
        socket that blocks (no deadline: most calls) and already blocks is left alone."""
        timeout = _remaining(deadline)
        if timeout is None and self._blocking:
            return
        sock.settimeout(timeout)
        self._blocking = timeout is None

    def _drain_readable(self, sock: socket.socket) -> None:
        """Buffers what jobd sent before it closed: a refusal (FRAME_TOO_LARGE) precedes the close that broke
        our send, so it is already in the receive queue and a non-blocking read finds it."""
        sock.setblocking(False)
        self._blocking = False
        try:
            while chunk := sock.recv(RECV_SIZE):
                self._buffer += chunk
        except OSError:
            pass

    def _raise_buffered_error(self, ids: Collection[int]) -> None:
        """Raises the error reply about one of `ids` (or about an unreadable request) found in the buffer."""
        for line in bytes(self._buffer).split(b"\n"):
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(message, dict)
                and "error" in message
                and (message.get("id") is None or message.get("id") in ids)
            ):
                raise RemoteError.from_error(message["error"])

    def _await(self, is_wanted: Callable[[Any], bool], deadline: float | None) -> Any:
        """Reads until a message satisfies `is_wanted`; routes everything else on the way."""
        for index, message in enumerate(self._set_aside):
            if is_wanted(message):
                del self._set_aside[index]
                return message
        while True:
            message = self._read_message(deadline)
            if self._route(message, is_wanted):
                return message

    def _route(self, message: Any, is_wanted: Callable[[Any], bool]) -> bool:
        """True if `message` is the awaited one; otherwise queues, drops or sets it aside."""
        if is_event(message):
            self._events.append(message.get("params") or {})
            return False
        if is_wanted(message):
            return True
        if self._is_abandoned(message):
            return False
        if isinstance(message, dict) and message.get("id") is None and "error" in message:
            # jobd could not read our request far enough to learn its id (bad frame, frame too large); this
            # client has one request outstanding, so the error is about it.
            raise RemoteError.from_error(message["error"])
        self._set_aside.append(message)
        return False

    def _is_abandoned(self, message: Any) -> bool:
        ids = _reply_ids(message) if isinstance(message, list) else {message.get("id")}
        if ids and ids <= self._abandoned:
            self._abandoned -= ids
            return True
        return False

    def _read_message(self, deadline: float | None) -> Any:
        frame = self._read_frame(deadline)
        try:
            message = json.loads(frame)
        except ValueError as exc:
            if frame.lstrip().startswith(b"<"):
                # jobd's evqueue_socket greets with <ready .../>: the socket next to the API one, easily taken for it
                raise ProtocolError(
                    f"{self.path} speaks XML (evQueue's protocol, as jobd's evqueue_socket does), not jobd's JSON-RPC: "
                    f"jobctl needs jobd's API socket, its [daemon] socket; it sent {frame[:200]!r}"
                ) from None
            raise ProtocolError(
                f"{self.path} sent something that is not JSON ({exc}): is it jobd's API socket? It sent {frame[:200]!r}"
            ) from None
        if not isinstance(message, dict | list):
            raise ProtocolError(
                f"{self.path} sent a JSON value that is not a JSON-RPC message: is it jobd's API socket? It sent "
                f"{frame[:200]!r}"
            )
        return message

    def _read_frame(self, deadline: float | None) -> bytes:
        """One line without its newline; a partial line stays buffered across timeouts."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                frame = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return frame
            self._fill(deadline)

    def _fill(self, deadline: float | None) -> None:
        sock = self._connected()
        if self._output_fd is not None or self._signal_fd is not None:
            self._wait_readable(sock, deadline)
        self._arm(sock, deadline)
        try:
            if self._chunk is None:
                self._chunk = memoryview(bytearray(RECV_SIZE))
            received = sock.recv_into(self._chunk)
        except TimeoutError:
            raise
        except OSError as exc:
            self._end(f"connection to {self.path} broke: {exc}")
            raise ConnectionClosed(self._ended) from exc
        if not received:
            pending = len(self._buffer)
            detail = f" ({pending} bytes of an unfinished line)" if pending else ""
            self._end(f"jobd closed the connection on {self.path}{detail}")
            raise ConnectionClosed(self._ended)
        self._buffer += self._chunk[:received]

    def _wait_readable(self, sock: socket.socket, deadline: float | None) -> None:
        """Blocks until `sock` is readable. Raises BrokenPipeError if the reader of the output (end_with_reader_of)
        goes first; a signal (wake_on_signals) ends the wait only if its handler raises, as Ctrl-C's does."""
        poller = select.poll()  # no-poll-ok: poll(2), the system call: one blocking wait on up to three descriptors
        poller.register(sock, select.POLLIN)
        if self._output_fd is not None:
            # No events asked: poll reports POLLERR anyway, and for the writing end of a pipe that means no reader is
            # left (a regular file or a terminal never reports it; a hung-up terminal sends SIGHUP of its own).
            poller.register(self._output_fd, 0)
        if self._signal_fd is not None:
            poller.register(self._signal_fd, select.POLLIN)
        while True:
            left = _remaining(deadline)
            # One blocking poll(2) until jobd answers, the pipe's reader goes, a signal comes or the deadline passes.
            ready = dict(poller.poll(None if left is None else left * 1000))  # no-poll-ok: blocks, as said above
            if self._output_fd is not None and ready.get(self._output_fd, 0) & select.POLLERR:
                raise BrokenPipeError(errno.EPIPE, "the reader of the output has gone")
            if not ready:
                raise TimeoutError("timed out waiting for jobd")
            if self._signal_fd in ready:
                # The signal's handler has run by the time this line does (Python runs pending handlers before its
                # next call): Ctrl-C's raised KeyboardInterrupt there. Any other lets the wait go on.
                drain(self._signal_fd)
                del ready[self._signal_fd]
            if ready:
                return


@contextlib.contextmanager
def woken_by_signals(client: Client) -> Iterator[None]:
    """Makes every signal with a Python handler (Ctrl-C's) end `client`'s waits for jobd at once, whenever it comes.

    Python runs a signal's handler between two of its own instructions, and a system call the signal interrupts
    returns EINTR to let it. But a signal that comes after the interpreter last looked and before the process blocks
    in recv(2) interrupts nothing: the handler waits until jobd next sends something, for `jobctl wait` maybe never
    (a Ctrl-C ignored for good, seen once in a few hundred tries). Python's wake-up descriptor closes that window:
    the signal writes a byte into a pipe whatever the process is doing, and the client's poll(2) watches the pipe.
    In the main thread only (the only one Python lets set it); elsewhere this does nothing."""
    try:
        pipe: tuple[int, int] | None = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # no descriptors left: the command fails on its own socket soon enough, without this
        pipe = None
    if pipe is None:
        yield
        return
    reader, writer = pipe
    try:
        before: int | None = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        before = None
    try:
        if before is None:
            yield
            return
        client.wake_on_signals(reader)
        try:
            yield
        finally:
            client.wake_on_signals(None)
            signal.set_wakeup_fd(before)
    finally:
        os.close(reader)
        os.close(writer)


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO, which also bounds a Unix socket's connect(2); 0: no limit (so a limit below a microsecond is
    one microsecond, not none)."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6) or (1 if seconds > 0 and not whole else 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, micro))


def _remaining(deadline: float | None) -> float | None:
    """Socket timeout left until `deadline`; TimeoutError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out waiting for jobd")
    return left


def _reply_ids(replies: list[Any]) -> set[Any]:
    return {reply.get("id") for reply in replies if isinstance(reply, dict)}


def _result_or_error(reply: dict[str, Any]) -> Any:
    try:
        return result_of(reply)
    except RemoteError as exc:
        return exc
