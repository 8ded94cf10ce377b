"""How many file descriptors jobd may hold at once for its configuration, and its soft limit on open files raised
to fit.

systemd starts a service with a soft limit of 1024 open files (and a hard limit of 524288): enough for the
defaults, not for many job slots or clients. Past the soft limit, accept() and pipe() fail with EMFILE: clients
wait in the listen backlog, and jobs are put back to start again later, each failed start recorded as an attempt
(`spawn_error`, "Too many open files"). So jobd raises its own soft limit to what its configuration may need,
never above the hard limit (the administrator's `LimitNOFILE=`), and never lowers it. Jobs inherit the limit as
jobd has it when they start.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from jobd.model import ADMIN_CONNECTIONS, HTTP_CALLBACKS_AT_ONCE, Config

# Held by a running job: the read ends of its stdout, stderr and fd 3 pipes, its pidfd, and up to three output
# files; for a moment while it starts, two more (the pipe that tells subprocess whether the exec failed).
PER_JOB_SLOT = 8
# HTTP callbacks under way at most (HTTP_CALLBACKS_AT_ONCE), each a connection; and a margin for the
# connections both sessions keep alive after a request (one per host, about 15 s): HTTP jobs' connections in use are
# counted in their queues' slots (PER_JOB_SLOT), but their idle ones are bounded only by the hosts they call.
HTTP_CLIENT_CONNECTIONS = 2 * HTTP_CALLBACKS_AT_ONCE
# The database, its WAL and shared memory, the listeners, epoll sets, inotify, the timerfd, the log, the state
# lock, the signal wake-up pair, /dev/null for a job's stdin, TCP clients still logging in (server.LOGINS_UNDER_WAY),
# refused clients lingering (server.REFUSED_LINGERING).
RESERVED = 128


@dataclass(frozen=True, slots=True)
class Fit:
    needed: int
    before: int  # the soft limit found
    after: int  # the soft limit now
    hard: int

    @property
    def short(self) -> bool:
        """The hard limit keeps the soft one below what may be needed (RLIM_INFINITY, -1, is no limit: Linux never
        grants it for open files, but the value is checked rather than trusted)."""
        return self.after != resource.RLIM_INFINITY and self.after < self.needed


def needed(config: Config) -> int:
    """Descriptors jobd may hold at once: every job slot of every queue full, and as many clients as
    max_connections allows on the local sockets and on the HTTP listener (which counts its own)."""
    slots = sum(queue.concurrency for queue in config.queues.values())
    local = config.daemon.max_connections + ADMIN_CONNECTIONS
    clients = local + (config.daemon.max_connections if config.http.listen is not None else 0)
    return RESERVED + clients + PER_JOB_SLOT * slots + HTTP_CLIENT_CONNECTIONS


def fit(config: Config) -> Fit:
    """Raise the soft limit on open files towards what `config` may need, as far as the hard limit allows."""
    want = needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return Fit(want, soft, soft, hard)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return Fit(want, soft, max(new, soft), hard)
