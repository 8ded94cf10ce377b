"""systemd's socket activation and watchdog protocols, read from the environment (sd_listen_fds(3),
sd_watchdog_enabled(3)); written here rather than linked from libsystemd, as they are a few environment variables.

Socket activation: systemd (or `systemd-socket-activate`) starts jobd with its listening sockets open from fd 3 on,
`LISTEN_FDS` saying how many, `LISTEN_PID` saying for which process (a child forked before exec must not take them),
and `LISTEN_FDNAMES` naming them (`FileDescriptorName=` in the socket unit), colon-separated. jobd picks its
listeners by name (`LISTENERS`).

Watchdog: `WATCHDOG_USEC` is the interval within which systemd wants `WATCHDOG=1`; `WATCHDOG_PID`, when set, says
for which process.

Both sets of variables are removed from jobd's environment once read (as sd_listen_fds(3) does when asked), so no
child jobd ever starts could believe it was socket-activated or watched (jobs get a fresh environment anyway).
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import MutableMapping

from jobd.errors import StartupError

SD_LISTEN_FDS_START = 3  # the first passed descriptor, fixed by the protocol

# FileDescriptorName= → what jobd serves on it (docs/config.md, "Socket activation").
LISTENERS = {
    "api": "the API socket ([daemon] socket)",
    "evqueue": "the evQueue socket ([daemon] evqueue_socket)",
    "http": "the HTTP listener ([http] listen)",
    "tcp": "the evQueue TCP listener ([tcp] listen)",
}
# Which socket families each listener accepts: the API and evQueue sockets rely on peer credentials.
_FAMILIES = {
    "api": (socket.AF_UNIX,),
    "evqueue": (socket.AF_UNIX,),
    "http": (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6),
    "tcp": (socket.AF_INET, socket.AF_INET6),
}
_FAMILY_NAMES = {socket.AF_UNIX: "unix", socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def take_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets systemd passed to this process, by name; {} when none were (or not for us).

    Call before anything opens a file: the passed descriptors sit at fd 3 and up, where the next open() would not
    land but where jobd keeps its own fixed descriptors (proc.reserve_progress_fd puts /dev/null on fd 3). Each one
    is therefore moved above the passed range, marked close-on-exec (jobs must not inherit a listening socket), and
    the original number closed.

    Raises StartupError for a malformed protocol (counts that disagree, a descriptor that is not a listening stream
    socket, a name jobd does not know or given twice): the units and jobd disagree, and guessing would serve the
    wrong protocol on a socket.
    """
    env = os.environ if environ is None else environ
    listen_pid = env.pop("LISTEN_PID", None)
    listen_fds = env.pop("LISTEN_FDS", None)
    listen_names = env.pop("LISTEN_FDNAMES", None)
    if listen_pid is None or listen_fds is None:
        return {}
    if not listen_pid.isdigit() or int(listen_pid) != os.getpid():
        return {}  # meant for another process (a parent that exec'd us without clearing them): not ours to touch
    if not listen_fds.isdigit():
        raise StartupError(f"socket activation: LISTEN_FDS={listen_fds!r} is not a number")
    count = int(listen_fds)
    if count == 0:
        return {}
    names = listen_names.split(":") if listen_names is not None else []
    if len(names) != count:
        raise StartupError(
            f"socket activation: {count} sockets passed but {len(names)} names in LISTEN_FDNAMES={listen_names!r}; "
            f"give each one FileDescriptorName= (one of {', '.join(LISTENERS)})"
        )
    moved: dict[str, socket.socket] = {}
    try:
        for offset, name in enumerate(names):
            fd = SD_LISTEN_FDS_START + offset
            _check_passed(fd, name, moved)
            # F_DUPFD_CLOEXEC: the lowest free number >= the end of the passed range, close-on-exec from birth.
            new_fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SD_LISTEN_FDS_START + count)
            os.close(fd)
            sock = socket.socket(fileno=new_fd)
            moved[name] = sock
            if sock.family not in _FAMILIES[name]:
                wanted = " or ".join(_FAMILY_NAMES[f] for f in _FAMILIES[name])
                raise StartupError(
                    f"socket activation: the socket named {name!r} is a {_FAMILY_NAMES.get(sock.family, 'other')} "
                    f"socket; {LISTENERS[name]} must be {wanted}"
                )
    except BaseException:
        for sock in moved.values():
            sock.close()
        raise
    return moved


def _check_passed(fd: int, name: str, seen: dict[str, socket.socket]) -> None:
    if name not in LISTENERS:
        raise StartupError(
            f"socket activation: fd {fd} is named {name!r}, which jobd does not serve; "
            f"set FileDescriptorName= to one of {', '.join(LISTENERS)}"
        )
    if name in seen:
        raise StartupError(f"socket activation: two sockets are named {name!r}; each listener takes one socket")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise StartupError(f"socket activation: fd {fd} ({name!r}) is not open: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"socket activation: fd {fd} ({name!r}) is not a socket")
    probe = socket.socket(fileno=os.dup(fd))  # a copy to ask, so the close below leaves fd alone
    try:
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        probe.close()
    if kind != socket.SOCK_STREAM or not listening:
        raise StartupError(
            f"socket activation: fd {fd} ({name!r}) is not a listening stream socket "
            "(use ListenStream= without Accept=)"
        )


def socket_address(sock: socket.socket) -> str | tuple[str, int]:
    """Where a passed socket listens, as the configuration would say it: a path, or (IP address, port)."""
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(address, bytes):  # an abstract socket ("@name" in a socket unit)
            return "@" + address.lstrip(b"\0").decode(errors="replace")
        return str(address)
    return str(address[0]), int(address[1])


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd wants WATCHDOG=1 from this process, or None when it does not watch it."""
    env = os.environ if environ is None else environ
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if usec is None or not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
