"""pytest fixtures: real jobd daemons (tests/harness.py), checked for zombies and a clean exit at teardown."""

from __future__ import annotations

import compileall
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import debian_support
import pytest
from harness import REPO, Daemon
from recovery.support import attach, stop_pumps


def pytest_configure(config: pytest.Config) -> None:
    """jobd's bytecode, compiled once before the tests start (by the xdist controller, before its workers).

    The suite starts thousands of Python processes that import jobd: daemons, jobctl, shims. Python caches the
    bytecode of what it imports in __pycache__ (ignored by git), but not where PYTHONDONTWRITEBYTECODE is set, as on
    the team's machines: each of those processes then compiled jobd's modules from their source again, about 0.3 s
    of CPU per daemon. Python still reads a cache it does not write, and checks it against the source's mtime and
    size, so a module changed later is compiled anew as it would be anyway. A checkout that cannot be written to
    (quiet=2: nothing said) runs as before.
    """
    if not hasattr(config, "workerinput"):
        compileall.compile_dir(REPO / "jobd", quiet=2)
    # A suite started in the background by a shell without job control (`make test &`, a CI runner, nohup) has
    # SIGINT ignored, and an ignored disposition is inherited through exec: every jobctl a test started then ignored
    # the Ctrl-C the test sent it, as it must (jobctl keeps an inherited SIG_IGN, as shells expect), and the test
    # failed after its 30 s deadline. The tests' processes start as from an interactive shell, SIGINT at its default;
    # those that check an inherited SIG_IGN set it themselves. (In xdist's workers too: they inherit the ignoring.)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    """Factory: make_daemon(config_toml, start=True) -> Daemon. Every daemon is checked and stopped at teardown."""
    made: list[Daemon] = []

    def make(config: str = "", *, start: bool = True, daemon_extra: str = "") -> Daemon:
        daemon = Daemon(tmp_path / f"d{len(made)}", config, daemon_extra)
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in made:
        if daemon.running():
            zombies = _unreaped_children(daemon)
            code = daemon.stop()
            assert not zombies, f"zombie children of jobd: {zombies}"
            assert code == 0, f"jobd exited with {code}; log:\n{daemon.log()}"


def _unreaped_children(daemon: Daemon) -> list[int]:
    """Children of jobd left as zombies: processes that exited and that jobd will not reap.

    A job that exits as the test ends is a zombie until jobd's event loop reads its pidfd. Two round trips through
    the loop (pings) let jobd handle every pidfd that was readable before they began, so a zombie seen before and
    still there after them is one jobd missed, not one it was about to reap.
    """
    zombies = {pid for pid, state in daemon.children() if state == "Z"}
    if zombies:
        with daemon.client() as client:
            client.call("ping")
            client.call("ping")
        zombies &= {pid for pid, state in daemon.children() if state == "Z"}
    return sorted(zombies)


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    """A daemon with a `default` queue of concurrency 2 and a few tasks."""
    d: Daemon = make_daemon(
        """
        [queue.default]
        concurrency = 2

        [queue.serial]
        concurrency = 1

        [task.echo]
        command = ["/bin/echo"]

        [task.envtask]
        command = ["/bin/sh", "-c", 'echo "A=$A B=$B"']
        parameters = "env"
        """
    )
    return d


@pytest.fixture
def jobd(make_daemon: Any) -> Iterator[Callable[..., Daemon]]:
    """Factory like make_daemon, plus a thread draining each daemon's NOTIFY_SOCKET so tests can wait on what
    jobd tells systemd (tests/recovery/support.py: pump_of(daemon).wait_for(...))."""
    made: list[Daemon] = []

    def make(config: str = "", daemon_extra: str = "") -> Daemon:
        daemon: Daemon = make_daemon(config, daemon_extra=daemon_extra)
        attach(daemon)
        made.append(daemon)
        return daemon

    yield make
    stop_pumps(made)


@pytest.fixture
def small_state_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs as the state directory of the first daemon made (d0): its database's disk can fill up
    (recovery.support.fill)."""
    mount = tmp_path / "d0" / "state"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


class FsyncHold:
    """Holds every fsync of a file system (FsyncHold.disk, an ext4 in a file on another ext4, each on a loop device):
    while the outer one is frozen (fsfreeze), writes to the inner one still land in its page cache, but an fsync,
    which must write them through to the outer one's file, waits until the outer one is thawed."""

    def __init__(self, outer: Path) -> None:
        self.outer = outer
        self.held = False

    def hold(self) -> None:
        subprocess.run(["fsfreeze", "--freeze", str(self.outer)], check=True)
        self.held = True

    def release(self) -> None:
        if self.held:
            subprocess.run(["fsfreeze", "--unfreeze", str(self.outer)], check=True)
            self.held = False


@pytest.fixture
def fsync_held_state_disk(tmp_path: Path) -> Iterator[FsyncHold]:
    """The state directory of the first daemon made (d0) on a file system whose fsyncs a test can hold (FsyncHold).
    Request it before make_daemon: the daemon is then stopped before its file systems are unmounted."""
    outer, state = tmp_path / "outer", tmp_path / "d0" / "state"
    outer.mkdir()
    state.mkdir(parents=True)
    for image, size, mount in ((tmp_path / "outer.img", "64M", outer), (outer / "inner.img", "32M", state)):
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)  # the loop device is freed with it
    state.chmod(0o750)
    hold = FsyncHold(outer)
    yield hold
    hold.release()
    for mount in (state, outer):  # lazily all the same: a daemon still running keeps its files
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def full_output_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs to hold the job output of the first daemon make_daemon starts (request this fixture before
    the daemon): a disk that fills up while a job prints."""
    mount = tmp_path / "d0" / "state" / "output"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's Debian package, built once in the run for both files of its tests (debian_support.built_once)."""
    return debian_support.built_once("checkout", tmp_path_factory, debian_support.checkout_package)
