"""The API sockets: listening, the connections (an asyncio protocol each; only a request that waits gets a task),
protocol sniffing, request dispatch and subscriptions.

The first byte a client sends picks the protocol: `{` or `[` is JSON-RPC 2.0 (`Connection`), `<` is evQueue's XML
protocol (the connection hands itself over to an `XmlConnection`). JSON requests on one connection run concurrently,
so a `job.wait` does not hold up a `ping` sent after it; each answer carries the request's id. XML requests are
answered strictly in order, as evQueue's clients expect. A second listener, `[daemon] evqueue_socket`, speaks XML
from the start and greets every connection with `<ready …/>`. The optional TCP listener, `[tcp] listen`, speaks XML
too, after evQueue's challenge / HMAC-SHA1 login (`TcpXmlConnection`, `jobd.protocol.evqueue_auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import sys
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final, TypeGuard

from jobd import activation, audit, users
from jobd.api import AfterReplyWork, Api, EventFilter
from jobd.api_evqueue import EvQueue
from jobd.durable import DurableReply
from jobd.engine.core import Engine, JobEvent
from jobd.engine.instances import InstanceEvent
from jobd.epollset import EpollSet
from jobd.errors import (
    FrameTooLarge,
    InvalidParams,
    InvalidRequest,
    InvalidXml,
    JobdError,
    OutOfResources,
    ShuttingDown,
    StartupError,
    TooManyConnections,
    memory_shortage,
)
from jobd.linux import peer_credentials
from jobd.model import ADMIN_CONNECTIONS, AccessDef, RemoteUser, host_port
from jobd.peer import Peer, identify_peer
from jobd.protocol import evqueue, evqueue_auth, jsonrpc
from jobd.store import refused_request

log = logging.getLogger("jobd.server")

LINGER_SECONDS = 5.0  # how long a connection jobd ends (_Lingering) keeps swallowing its input
# Clients refused (max_connections) that linger at once; past this many, a refused client is closed as soon as its
# refusal is written. Each holds one of jobd's descriptors while it lingers, and a burst of clients (a web server's
# workers all connecting at once) refused faster than LINGER_SECONDS let go of them ran jobd out of descriptors:
# then no client was accepted, no job's output file opened and no job started. A client closed at once still reads
# the refusal; only what it reads after that is a reset rather than an end of file.
REFUSED_LINGERING = 32
STOP_ANSWER_SECONDS = 1.0  # at a stop, the most the last answers may take to be written (a turn of the loop or two)
MAX_UNSENT = 4 * 1024 * 1024  # replies: stop reading the client's requests; events: cut the subscriber off
# Event lines a connection gathers in one turn of the loop before writing them: tens of events a write(2), and a
# burst holds no more than this of each subscriber's in jobd's memory meanwhile (16 MB for 1,000 subscribers).
UNSENT_EVENTS_WRITTEN_AT = 16 * 1024
# A batch's answer is made whole before a byte of it is sent: once it holds this many bytes, its members not answered
# yet are refused (_BatchAnswer). A line of `job.get`s of a job with a long command, or of `job.output`s of 1 MiB,
# was otherwise answered in gigabytes, made at once, with the loop stopped meanwhile: jobd was killed for want of
# memory, or took seconds to answer anyone else.
MAX_BATCH_ANSWER = MAX_UNSENT
# Requests that wait (job.wait, job.output with wait, instance.wait, ...) one connection may have pending; past
# that its further requests are read once one of those is answered. Each holds a few KiB of jobd's memory until its
# job ends, and one client sending them without end would otherwise take all of it.
MAX_WAITING = 256
# Subscriptions one connection may hold: each event is offered to every one of them, so a client subscribing without
# end would slow every job's events down. One subscription can select any set of jobs, queues and types.
MAX_SUBSCRIPTIONS = 64
# Job and instance ids, queue and workflow names the subscriptions of one connection select, together. A
# subscription's line may name 150,000 ids: 64 of them took 500 MB of jobd's memory for one client.
MAX_SELECTED = 10000  # as many jobs as one job.submit makes
# Requests one connection has answered in one turn of the event loop; its next ones wait for the next turn, after
# every other client's and job's callbacks that are ready. A client that pipelines (a read brings up to 256 KiB: 87,000
# lines `{}`, or 65,000 XML documents `<x/>`) otherwise had them all answered in one callback, and nobody else was
# answered meanwhile: each such read stopped jobd for 0.6 s (JSON) or 2 to 5 s (XML), and a client could send them
# without end.
REQUESTS_PER_TURN = 64
_BLANKS = b" \t\r\n"  # what may come before a client's first request, on the API socket, whatever its protocol


def _keepalive_interval() -> float:
    # JOBD_EVQUEUE_KEEPALIVE_INTERVAL is for tests only (docs/evqueue-protocol.md): they cannot wait 5 s per ping.
    text = os.environ.get("JOBD_EVQUEUE_KEEPALIVE_INTERVAL", "")
    try:
        value = float(text)
    except ValueError:
        return 5.0
    return value if value > 0 else 5.0


# Seconds between two `<ping />` written to an XML client while its request waits (evQueue's dpd.interval). Half of
# evQueue's default of 10: evQueue's PHP class gives up a read after 10 s (its stream timeout), so with pings every
# 10 s a synchronous launch or an instance wait failed with "error reading data" whenever jobd's event loop was
# 30 ms late (seen: the first ping at 10.010 s, the client's timeout at 10.031 s).
EVQUEUE_KEEPALIVE_INTERVAL: Final = _keepalive_interval()

# Seconds a TCP client has to log in after the challenge (evQueue's network.rcv.timeout); then it is disconnected.
LOGIN_TIMEOUT: Final = 30.0
# TCP clients that have not logged in yet count apart from max_connections, up to this many at once: anyone who can
# reach the port could otherwise fill max_connections and lock out the local sockets' clients, admins included.
LOGINS_UNDER_WAY: Final = 32
LOGINS_UNDER_WAY_PER_ADDRESS: Final = 8  # of those, from one address: one client cannot take them all


class Server:
    def __init__(self, api: Api, path: str, passed: dict[str, socket.socket] | None = None) -> None:
        """`passed`: listening sockets systemd handed over (jobd.activation), by name; each replaces what jobd
        would bind for that listener, and turns it on at the socket's own address even if the config has it off."""
        self.api = api
        self.passed = dict(passed or {})
        self.path = _passed_path(self.passed.get("api")) or path
        self.evqueue_path = _passed_path(self.passed.get("evqueue")) or api.engine.config.daemon.evqueue_socket
        self.evqueue = EvQueue(api)
        self._server: asyncio.AbstractServer | None = None
        self._evqueue_server: asyncio.AbstractServer | None = None
        self.tcp_listen = api.engine.config.tcp.listen  # None: no TCP listener; a change needs a restart
        tcp = self.passed.get("tcp")
        if tcp is not None:
            address = activation.socket_address(tcp)
            assert not isinstance(address, str)  # activation took only an IPv4/IPv6 socket for "tcp"
            self.tcp_listen = address
        self.tcp_address: tuple[str, int] | None = None  # where the TCP listener is bound (port 0 resolved)
        # The unix socket files listened on, by path: (st_dev, st_ino) of each once bound, which tells at a reload
        # whether the path still leads to it (rebind_removed_sockets).
        self._socket_identities: dict[str, tuple[int, int]] = {}
        self._stopped_listening = False  # stop_listening() has begun: no socket is made again
        self._tcp_server: asyncio.AbstractServer | None = None
        self.login_throttle = evqueue_auth.LoginThrottle()
        self._last_event: tuple[JobEvent | InstanceEvent, bytes] | None = None  # encoded_event's
        # Clients whose hang-up is looked out for, from their first request that waits (Connection._hung_up). Made
        # by start_serving(), before the first client, and not at the first wait: made then, at a time jobd had no
        # descriptor to spare, it failed in the middle of that request, and its client's connection was dropped
        # without an answer. None again once the connections are closed.
        self._hangups: EpollSet | None = None
        # The unix sockets' mode and group (bind: `[daemon] socket_mode`, `socket_group`); the HTTP one's too.
        self.access: tuple[int, int | None] = (0o660, None)
        self._access_as_configured: tuple[int, str] | None = None  # the keys `access` was made from
        # The clients counted against max_connections, each with whom it holds its place for (_holder), and how
        # many places each of those holds (max_connections_per_user).
        self.connections: dict[Connection | XmlConnection, int | str] = {}
        self._held: Counter[int | str] = Counter()
        # close_connections() has begun: a request read from now on is answered SHUTTING_DOWN and not run. Run, a
        # method that waits would start after the store is closed (its task created in the very turn of the loop
        # in which the last answers were written), and fail there (found under load).
        self.closing = False
        self.logging_in: set[TcpXmlConnection] = set()  # TCP clients before their login: not in `connections`
        # Refused clients lingering (_lingering_close): at most REFUSED_LINGERING, not in `connections`.
        self.refused_lingering: set[_Lingering] = set()

    async def bind(self) -> None:
        """Create the listening sockets; clients are taken only from `start_serving()` on."""
        access = self.access = self._socket_access()
        loop = asyncio.get_running_loop()
        api, evqueue, tcp = self.passed.get("api"), self.passed.get("evqueue"), self.passed.get("tcp")
        # An adopted socket keeps the mode and group its socket unit gave it (SocketMode=, SocketGroup=).
        if api is not None:
            self._server = await loop.create_unix_server(
                lambda: Connection(self), sock=api, start_serving=False, **_KEEP_SOCKET_FILE
            )
        else:
            self._server = await bind_unix(self.path, lambda: Connection(self), *access)
        if evqueue is not None:
            self._evqueue_server = await loop.create_unix_server(
                lambda: XmlConnection(self, greet=True), sock=evqueue, start_serving=False, **_KEEP_SOCKET_FILE
            )
        elif self.evqueue_path is not None:
            self._evqueue_server = await bind_unix(self.evqueue_path, lambda: XmlConnection(self, greet=True), *access)
        if tcp is not None:
            self._tcp_server = await loop.create_server(lambda: TcpXmlConnection(self), sock=tcp, start_serving=False)
            self.tcp_address = self.tcp_listen
        elif self.tcp_listen is not None:
            await self._bind_tcp(*self.tcp_listen)
        for path in (self.path, self.evqueue_path):
            if path is not None:
                self._socket_identities[path] = _file_identity(path)

    async def rebind_removed_sockets(self) -> None:
        """At a reload: make again a socket file of jobd's own whose path was removed while jobd ran (`rm`, a cleanup
        of /run or /tmp, its directory deleted). jobd went on running, but no client could connect any more, and a
        restart would stop the running jobs. A path that now holds something else is left alone, and a socket
        systemd passed is its socket unit's to make: both are logged with what to do."""
        listeners = (
            ("api", self.path, lambda: Connection(self)),
            ("evqueue", self.evqueue_path, lambda: XmlConnection(self, greet=True)),
        )
        for name, path, factory in listeners:
            if path is None or path not in self._socket_identities:
                continue
            try:
                identity: tuple[int, int] | None = _file_identity(path)
            except FileNotFoundError:
                identity = None
            except OSError as error:
                log.error("cannot check the socket file %s: %s", path, error.strerror or error)
                continue
            if identity == self._socket_identities[path]:
                continue
            if name in self.passed:
                log.error(
                    "the socket file %s, which systemd passed, is no longer there: clients cannot connect; "
                    "restart its socket unit and jobd (systemctl restart jobd.socket jobd)",
                    path,
                )
            elif identity is not None:
                log.error(
                    "%s is no longer jobd's socket (something else took its place): left alone; clients cannot "
                    "reach jobd there until it is removed and jobd gets a SIGHUP",
                    path,
                )
            else:
                await self._rebind(name, path, factory)

    async def _rebind(self, name: str, path: str, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        if self._stopped_listening:  # a stop began since the reload: nothing is to listen any more
            return
        try:
            server = await bind_unix(path, factory, *self.access)
        except (OSError, StartupError) as error:
            reason = str(error) if isinstance(error, StartupError) else error.strerror or str(error)
            log.error("the socket file %s was removed and cannot be made again: %s", path, reason)
            return
        # Put in the old one's place before serving (which yields to the loop): a stop that comes meanwhile closes
        # this one. The old listening socket has no path any more: nobody can reach it. Its connections go on.
        old = self._server if name == "api" else self._evqueue_server
        if name == "api":
            self._server = server
        else:
            self._evqueue_server = server
        if old is not None:
            old.close()
        self._socket_identities[path] = _file_identity(path)
        await server.start_serving()
        log.warning("the socket file %s had been removed while jobd ran (no client could connect): made again", path)

    def encoded_event(self, event: JobEvent | InstanceEvent) -> bytes:
        """`event`'s object as JSON, encoded once for all the subscriptions it goes to (one after the other, in one
        turn of the loop): encoded again for each, a job's whole value, 1,000 subscribers of a batch of 1,000 jobs
        held the loop for 81 s (docs/BENCHMARKS.md, "Many subscribers"). The event is kept with its bytes, so that
        no later event can take its identity."""
        if self._last_event is None or self._last_event[0] is not event:
            self._last_event = (event, jsonrpc.encode_value(event.to_json()))
        return self._last_event[1]

    def socket_files(self) -> list[str]:
        """The unix sockets jobd bound itself, whose mode and group are `[daemon]`'s (a socket systemd passed has
        its unit's)."""
        return [
            path
            for path, name in ((self.path, "api"), (self.evqueue_path, "evqueue"))
            if path is not None and name not in self.passed
        ]

    def reapply_socket_access(self, others: Sequence[str] = ()) -> None:
        """At a reload: give the sockets, and `others` (a unix HTTP listener of jobd's own), the `socket_mode` and
        `socket_group` now configured, when they changed. Connections already made stay."""
        daemon = self.api.engine.config.daemon
        if (daemon.socket_mode, daemon.socket_group) == self._access_as_configured:
            return
        mode, gid = access = self._socket_access()
        for path in (*self.socket_files(), *others):
            try:
                # A group that does not exist: jobd's own, as at a start (_socket_access said so), not the old one.
                give_socket_access(path, mode, os.getegid() if gid is None else gid)
            except OSError as error:
                log.error("cannot give %s its new socket_mode and socket_group: %s", path, error.strerror or error)
        log.info("socket_mode %s and socket_group applied to the sockets", oct(mode))
        self.access = access

    def end_revoked_logins(self) -> None:
        """At a reload: the TCP sessions whose login the reload removed or changed end (TcpXmlConnection)."""
        users = self.api.engine.config.tcp.users
        for connection in list(self.connections):
            if isinstance(connection, TcpXmlConnection):
                connection.end_if_revoked(users)

    def _socket_access(self) -> tuple[int, int | None]:
        """The sockets' mode and group: `[daemon] socket_mode` and `socket_group` (None: jobd's own group)."""
        daemon = self.api.engine.config.daemon
        self._access_as_configured = (daemon.socket_mode, daemon.socket_group)
        try:
            gid: int | None = users.group_id(daemon.socket_group)
        except KeyError:
            log.warning(
                "[daemon] socket_group: there is no group %s; the sockets keep jobd's own group (gid %d), "
                "so only its members can connect (create the group, or set socket_group)",
                daemon.socket_group,
                os.getegid(),
            )
            gid = None
        return daemon.socket_mode, gid

    async def _bind_tcp(self, host: str, port: int) -> None:
        try:
            self._tcp_server = await asyncio.get_running_loop().create_server(
                lambda: TcpXmlConnection(self), host, port, start_serving=False, reuse_address=True
            )
        except OSError as error:
            where = host_port(host, port)
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise StartupError(f"cannot listen for evQueue clients on TCP {where} ([tcp] listen): {reason}") from None
        bound = self._tcp_server.sockets[0].getsockname()
        self.tcp_address = (str(bound[0]), int(bound[1]))

    async def start_serving(self) -> None:
        assert self._server is not None
        self._hangups = EpollSet(asyncio.get_running_loop())
        await self._server.start_serving()
        if self._evqueue_server is not None:
            await self._evqueue_server.start_serving()
        if self._tcp_server is not None:
            await self._tcp_server.start_serving()

    async def stop_listening(self) -> None:
        self._stopped_listening = True
        for server, path, name in (
            (self._server, self.path, "api"),
            (self._evqueue_server, self.evqueue_path, "evqueue"),
        ):
            if server is not None and path is not None:
                server.close()
                if name in self.passed:
                    continue  # systemd's socket: it stays, and queues clients until jobd is started again
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self._tcp_server is not None:
            self._tcp_server.close()

    async def close_connections(self) -> None:
        # The engine has answered what still waited (SHUTTING_DOWN for a job.wait of a job the stop put back in
        # its queue, ...): those answers are written before the connections end, so that a client learns why.
        self.closing = True
        answering = [task for connection in self.connections for task in connection.answering()]
        if answering:
            await asyncio.wait(answering, timeout=STOP_ANSWER_SECONDS)
        for connection in [*self.connections, *self.logging_in]:
            connection.abort()
        if self._hangups is not None:
            self._hangups.close()
            self._hangups = None

    def watch_hangup(self, fd: int, hung_up: Callable[[], None]) -> None:
        """Call `hung_up` once the client of socket `fd` closes the connection for good, not only its sending side.

        Both look the same to asyncio (EOF), but a client that only shut down its sending side still reads the
        answers to its waiting requests, while one that closed the connection (an interrupted `jobctl wait`) never
        will. The kernel tells them apart by EPOLLHUP, reported for a full close only. The socket is registered for
        no event, so that only a hang-up (or an error) wakes the set: in the loop's own set, its end-of-file would
        report it readable over and over.
        """
        if self._hangups is not None:  # None once jobd closes its connections: this one is about to go
            self._hangups.add(fd, 0, hung_up)

    def forget_hangup(self, fd: int) -> None:
        if self._hangups is not None:
            self._hangups.remove(fd)

    def login_refusal(self, address: str) -> TooManyConnections | None:
        """The error for a new TCP client from `address` when LOGINS_UNDER_WAY clients are still to log in, or
        LOGINS_UNDER_WAY_PER_ADDRESS of them from that address: an IPv6 one's /64, as the login delay counts them
        (one host usually holds a whole /64, and would take every place with addresses of its own)."""
        if len(self.logging_in) >= LOGINS_UNDER_WAY:
            return TooManyConnections(
                f"too many connections: {LOGINS_UNDER_WAY} evQueue clients are logging in on TCP; try again later",
                limit=LOGINS_UNDER_WAY,
            )
        source = evqueue_auth.LoginThrottle.source(address)
        same_source = sum(
            1 for client in self.logging_in if evqueue_auth.LoginThrottle.source(client.address) == source
        )
        if same_source >= LOGINS_UNDER_WAY_PER_ADDRESS:
            return TooManyConnections(
                f"too many connections: {LOGINS_UNDER_WAY_PER_ADDRESS} evQueue clients from {source} are logging in "
                "on TCP; try again later",
                limit=LOGINS_UNDER_WAY_PER_ADDRESS,
            )
        return None

    def may_linger(self, connection: _Lingering) -> bool:
        """Whether a connection ending in a lingering close may linger: one counted in `connections` always (they
        are bounded by max_connections), a refused one while fewer than REFUSED_LINGERING do."""
        if connection in self.connections or connection in self.logging_in:
            return True
        if len(self.refused_lingering) >= REFUSED_LINGERING:
            return False
        self.refused_lingering.add(connection)
        return True

    def refusal(self, peer: Peer) -> TooManyConnections | None:
        """The error for a new client when `[daemon] max_connections` are connected (both sockets together), or
        when a user who is not an admin holds `max_connections_per_user` of them; an admin may still take one of
        ADMIN_CONNECTIONS places more."""
        daemon = self.api.engine.config.daemon
        per_user = daemon.max_connections_per_user
        if per_user is not None and not peer.is_admin and self._held[_holder(peer)] >= per_user:
            return TooManyConnections(
                f"too many connections: {_describe_holder(peer)} holds {per_user} already "
                "([daemon] max_connections_per_user); close one or try again later",
                limit=per_user,
            )
        limit = daemon.max_connections
        connected = len(self.connections)
        if connected < limit or (peer.is_admin and connected < limit + ADMIN_CONNECTIONS):
            return None
        return TooManyConnections(
            f"too many connections: {limit} clients are connected ([daemon] max_connections); try again later",
            limit=limit,
        )

    def join(self, connection: Connection | XmlConnection, peer: Peer) -> None:
        """`connection` takes a place (refusal() let it in), held for `peer`."""
        if connection in self.connections:
            return
        holder = _holder(peer)
        self.connections[connection] = holder
        self._held[holder] += 1

    def leave(self, connection: Connection | XmlConnection) -> None:
        """`connection` gives its place back (it ended, or a protocol of its own took it over)."""
        holder = self.connections.pop(connection, None)
        if holder is None:
            return
        self._held[holder] -= 1
        if not self._held[holder]:
            del self._held[holder]  # users come and go: only those holding places are kept


def _holder(peer: Peer) -> int | str:
    """Whom a client's place is held for: a local process's uid, a TCP client's login."""
    return peer.uid if peer.uid >= 0 else peer.user


def _describe_holder(peer: Peer) -> str:
    return users.describe(peer.uid) if peer.uid >= 0 else f"the login {peer.user}"


async def bind_unix(
    path: str, factory: Callable[[], asyncio.BaseProtocol], mode: int, gid: int | None
) -> asyncio.AbstractServer:
    """A unix socket born with `mode` (no window in which others could connect) and given group `gid`; a socket
    file left by a dead jobd is replaced, a live jobd's is not. Accepts nothing before start_serving()."""
    _remove_stale_socket(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old_umask = os.umask(0o777 & ~mode)  # the socket is born with its mode: no window in which others could connect
    try:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(factory, path, start_serving=False)
    finally:
        os.umask(old_umask)
    if gid is not None:
        try:
            give_socket_access(path, None, gid)
        except OSError as error:
            server.close()
            # Said of the socket and the group: the error itself names the /proc/self/fd path it went through.
            raise OSError(
                error.errno,
                f"cannot give the socket {path} the group {users.describe_group(gid)} ([daemon] socket_group): "
                f"{error.strerror or error}",
            ) from None
    return server


def give_socket_access(path: str, mode: int | None, gid: int | None) -> None:
    """Give the socket file at `path` `mode` and group `gid` through a descriptor of that very file. chmod and chown
    of the path follow a symbolic link: a user who may write the socket's directory (a socket put in an
    application's own directory) could put one there in its place, and have jobd, as root, give its mode and group
    to any file of the machine (/etc/shadow). A link or any other file in its place is refused instead."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)  # the link itself, if it is one
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, "it is no longer a socket (something else took its place); left alone", path)
        itself = f"/proc/self/fd/{fd}"  # the file the descriptor holds, whatever its path now leads to
        if mode is not None:
            os.chmod(itself, mode)
        if gid is not None:
            os.chown(itself, -1, gid)
    finally:
        os.close(fd)


# From Python 3.13 a unix server removes its socket file when it closes. A socket systemd passed belongs to its
# socket unit, which goes on listening on that path (and queueing clients) while jobd restarts: it must stay.
_KEEP_SOCKET_FILE: Final[dict[str, Any]] = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}


def _file_identity(path: str) -> tuple[int, int]:
    """What tells the file at `path` from another put there later: its device and inode numbers."""
    status = os.lstat(path)
    return status.st_dev, status.st_ino


def _passed_path(sock: socket.socket | None) -> str | None:
    """The path a socket passed by systemd is bound to (jobd.activation checked it is a unix socket)."""
    return None if sock is None else str(activation.socket_address(sock))


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead jobd; refuse to start beside a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; not touching it", permanent=True)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    else:
        raise StartupError(f"another jobd is already listening on {path}")
    finally:
        probe.close()


class _Identified:
    """A connection's peer as the configuration in force sees it: a reload that makes a connected user an admin, or
    no longer one, applies to its connection from the next request on (Peer.under), not only to later connections."""

    server: Server
    _peer: Peer
    _peer_access: AccessDef

    @property
    def peer(self) -> Peer:
        access = self.server.api.engine.config.access
        if access is not self._peer_access:  # a reload since the peer was last looked at
            self._peer = self._peer.under(access)
            self._peer_access = access
        return self._peer

    @peer.setter
    def peer(self, peer: Peer) -> None:
        """`peer` as identified under the configuration in force."""
        self._peer = peer
        self._peer_access = self.server.api.engine.config.access


class _Lingering:
    """The end of a connection whose input jobd no longer reads as requests (a refusal, an oversized frame, a framing
    error, `<quit/>`, a failed login), without losing the answers already written.

    Closing a Unix socket with unread input resets it, and the client may then never read the answers already sent.
    So: end our side (the client sees EOF after the answers), and swallow its input for LINGER_SECONDS at most.
    """

    server: Server
    transport: asyncio.Transport
    _linger: asyncio.TimerHandle | None
    _input_ended: bool

    def _write_unsent_events(self) -> None:
        """Write what waits to be written together (Connection's events) before the connection ends."""

    def _lingering_close(self) -> None:
        if self.transport.is_closing():
            return
        self._write_unsent_events()  # before an end of file, after which nothing can be written
        if self._linger is not None:
            if self._input_ended:  # the client closed its side while we lingered: nothing is left to swallow
                self.transport.close()
            return
        if not self.server.may_linger(self):  # the answers are written first; the client reads them, then a reset
            self.transport.close()
            return
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the client has reset the connection already: nothing more to send it
                self.transport.abort()
                return
        if self._input_ended:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)


class Connection(_Identified, _Lingering, asyncio.Protocol):
    """One client. Requests are read in `data_received` and answered in the same callback when they need no
    waiting (most do): a request costs one trip round the event loop, not one task and three wake-ups."""

    methods_not_served: frozenset[str] = frozenset()  # api.Session: this socket serves every method

    def __init__(self, server: Server) -> None:
        self.server = server
        self.api = server.api
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.peer = Peer(uid=-1, gid=-1, pid=0, is_admin=False)  # until connection_made
        self._buffer = bytearray()
        self._scanned = 0  # the first bytes of _buffer known to hold no newline
        self._mode: str | None = None  # "json" once the first byte chose it
        # Cleared while the client does not read its replies: no request is read, started or answered meanwhile, so
        # a client that only writes cannot make jobd hold more than MAX_UNSENT bytes and one reply for it.
        self._writable = asyncio.Event()
        self._writable.set()
        # Event lines of this turn of the loop, written together at its end (or before anything else is written, so
        # that they keep their order with the replies): one write(2) for all those a batch of jobs makes, rather than
        # one per event (a million for 1,000 subscribers of a batch of 1,000 jobs).
        self._unsent_events: list[bytes] = []
        self._unsent_events_size = 0
        self._tasks: dict[asyncio.Task[None], int] = {}  # each answering task: how many waiting requests it holds
        self._after_reply = AfterReplyWork()  # what the request being answered hands over (api.Session.after_reply)
        self._waiting = 0  # their sum: requests that wait, of this connection
        self._unsubscribe: list[Any] = []
        self._next_subscription = 1
        self._selected = 0  # ids and names its subscriptions select (MAX_SELECTED)
        self._input_ended = False  # EOF from the client: answer what is pending, then close
        self._watched_fd: int | None = None  # watched for a hang-up (Server.watch_hangup) from its first wait
        self._refusing = False  # an oversized frame ended the conversation; input is swallowed
        self._next_turn: asyncio.Handle | None = None  # REQUESTS_PER_TURN were answered: the rest go on from there
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        credentials = peer_credentials(transport.get_extra_info("socket"))
        # Past this many unsent bytes asyncio calls pause_writing(): a client that does not read its replies is
        # not read from either.
        transport.set_write_buffer_limits(high=MAX_UNSENT)
        try:
            self.peer = identify_peer(credentials.pid, credentials.uid, credentials.gid, self.api.engine.config.access)
        except OutOfResources as short:  # who it is cannot be told now: refused, not served as someone it is not
            refusal: JobdError | None = short
        else:
            refusal = self.server.refusal(self.peer)
        if refusal is not None:  # said at once, as a JSON-RPC error with a null id, whatever the client speaks
            self._send(jsonrpc.error(None, refusal))
            self._refusing = True
            self._lingering_close()
            return
        self.server.join(self, self.peer)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # lingering: swallowed until the client closes or LINGER_SECONDS pass
        if self._mode is None and not self._choose_protocol(data):
            return
        self._buffer += data
        self._take_lines()

    def _take_lines(self) -> None:
        """Dispatch the whole lines buffered, until there are none or the client stops reading its replies."""
        buffer = self._buffer
        start = 0
        answered = 0
        while self._taking and (end := buffer.find(b"\n", max(start, self._scanned))) >= 0:
            if answered == REQUESTS_PER_TURN:  # the others' turn; the lines left are taken at the next
                self._next_turn = asyncio.get_running_loop().call_soon(self._after_turn)
                break
            line = bytes(buffer[start : end + 1])
            start = end + 1
            if len(line) > jsonrpc.MAX_FRAME + 1:
                del buffer[:start]
                self._frame_too_large()
                return
            if line.strip():
                self._dispatch(line)
                answered += 1
            if self._refusing or self.transport.is_closing():
                return
        del buffer[:start]
        if not self._taking:  # lines may be left: _resume_taking() goes on with them
            self.transport.pause_reading()
            self._scanned = 0
            return
        self._scanned = len(buffer)
        if len(buffer) > jsonrpc.MAX_FRAME:
            # The rest of an oversized line cannot be told from the next request: answer, then end.
            self._frame_too_large()
        elif self._input_ended:
            if not self._refusing and bytes(buffer).strip():  # the client closed its side; a last line may lack "\n"
                self._dispatch(bytes(buffer))
            buffer.clear()
            self._close_when_answered()

    def eof_received(self) -> bool:
        self._input_ended = True
        if self._refusing:
            self._close_when_answered()
            return True
        self._take_lines()
        return True  # keep our side open for the answers still to come

    def _hung_up(self) -> None:
        """The client closed the connection for good (Server.watch_hangup). If requests of its wait, nobody can read
        their answers: they go now, not when their jobs end (the end-of-file, on the other hand, may be unread
        while MAX_WAITING of them wait). Otherwise the end-of-file closes the connection as usual."""
        if self._watched_fd is not None:  # told once: the hang-up would be reported again at every turn
            self.server.forget_hangup(self._watched_fd)
            self._watched_fd = None
        if self._waiting:
            log.debug("pid %d closed its connection with %d requests waiting: dropped", self.peer.pid, self._waiting)
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # the client went away mid-request: its business, not an error of ours
            log.debug("connection from pid %d ended: %s", self.peer.pid, exc)
        self.server.leave(self)
        self.server.refused_lingering.discard(self)
        if self._watched_fd is not None:
            self.server.forget_hangup(self._watched_fd)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        for task in self._tasks:
            task.cancel()
        for handle in (self._linger, self._next_turn):
            if handle is not None:
                handle.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        self._resume_taking()

    @property
    def _taking(self) -> bool:
        """Whether requests are read and started now: not while the client leaves its replies unread, nor while
        MAX_WAITING of its requests wait, nor in a turn of the loop that answered REQUESTS_PER_TURN of them."""
        return self._writable.is_set() and self._waiting < MAX_WAITING and self._next_turn is None

    def _after_turn(self) -> None:
        self._next_turn = None
        self._resume_taking()

    def _resume_taking(self) -> None:
        if self.transport.is_closing():
            return
        if not self._refusing:
            self._take_lines()
        if not self._input_ended and self._taking and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- requests ------------------------------------------------------------------------------------------------

    def _choose_protocol(self, data: bytes) -> bool:
        # Blanks before the first request choose nothing (JSON-RPC skips blank lines, XML allows whitespace before a
        # document): the first other byte does, whichever read brings it. They are dropped meanwhile.
        data = data.lstrip(_BLANKS)
        first = data[:1]
        if not first:
            return False
        if first == b"<":  # evQueue's XML: from now on the transport talks to an XmlConnection
            xml = XmlConnection(self.server, greet=False)
            self.server.leave(self)
            self.transport.set_protocol(xml)
            xml.adopt(self.transport, self.peer)
            xml.data_received(data)
            return False
        if first not in b"{[":
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
            self._after_reply.begin()
            reply = self._member(frame.members[0])
            try:
                if isinstance(reply, _Waiting):
                    self._spawn(self._answer_later(reply), 1)
                elif reply is not None:
                    self._send(reply)
            finally:
                self._after_reply.run()
            return
        answer = _BatchAnswer()
        for member in frame.members:  # each member's work is done before the next member runs: it may depend on it
            if answer.full:  # not run: its reply could not be held
                answer.add(answer.refusal(member))
                continue
            self._after_reply.begin()
            try:
                answer.add(self._member(member))
            finally:
                self._after_reply.run()
        waiting = answer.waiting()
        if waiting > MAX_WAITING:  # the cap holds for one line too: those members are refused, the others done
            answer.refuse_waiting(lambda reply: _too_many_waiting(reply, waiting) if _refusable(reply) else reply)
            waiting = answer.waiting()
        if waiting:
            self._spawn(self._answer_batch_later(answer), waiting)
            return
        answered = answer.line_now()
        if answered is not None:
            self._send_line(answered)

    def _member(self, member: jsonrpc.Member) -> Reply | _Waiting:
        """The reply to one request, or what will produce it when the method has to wait."""
        if isinstance(member, jsonrpc.Invalid):
            return jsonrpc.error(member.id, member.error) if member.answered else None
        if self.server.closing:
            return _failure_reply(self.api.engine, member, ShuttingDown("jobd is stopping: ask again once it is back"))
        try:
            value = self.api.call(self, member.method, member.params)
        except Exception as failure:
            return _failure_reply(self.api.engine, member, failure)
        if isinstance(value, Coroutine):
            return _Waiting(member, value, self.api.engine)
        return None if member.is_notification else jsonrpc.result(member.id, value)

    async def _until_writable(self, replies: Sequence[bytes | Reply | _Waiting]) -> None:
        """Wait while the client does not read; the methods have not run yet and start once it reads again."""
        try:
            await self.ready_for_reply()
        except asyncio.CancelledError:  # the connection is gone: the methods never run
            for reply in replies:
                if isinstance(reply, _Waiting):
                    reply.close()
            raise

    async def _answer_later(self, reply: _Waiting) -> None:
        await self._until_writable([reply])
        message = await reply.answer()
        if message is not None:
            # Made while the client did not read (a job.wait whose job ended meanwhile): written once it reads
            # again, as a request read then would be. Written at once, the answers of MAX_WAITING requests all
            # ended together (their jobs' ends, a burst of output) piled up unsent past MAX_UNSENT.
            await self.ready_for_reply()
            self._send(message)

    async def _answer_batch_later(self, answer: _BatchAnswer) -> None:
        await self._until_writable(answer.members)
        line = await answer.line()
        if line is not None:
            await self.ready_for_reply()
            self._send_line(line)

    async def ready_for_reply(self) -> None:
        # Checked again after each wake-up: the client's reading wakes every task that waits for it, and the first
        # of them to write may fill MAX_UNSENT again. Taken as woken, they all wrote (the requests held while the
        # client did not read all ran at once when it read a little: 1.2 GB of job.output answers in a soak test).
        while not self._writable.is_set():
            await self._writable.wait()

    def _spawn(self, work: Coroutine[Any, Any, None], waiting: int) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks[task] = waiting
        self._waiting += waiting
        task.add_done_callback(self._task_done)
        if self._watched_fd is None:  # from the first request that waits on, a hang-up is looked out for
            self._watched_fd = self.transport.get_extra_info("socket").fileno()
            self.server.watch_hangup(self._watched_fd, self._hung_up)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        was_taking = self._taking
        self._waiting -= self._tasks.pop(task, 0)
        if not task.cancelled() and task.exception() is not None:  # _Waiting.answer answers errors; this is a bug
            log.error("connection from pid %d: reply failed", self.peer.pid, exc_info=task.exception())
        if self._taking and not was_taking:
            self._resume_taking()
        if self._input_ended or self._refusing:
            self._close_when_answered()

    def _close_when_answered(self) -> None:
        if self._tasks or self.transport.is_closing() or (self._buffer and not self._refusing):
            return  # answers, or requests held while the client did not read, are still to come
        if self._refusing:
            self._lingering_close()
        else:
            self.transport.close()

    def _frame_too_large(self) -> None:
        error = FrameTooLarge(f"a request line is larger than {jsonrpc.MAX_FRAME} bytes", limit=jsonrpc.MAX_FRAME)
        self._send(jsonrpc.error(None, error))
        self._refusing = True
        self._buffer.clear()
        self._close_when_answered()

    def after_reply(self, work: Callable[[], None]) -> None:
        self._after_reply.add(work)

    def _send(self, message: Any) -> None:
        self._send_line(jsonrpc.encode(message))

    def _send_line(self, line: bytes) -> None:
        if self._unsent_events:
            self._write_unsent_events()
        if not self.transport.is_closing():
            self.transport.write(line)

    def _send_event(self, line: bytes) -> None:
        # Events cannot wait for a slow reader (they come from the engine, not from its requests): a subscriber
        # that lets MAX_UNSENT bytes pile up is cut off rather than grow jobd's memory.
        if self.transport.get_write_buffer_size() + self._unsent_events_size > MAX_UNSENT:
            log.warning("pid %d does not read its events: over %d bytes unsent; closing", self.peer.pid, MAX_UNSENT)
            self.abort()
            return
        if not self._unsent_events:
            asyncio.get_running_loop().call_soon(self._write_unsent_events)
        self._unsent_events.append(line)
        self._unsent_events_size += len(line)
        if self._unsent_events_size >= UNSENT_EVENTS_WRITTEN_AT:
            self._write_unsent_events()

    def _write_unsent_events(self) -> None:
        lines = self._unsent_events
        if not lines:  # written already, before a reply or at the size below
            return
        self._unsent_events = []
        self._unsent_events_size = 0
        if not self.transport.is_closing():
            self.transport.write(b"".join(lines))

    # -- Session -------------------------------------------------------------------------------------------------

    def subscribe(self, selection: EventFilter) -> int:
        if self._next_subscription > MAX_SUBSCRIPTIONS:
            raise InvalidParams(
                f"events.subscribe: this connection has {MAX_SUBSCRIPTIONS} subscriptions, the most one may have; "
                "one subscription can select several jobs, queues, instances, workflows and types"
            )
        selected = self._selected + selection.selected
        if selected > MAX_SELECTED:
            raise InvalidParams(
                f"events.subscribe: this subscription would bring the jobs, queues, instances and workflows this "
                f"connection's subscriptions select to {selected}; at most {MAX_SELECTED} may be selected on one "
                "connection: select by queue or workflow instead, or subscribe on another connection",
                limit=MAX_SELECTED,
            )
        self._selected = selected
        number = self._next_subscription
        self._next_subscription += 1

        def deliver(event: JobEvent) -> None:
            job = event.job
            rules = self.api.engine.config.access
            if selection.wants_job(rules, self.peer, event.type, job.id, job.spec.task, job.spec.queue):
                self._send_event(jsonrpc.event_line(number, self.server.encoded_event(event)))

        def deliver_instance(event: InstanceEvent) -> None:
            if selection.wants_instance(self.api.engine.config.access, self.peer, event):
                self._send_event(jsonrpc.event_line(number, self.server.encoded_event(event)))

        self._unsubscribe.append(self.api.engine.subscribe(deliver))
        self._unsubscribe.append(self.api.instances.subscribe(deliver_instance))
        return number

    def answering(self) -> list[asyncio.Task[None]]:
        """The tasks still to answer a request of this connection."""
        return list(self._tasks)

    def abort(self) -> None:
        self.transport.abort()


Reply = dict[str, Any] | None


def _failure_reply(engine: Engine, member: jsonrpc.Request, failure: Exception) -> Reply:
    if (store_failed := refused_request(member.method, failure)) is not None:
        engine.write_refused(member.method, store_failed)
        failure = store_failed
    failure = memory_shortage(failure) or failure
    if isinstance(failure, JobdError):
        reply = jsonrpc.error(member.id, failure)
    else:  # the request boundary: a bug is logged and answered, never fatal
        log.error("internal error in %s", member.method, exc_info=failure)
        reply = jsonrpc.error(member.id, JobdError(f"internal error: {type(failure).__name__}: {failure}"))
    return None if member.is_notification else reply


class _Waiting:
    """A request whose method has to wait (job.wait, ...): its coroutine, run once the client reads its replies."""

    def __init__(self, member: jsonrpc.Request, work: Coroutine[Any, Any, Any], engine: Engine) -> None:
        self.member = member
        self.work = work
        self.engine = engine

    async def answer(self) -> Reply:
        try:
            result = await self.work
        except Exception as failure:
            return _failure_reply(self.engine, self.member, failure)
        return None if self.member.is_notification else jsonrpc.result(self.member.id, result)

    def close(self) -> None:
        """The connection went away before the method ran: it never will."""
        self.work.close()


class _BatchAnswer:
    """A batch's answer while its members are done: each member's reply encoded as soon as it is made, or the
    _Waiting that will make it, and the bytes made so far. The answer is sent whole, once every member is done, so
    once it holds MAX_BATCH_ANSWER bytes (`full`) the members not answered yet are refused: those after it are not
    run, and a member that waits and ends later is answered the refusal in place of what it read (but a method that
    changed something, a job.cancel, is answered what it did). The answer holds at most MAX_BATCH_ANSWER bytes and
    one member's reply, as much as jobd holds for requests pipelined one per line."""

    def __init__(self) -> None:
        self.members: list[bytes | _Waiting] = []
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size >= MAX_BATCH_ANSWER

    def add(self, reply: Reply | _Waiting) -> None:
        if isinstance(reply, _Waiting):
            self.members.append(reply)
        elif reply is not None:
            self.members.append(self._encoded(reply))

    def _encoded(self, reply: dict[str, Any]) -> bytes:
        data = jsonrpc.encode_value(reply)
        self.size += len(data)
        return data

    @staticmethod
    def refusal(member: jsonrpc.Member) -> Reply:
        failure = InvalidRequest(
            f"not answered: this batch's answer holds {MAX_BATCH_ANSWER} bytes already, the most jobd makes for "
            "one batch; ask for the rest in another request",
            limit=MAX_BATCH_ANSWER,
        )
        if isinstance(member, jsonrpc.Invalid):
            return jsonrpc.error(member.id, failure) if member.answered else None
        return None if member.is_notification else jsonrpc.error(member.id, failure)

    def waiting(self) -> int:
        return sum(1 for member in self.members if isinstance(member, _Waiting))

    def refuse_waiting(self, refuse: Callable[[_Waiting], Reply | _Waiting]) -> None:
        """Replace each member that waits by what `refuse` makes of it."""
        members, self.members = self.members, []
        for member in members:
            if isinstance(member, _Waiting):
                self.add(refuse(member))
            else:
                self.members.append(member)

    def line_now(self) -> bytes | None:
        """The answer of a batch none of whose members waits; None if none is answered (notifications)."""
        parts = [member for member in self.members if isinstance(member, bytes)]
        return jsonrpc.encode_batch(parts) if parts else None

    async def line(self) -> bytes | None:
        # The members that wait run together: in turn, a job.wait would hold back a job.cancel after it (of the
        # same job: for ever), and each member's timeout would start when the one before it ended.
        waiting = [member for member in self.members if isinstance(member, _Waiting)]
        settled = iter(await asyncio.gather(*(self._settle(member) for member in waiting)))
        parts = [next(settled) if isinstance(member, _Waiting) else member for member in self.members]
        answered = [part for part in parts if part is not None]
        return jsonrpc.encode_batch(answered) if answered else None

    async def _settle(self, reply: _Waiting) -> bytes | None:
        if self.full and _refusable(reply) and reply.member.method not in audit.JSONRPC_MUTATING:
            reply.close()  # not run (the members before it in this turn filled the answer)
            message = self.refusal(reply.member)
        else:
            message = await reply.answer()
            if message is not None and self.full and reply.member.method not in audit.JSONRPC_MUTATING:
                message = self.refusal(reply.member)
        return None if message is None else self._encoded(message)


def _refusable(reply: Reply | _Waiting) -> TypeGuard[_Waiting]:
    """Whether a member of a batch over the cap may be refused: one whose method has not run yet. A reply waiting
    for the fsync of what its method did (a submit) is owed: the line's size bounds how many of those there are."""
    return isinstance(reply, _Waiting) and not isinstance(reply.work, DurableReply)


def _too_many_waiting(reply: _Waiting, waiting: int) -> Reply:
    reply.close()
    failure = InvalidRequest(
        f"a batch may hold at most {MAX_WAITING} requests that wait (job.wait, ...); this one held {waiting}"
    )
    return None if reply.member.is_notification else jsonrpc.error(reply.member.id, failure)


class XmlConnection(_Identified, _Lingering, asyncio.Protocol):
    """An evQueue client: one XML document per request, answered strictly in the order sent.

    evQueue's clients send a request and read its answer before the next, and the protocol has no request ids, so
    a request that waits (a synchronous launch, `instance wait`) holds back the requests sent after it on the same
    connection: they stay in `_backlog`, unparsed, until its answer is written. Requests that need no waiting are
    answered in `data_received`, like JSON ones. While a request waits, `<ping />` goes out every
    EVQUEUE_KEEPALIVE_INTERVAL seconds (one timer, re-armed only while the wait lasts).
    """

    # Whether an end of file during a wait is answered with a keep-alive (eof_received): over TCP only. On a unix
    # socket the kernel reports a full close as a hang-up by itself, and a client that only shut down its sending
    # side (`nc -N`) would read a `<ping />` before its answer for nothing.
    probe_at_eof = False

    def __init__(self, server: Server, *, greet: bool) -> None:
        self.server = server
        self.evqueue = server.evqueue
        self.greet = greet
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made or adopt
        self.peer = Peer(uid=-1, gid=-1, pid=0, is_admin=False)
        self._framer = evqueue.XmlFramer()
        # Requests not answered yet, in order; a JobdError is a framing error, answered last before closing.
        self._backlog: deque[bytes | JobdError] = deque()
        self._backlog_bytes = 0
        self._waiting: asyncio.Task[bytes] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._input_ended = False
        self._refusing = False  # a framing error or <quit/>: the rest of the input is not read as requests
        self._write_paused = False
        self._linger: asyncio.TimerHandle | None = None
        self._counted = False  # adopted: in the server's connections and the statistics (refused ones are not)
        self._watched_fd: int | None = None  # watched for a hang-up (Server.watch_hangup) from its first wait
        self._next_turn: asyncio.Handle | None = None  # REQUESTS_PER_TURN were answered: the rest go on from there

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        credentials = peer_credentials(transport.get_extra_info("socket"))
        transport.set_write_buffer_limits(high=MAX_UNSENT)
        try:
            access = self.server.api.engine.config.access
            peer = identify_peer(credentials.pid, credentials.uid, credentials.gid, access)
        except OutOfResources as short:  # who it is cannot be told now: refused, not served as someone it is not
            refusal: JobdError | None = short
        else:
            refusal = self.server.refusal(peer)
        if refusal is not None:  # a KO response where the greeting would be, then the end
            self.transport = transport
            transport.write(evqueue.response_error(self.evqueue.node, refusal))
            self._refusing = True
            self._lingering_close()
            return
        self.adopt(transport, peer)
        if self.greet:
            transport.write(self.evqueue.greeting(self.peer))

    def adopt(self, transport: asyncio.Transport, peer: Peer) -> None:
        """Take over a connection (from connection_made, or from a Connection whose first byte was `<`)."""
        self.transport = transport
        self.peer = peer
        self._join()
        self.evqueue.connected()
        self._counted = True

    def _join(self) -> None:
        self.server.join(self, self.peer)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # swallowed until the client closes or LINGER_SECONDS pass
        self._frame(data)
        self._answer_backlog()

    def _frame(self, data: bytes = b"") -> None:
        """Cut requests out of what was read (and `data`) into the backlog, until it holds REQUESTS_PER_TURN. The
        framer keeps the rest (holds_more) until the backlog is answered, and nothing more is read meanwhile: a read
        holds up to 65,000 tiny documents, and cutting them all at once held every other client up for a third of a
        second; behind a request that waits, the documents cut were kept, a million of them (60 MB) for 4 MiB."""
        try:
            documents = self._framer.feed(data, limit=max(0, REQUESTS_PER_TURN - len(self._backlog)))
        except JobdError as failure:
            self._refuse(failure)
            return
        for document in documents:
            self._backlog.append(document)
            self._backlog_bytes += len(document)
        if self._framer.failed:  # documents came before the bad bytes: they are answered first
            try:
                self._framer.feed(b"")
            except JobdError as failure:
                self._refuse(failure)
        else:
            self._refuse_if_cut_short()

    def _refuse_if_cut_short(self) -> bool:
        """After the client's end of file, once all it sent is cut into requests: bytes left are a request cut short."""
        if self._input_ended and not self._refusing and not self._framer.holds_more and self._framer.buffered:
            self._refuse(InvalidXml("the connection was shut down in the middle of a request"))
            return True
        return False

    def eof_received(self) -> bool:
        self._input_ended = True
        if not self._refuse_if_cut_short() and self._waiting is not None and self.probe_at_eof:
            # A TCP client that closed its connection looks like one that only shut down its sending side until
            # something is written to it: its end answers with a reset, which wakes the hang-up watch (_hung_up) now
            # rather than at the next keep-alive. A keep-alive is that something, and harmless to one still reading.
            self._send(evqueue.KEEPALIVE)
        self._answer_backlog()
        return True  # keep our side open for the answers still to come

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("evQueue connection from pid %d ended: %s", self.peer.pid, exc)
        self.server.leave(self)
        self.server.refused_lingering.discard(self)
        if self._watched_fd is not None:
            self.server.forget_hangup(self._watched_fd)
            self._watched_fd = None
        if self._counted:
            self.evqueue.disconnected()
        for timer in (self._keepalive, self._linger, self._next_turn):
            if timer is not None:
                timer.cancel()
        if self._waiting is not None:
            self._waiting.cancel()
        self._backlog.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._answer_backlog()  # what was held while the client did not read; then reading resumes

    # -- requests ------------------------------------------------------------------------------------------------

    def _refuse(self, failure: JobdError) -> None:
        self._backlog.append(failure)
        self._refusing = True

    def _answer_backlog(self) -> None:
        """Answer queued requests in order until one has to wait, or none is left, or REQUESTS_PER_TURN were."""
        answered = 0
        while (
            self._waiting is None
            and not self._write_paused
            and self._next_turn is None
            and not self.transport.is_closing()
        ):
            unframed = self._framer.holds_more and not self._refusing  # read, not cut into requests yet
            if not self._backlog and not unframed:
                break
            if answered == REQUESTS_PER_TURN:  # the others' turn; the rest are answered at the next
                self._next_turn = asyncio.get_running_loop().call_soon(self._after_turn)
                break
            if not self._backlog:
                self._frame()  # the next requests of what was read
                continue
            answered += 1
            item = self._backlog.popleft()
            if isinstance(item, JobdError):  # a framing error: the stream cannot be followed any further
                self._send(self.evqueue.error(item))
                self._backlog.clear()
                self._lingering_close()
                return
            self._backlog_bytes -= len(item)
            if self.server.closing:  # as for JSON-RPC (Server.closing): not run once the connections close
                answer: bytes | Coroutine[Any, Any, bytes] | None = self.evqueue.error(
                    ShuttingDown("jobd is stopping: ask again once it is back")
                )
            else:
                answer = self.evqueue.answer(self.peer, item)
            if answer is None:  # <quit/>
                self._backlog.clear()
                self._refusing = True
                self._lingering_close()
                return
            if isinstance(answer, bytes):
                self._send(answer)
            else:
                self._wait_for(answer)
        self._update_reading()
        if self._input_ended and self._waiting is None and not self._backlog and not self._framer.holds_more:
            self.transport.close()

    def _after_turn(self) -> None:
        self._next_turn = None
        self._answer_backlog()

    def _wait_for(self, answer: Coroutine[Any, Any, bytes]) -> None:
        loop = asyncio.get_running_loop()
        self._waiting = loop.create_task(answer)
        self._waiting.add_done_callback(self._answered)
        self._keepalive = loop.call_later(EVQUEUE_KEEPALIVE_INTERVAL, self._ping)
        if self._watched_fd is None:  # from the first request that waits on, a hang-up is looked out for
            self._watched_fd = self.transport.get_extra_info("socket").fileno()
            self.server.watch_hangup(self._watched_fd, self._hung_up)

    def _hung_up(self) -> None:
        """The client closed the connection for good (Server.watch_hangup, as for JSON-RPC's Connection). A request
        of its wait (an `instance wait`, a synchronous launch): nobody can read its answer, so it goes now, with the
        connection, rather than at the next keep-alive that fails to be written. Otherwise the end-of-file closes
        the connection as usual."""
        if self._watched_fd is not None:  # told once: the hang-up would be reported again at every turn
            self.server.forget_hangup(self._watched_fd)
            self._watched_fd = None
        if self._waiting is not None:
            log.debug("pid %d closed its evQueue connection with a request waiting: dropped", self.peer.pid)
            self.transport.abort()

    def _ping(self) -> None:
        # A client that lets MAX_UNSENT bytes pile up while it waits is gone or stuck: cut it off (its wait ends).
        if self.transport.get_write_buffer_size() > MAX_UNSENT:
            log.warning("pid %d does not read its evQueue answers; closing", self.peer.pid)
            self.transport.abort()
            return
        self._send(evqueue.KEEPALIVE)
        self._keepalive = asyncio.get_running_loop().call_later(EVQUEUE_KEEPALIVE_INTERVAL, self._ping)

    def _answered(self, task: asyncio.Task[bytes]) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._waiting = None
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:  # EvQueue.answer's coroutines answer every error; this is a bug
            log.error("evQueue connection from pid %d: answer failed", self.peer.pid, exc_info=failure)
            self.transport.abort()
            return
        self._send(task.result())
        self._answer_backlog()

    def _update_reading(self) -> None:
        """Read while answers flow and the backlog is small, and what was read is cut into requests; a client that
        pipelines faster than its requests are answered, or does not read its answers, is not read from either."""
        if self.transport.is_closing() or self._input_ended:
            return
        if (
            self._write_paused
            or self._backlog_bytes > MAX_UNSENT
            or self._next_turn is not None
            or self._framer.holds_more
        ):
            self.transport.pause_reading()
        elif not self.transport.is_reading():
            self.transport.resume_reading()

    def _send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def answering(self) -> list[asyncio.Task[bytes]]:
        """The task still to answer a request of this connection (one at a time), if any."""
        return [] if self._waiting is None else [self._waiting]

    def abort(self) -> None:
        self.transport.abort()


class TcpXmlConnection(XmlConnection):
    """An evQueue client on the TCP listener: challenge, `<auth>`, then an XmlConnection as the login's Peer.

    Until the login succeeds the peer is nobody (uid -1, no rights) and the only request read is the first: an
    `<auth response user/>` checked against `[tcp.users]`, or anything else, answered "Expected 'auth' node"
    before closing. A failed login is answered "Invalid authentication" only after the source address's current
    delay (a timer; `LoginThrottle`), then the connection closes. Logins apply the `[tcp]` of the running
    configuration, so a reload changes who may log in from the next connection on; and a session whose login a
    reload removes or changes (its password, `admin` or `groups`) ends then (`end_if_revoked`).
    """

    probe_at_eof = True  # a TCP peer's close is an end of file, as a half close is, until written to

    def __init__(self, server: Server) -> None:
        super().__init__(server, greet=False)
        self._challenge = evqueue_auth.new_challenge()
        self._logged_in = False
        self._failing = False  # a failed login waits for its delay: nothing more is read
        self._login: RemoteUser | None = None  # `[tcp.users.NAME]` as the session logged in with it
        self.address = "?"
        self._timer: asyncio.TimerHandle | None = None  # the login deadline, then a failed login's delay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(high=MAX_UNSENT)
        peer_name = transport.get_extra_info("peername")
        self.address = str(peer_name[0]) if peer_name else "?"
        refusal = self.server.login_refusal(self.address)
        if refusal is not None:  # a KO response where the challenge would be, then the end, at once
            # Not the lingering close of the unix sockets: anyone who can reach the port could hold a descriptor
            # for each refused connection that way, until jobd had none left.
            self.transport = transport
            transport.write(evqueue.response_error(self.evqueue.node, refusal))
            self._refusing = True
            transport.close()  # the answer is sent first
            return
        self.adopt(transport, self.peer)
        self._send(evqueue_auth.challenge_document(self.evqueue.node, self._challenge))
        self._timer = asyncio.get_running_loop().call_later(LOGIN_TIMEOUT, self._login_timed_out)

    def _join(self) -> None:
        self.server.logging_in.add(self)  # counted against max_connections once logged in

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.server.logging_in.discard(self)
        super().connection_lost(exc)

    def _answer_backlog(self) -> None:
        if self._logged_in:
            super()._answer_backlog()
            return
        if self._linger is not None and self._input_ended:
            # Refused and answered, and the client's end of file has come: it has gone (or reads no more). Lingering
            # on would hold its address's login place for LINGER_SECONDS, locking out a mistyped password's retry.
            self.transport.close()
            return
        if self._failing or self.transport.is_closing():
            return
        if not self._backlog:
            if self._input_ended:
                self.transport.close()
            return
        item = self._backlog.popleft()
        if isinstance(item, JobdError):  # a framing error: answered at once, like any request that is no <auth>
            self._refuse_login(item)
            return
        self._backlog_bytes -= len(item)
        self._log_in(item)

    def _log_in(self, document: bytes) -> None:
        try:
            request = evqueue.parse_request(document)
        except JobdError as failure:
            self._refuse_login(failure)
            return
        if request.group != "auth":
            self._refuse_login(evqueue_auth.AuthError(evqueue_auth.EXPECTED_AUTH))
            return
        tcp = self.server.api.engine.config.tcp
        login = request.attributes.get("user", "")
        user = tcp.users.get(login)
        if evqueue_auth.verify(user, self._challenge, request.attributes.get("response", "")):
            assert user is not None
            self._cancel_timer()
            self.server.logging_in.discard(self)
            peer = Peer(uid=-1, gid=-1, pid=0, is_admin=user.admin, user=user.name, groups=user.groups)
            refusal = self.server.refusal(peer)
            if refusal is not None:  # logged in, but max_connections clients are connected
                self._refuse_login(refusal)
                return
            self.server.join(self, peer)
            self._logged_in = True
            self._login = user
            self.peer = peer
            log.info("evQueue login as %s from %s (%s)", user.name, self.address, "ADMIN" if user.admin else "USER")
            self._send(self.evqueue.greeting(self.peer))
            super()._answer_backlog()  # requests sent right after the <auth>, if any
            return
        loop = asyncio.get_running_loop()
        delay = self.server.login_throttle.failed(self.address, loop.time(), tcp.login_delay, tcp.login_delay_max)
        log.warning("failed evQueue login as %r from %s; answered in %g s", login[:64], self.address, delay)
        self._failing = True
        self._refusing = True  # what the client sends meanwhile is not read as requests
        self._backlog.clear()
        self.transport.pause_reading()
        self._cancel_timer()
        error = evqueue_auth.AuthError(evqueue_auth.INVALID_AUTHENTICATION)
        self._timer = loop.call_later(delay, self._refuse_login, error)

    def _refuse_login(self, failure: JobdError) -> None:
        """Answer the error and close: evQueue ends a connection whose login failed."""
        self._cancel_timer()
        self._refusing = True
        self._backlog.clear()
        self._send(self.evqueue.error(failure))
        self._lingering_close()

    def end_if_revoked(self, users: Mapping[str, RemoteUser]) -> None:
        """At a reload: end the session if its login is no longer what it logged in with. A login removed, or given
        a new password (as when the old one leaked), is revoked, and one no longer `admin` (or in other `groups`)
        no longer gives what the session was let in with; kept on, the session had it all for as long as its
        client kept the connection. The client is told (AUTH_ERROR, as the answer to its request if one waits:
        that request is dropped) and may log in again as what the login now is."""
        login = self._login
        if login is None or self._refusing or users.get(login.name) == login:
            return
        what = "removed" if login.name not in users else "changed"
        log.info("ending the evQueue session of the login %s from %s: a reload %s it", login.name, self.address, what)
        if self._waiting is not None:  # its answer would follow the end of the connection
            self._waiting.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._refuse_login(
            evqueue_auth.AuthError(f"the login {login.name} was {what} by a reload of jobd's configuration")
        )

    def _login_timed_out(self) -> None:
        self._timer = None
        log.debug("evQueue client at %s did not log in within %g s; disconnecting", self.address, LOGIN_TIMEOUT)
        self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
