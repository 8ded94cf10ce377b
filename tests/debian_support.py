"""Building jobd's Debian package and installing it in a throw-away systemd: what tests/test_debian_package.py and
tests/test_debian_upgrades.py share.

Build: the checkout's tracked and new (not ignored) files are copied to a temporary directory, where
debian/vendor/fetch gets the upstream sdists the package bundles (PyPI the first time, then ~/.cache/jobd/vendor)
and `dpkg-buildpackage -us -uc -b` builds jobd_*.deb, with a PATH of the system's directories only (a pyenv or
venv python3 first on PATH would otherwise be the interpreter pybuild builds with). Each package is built once in
a run (built_once), however many test files and pytest-xdist workers use it.

Install: apt-get installs the .deb inside a throw-away systemd (../shared/tools/sdns.sh boots one as PID 1 of
private namespaces), so the maintainer scripts enable, start, restart (upgrade) and stop (remove) the units under
a real systemd, as on a server (a container image's policy-rc.d, which forbids it, is removed). Overlay mounts
on /usr, /etc and /var inside the namespace (seen by nothing outside it) take every write of apt, dpkg and the
maintainer scripts: the host's dpkg database, files and groups are never changed, and a test that dies halfway
leaves nothing to clean up (sd_down runs when the bash process that booted it sees its stdin close). Installing
uses no network (apt-get with no package sources): `make test` installs the package's Depends (DEB_PACKAGES).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sdns_driver
from harness import REPO, SDNS

TIMEOUT = 300.0  # hang guard for each command (the build, apt); never a measurement
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# apt with no package sources: it knows only what is installed and the .deb, so it cannot download anything; a
# missing dependency fails the install. (--no-download would do, but apt 2.6 refuses it with a local .deb.)
NO_SOURCES = ("-o", "Dir::Etc::SourceList=/dev/null", "-o", "Dir::Etc::SourceParts=/dev/null")
CLEAN_ENV = {"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

MARKS = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not SDNS.exists() or not Path("/lib/systemd/systemd").exists(),
        reason=f"needs root, sdns.sh (not at {SDNS}; set SDNS_SH) and Debian's systemd",
    ),
    pytest.mark.timeout(900),  # the build and lintian are slow on a loaded machine; every command has TIMEOUT
]


def run(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def copy_checkout(dest: Path) -> None:
    listed = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in sorted(set(listed.stdout.split("\0")) - {""}):
        source = REPO / name
        if not os.path.lexists(source):  # deleted in the working tree, not yet in git
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def build(source: Path, version: str | None = None) -> Path:
    """The package built from the tree `source` (in a directory of its own), as `version` if given: the changelog's
    0.1.0 is replaced by it."""
    if version is not None:
        changelog = source / "debian" / "changelog"
        text = changelog.read_text()
        assert text.startswith("jobd (0.1.0) "), text.splitlines()[0]
        changelog.write_text(text.replace("jobd (0.1.0) ", f"jobd ({version}) ", 1))
    run([str(source / "debian" / "vendor" / "fetch")], env={**os.environ, "PIP": f"{sys.executable} -m pip"})
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, env=CLEAN_ENV)
    debs = list(source.parent.glob("jobd_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def built_once(name: str, factory: pytest.TempPathFactory, make: Callable[[Path], Path]) -> Path:
    """The package `name`, made by make(an empty directory) once in the run. Under pytest-xdist each worker's base
    temporary directory is in the run's own: there the first worker to ask builds it while any other waits on its
    lock (in the kernel, flock), then finds where it is. A build that failed is made again by the next to ask."""
    base = factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    made = shared / f"deb-{name}.made"  # the built .deb's path, written once it is built
    with open(shared / f"deb-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if made.exists():
            return Path(made.read_text())
        directory = shared / f"deb-{name}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        deb = make(directory)
        made.write_text(str(deb))
        return deb


def checkout_package(directory: Path) -> Path:
    """This checkout's package, as its debian/changelog says (0.1.0)."""
    source = directory / "jobd"
    copy_checkout(source)
    return build(source)


def version_ge(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "ge", b], timeout=TIMEOUT).returncode == 0


class Sdns(sdns_driver.Sdns):
    """One throw-away systemd; commands run in it with the clean environment of a root shell."""

    def __init__(self) -> None:
        super().__init__(TIMEOUT)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.enter(*args), text=True, capture_output=True, timeout=TIMEOUT, env=CLEAN_ENV)

    def ns(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def exists(self, path: str) -> bool:
        return os.path.lexists(f"{self.root}{path}")


@contextlib.contextmanager
def booted() -> Iterator[Sdns]:
    """A throw-away systemd whose /usr, /etc and /var take writes in overlays of its own, ready for apt and dpkg."""
    system = Sdns()
    try:
        overlay = system.work / "overlay"
        for name in ("usr", "etc", "var"):
            (overlay / f"{name}.upper").mkdir(parents=True)
            (overlay / f"{name}.work").mkdir()
        (overlay / "keep").mkdir()
        # sdns put a tmpfs on /etc/systemd/system: moved aside while /etc gets its overlay, then back on top.
        system.ns("sh", "-ec", f"""
            for d in usr var; do
              mount -t overlay overlay -o lowerdir=/$d,upperdir={overlay}/$d.upper,workdir={overlay}/$d.work /$d
            done
            mount --move /etc/systemd/system {overlay}/keep
            mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay}/etc.upper,workdir={overlay}/etc.work /etc
            mount --move {overlay}/keep /etc/systemd/system
            touch /etc/passwd /etc/shadow /etc/group /etc/gshadow
            if getent passwd jobd >/dev/null; then userdel jobd; fi
            if getent group jobd >/dev/null; then groupdel --force jobd; fi
            systemctl daemon-reload
            rm -f /usr/sbin/policy-rc.d
            rm -f /var/lib/man-db/auto-update
        """)  # fmt: skip
        # (The overlay's /etc is the machine's until written: the group jobd that test modules of this suite, or of
        # another checkout's, make on the machine for a while (harness.socket_group(): jobd's default socket group)
        # would show in it, and the package would find a group jobd already there. `touch` copies the account files
        # up into the overlay, so that what the machine's tests make or remove from now on is not seen in it; then
        # jobd's accounts are removed from that copy, as on a server jobd was never installed on.)
        # (A container image's policy-rc.d, exit 101, forbids maintainer scripts to start or restart services; a
        # server has none. Removed in the overlay, the scripts act as on a server.)
        # (man-db's trigger updates the machine's manual page index after each install, upgrade and purge: some 3 s
        # of CPU each time, more than half of an install's, for an index no test reads. Without this flag file
        # (debconf's man-db/auto-update = false, as in Debian's container images) the trigger runs and skips that
        # work. The pages themselves are checked in the package (tests/test_debian_package.py), and by lintian.)
        yield system
    finally:
        system.down()
