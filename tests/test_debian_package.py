"""The Debian package (debian/): built from this checkout, checked by lintian, installed, used and purged for real.

Build: the checkout's tracked and new (not ignored) files are copied to a temporary directory, where
debian/vendor/fetch gets the upstream sdists the package bundles (PyPI the first time, then ~/.cache/jobd/vendor)
and `dpkg-buildpackage -us -uc -b` builds jobd_*.deb, with a PATH of the system's directories only (a pyenv or
venv python3 first on PATH would otherwise be the interpreter pybuild builds with). The upgrade tests build two more:
the first packaged jobd, from git history, as 0.1.0~prev (to upgrade from), and this checkout as 0.1.0+next with
a changed /etc/jobd/jobd.toml (to upgrade to).

Install: apt-get installs the .deb inside a throw-away systemd (../shared/tools/sdns.sh boots one as PID 1 of
private namespaces), so the maintainer scripts enable, start, restart (upgrade) and stop (remove) the units under
a real systemd, as on a server (a container image's policy-rc.d, which forbids it, is removed). Overlay mounts
on /usr, /etc and /var inside the namespace (seen by nothing outside it) take every write of apt, dpkg and the
maintainer scripts: the host's dpkg database, files and groups are never changed, and a test that dies halfway
leaves nothing to clean up (sd_down runs when the bash process that booted it sees its stdin close). Installing
uses no network (apt-get with no package sources): `make test` installs the package's Depends (DEB_PACKAGES).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sdns_driver
from harness import REPO, SDNS

from jobd.store import SCHEMA_VERSION

TIMEOUT = 300.0  # hang guard for each command (the build, apt); never a measurement
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# apt with no package sources: it knows only what is installed and the .deb, so it cannot download anything; a
# missing dependency fails the install. (--no-download would do, but apt 2.6 refuses it with a local .deb.)
NO_SOURCES = ("-o", "Dir::Etc::SourceList=/dev/null", "-o", "Dir::Etc::SourceParts=/dev/null")
CLEAN_ENV = {"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not SDNS.exists() or not Path("/lib/systemd/systemd").exists(),
        reason=f"needs root, sdns.sh (not at {SDNS}; set SDNS_SH) and Debian's systemd",
    ),
    pytest.mark.timeout(900),  # the build and lintian are slow on a loaded machine; every command has TIMEOUT
]

# pyproject's dependency name -> the Debian package the .deb must depend on; the others are bundled.
DEBIAN_PACKAGES = {
    "peewee": "python3-peewee",
    "aiohttp": "python3-aiohttp",
    "lxml": "python3-lxml",
    "sdnotify": "python3-sdnotify",
}
BUNDLED = {"inotify-simple": "inotify_simple", "croniter": "croniter"}
# The package's system groups: members of jobd may connect to the sockets, those of jobd-admin are administrators
# (the shipped [access] admins).
GROUPS = ("jobd", "jobd-admin")


def _run(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def _copy_checkout(dest: Path) -> None:
    listed = _run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in sorted(set(listed.stdout.split("\0")) - {""}):
        source = REPO / name
        if not os.path.lexists(source):  # deleted in the working tree, not yet in git
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def _build(source: Path, version: str | None = None) -> Path:
    """The package built from the tree `source` (in a directory of its own), as `version` if given: the changelog's
    0.1.0 is replaced by it."""
    if version is not None:
        changelog = source / "debian" / "changelog"
        text = changelog.read_text()
        assert text.startswith("jobd (0.1.0) "), text.splitlines()[0]
        changelog.write_text(text.replace("jobd (0.1.0) ", f"jobd ({version}) ", 1))
    _run([str(source / "debian" / "vendor" / "fetch")], env={**os.environ, "PIP": f"{sys.executable} -m pip"})
    _run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, env=CLEAN_ENV)
    debs = list(source.parent.glob("jobd_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("deb") / "jobd"
    _copy_checkout(source)
    return _build(source)


def _requirements() -> dict[str, str]:
    """pyproject's dependencies: name -> its lower bound (every one of them has a `>=`)."""
    bounds = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, rest = requirement.partition(">=")
        bounds[name.strip()] = rest.split(",")[0].strip()
    return bounds


def _version_ge(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "ge", b], timeout=TIMEOUT).returncode == 0


def test_lintian_reports_no_errors_nor_warnings(deb: Path) -> None:
    """Nor info tags: the one that applies (no init.d script) is overridden in debian/jobd.lintian-overrides,
    with the reason. (They are looked for in the output: lintian 2.116's --fail-on info fails on an overridden
    one too.)"""
    done = subprocess.run(
        ["lintian", "--display-info", "--fail-on", "error,warning", str(deb)],
        text=True,
        capture_output=True,
        timeout=TIMEOUT,
        env=CLEAN_ENV,
    )
    tags = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:", "I:")]
    assert tags == [] and done.returncode == 0, done.stdout + done.stderr


def test_contents_conffile_and_depends(deb: Path, tmp_path: Path) -> None:
    listing = _run(["dpkg-deb", "--contents", str(deb)]).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    units = "/lib/systemd/system" if "/lib/systemd/system/jobd.service" in paths else "/usr/lib/systemd/system"
    expected = {
        "/usr/bin/jobd",
        "/usr/bin/jobctl",
        "/usr/lib/python3/dist-packages/jobd/daemon.py",
        f"{units}/jobd.service",
        f"{units}/jobd.socket",
        "/usr/lib/sysusers.d/jobd.conf",
        "/usr/lib/tmpfiles.d/jobd.conf",
        "/usr/share/man/man8/jobd.8.gz",
        "/usr/share/man/man1/jobctl.1.gz",
        "/usr/share/man/man5/jobd.toml.5.gz",
        "/usr/share/man/man5/jobd-workflow.5.gz",
        "/usr/share/man/man7/jobd-protocol.7.gz",
        "/usr/share/bash-completion/completions/jobctl",
        "/etc/jobd/jobd.toml",
        "/usr/share/jobd/vendor/inotify_simple.py",
        "/usr/share/jobd/vendor/croniter/croniter.py",
        "/usr/share/doc/jobd/copyright",
    }
    assert expected - paths == set()
    assert {"/usr/share/doc/jobd/README.Debian", "/usr/share/doc/jobd/README.Debian.gz"} & paths
    # Bundled modules stay private: only jobd itself is in the public module directory.
    public = {p.split("/")[5] for p in paths if p.startswith("/usr/lib/python3/dist-packages/") and p.count("/") > 5}
    assert public == {"jobd", "jobd-0.1.0.dist-info"}
    # The config shipped is the example config, as a conffile.
    assert _run(["dpkg-deb", "--info", str(deb), "conffiles"]).stdout.split() == ["/etc/jobd/jobd.toml"]
    _run(["dpkg-deb", "--extract", str(deb), str(tmp_path)])
    assert (tmp_path / "etc" / "jobd" / "jobd.toml").read_text() == (REPO / "examples" / "jobd.toml").read_text()

    depends = [d.strip() for d in _run(["dpkg-deb", "--field", str(deb), "Depends"]).stdout.split(",")]
    bounds = _requirements()
    assert set(bounds) == set(DEBIAN_PACKAGES) | set(BUNDLED), "a new dependency: map it here and in debian/control"
    for name, package in DEBIAN_PACKAGES.items():
        # Depends carries pyproject's lower bound, and Debian 12's package (installed here) meets it.
        assert f"{package} (>= {bounds[name]})" in depends, (name, depends)
        installed = _run(["dpkg-query", "-W", "-f", "${Version}", package]).stdout
        assert _version_ge(installed, bounds[name]), (package, installed, bounds[name])
    # Bundled modules: no dependency on a Debian package of them, and the bundled version meets pyproject's bound.
    sums = (REPO / "debian" / "vendor" / "SHA256SUMS").read_text().split()[1::2]
    for name, module in BUNDLED.items():
        assert not [d for d in depends if d.startswith(f"python3-{name}")], depends
        (sdist,) = [s for s in sums if s.startswith(f"{module}-")]
        assert _version_ge(sdist.removeprefix(f"{module}-").removesuffix(".tar.gz"), bounds[name]), sdist


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


@pytest.fixture
def sd() -> Iterator[Sdns]:
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
            systemctl daemon-reload
            rm -f /usr/sbin/policy-rc.d
            rm -f /var/lib/man-db/auto-update
        """)  # fmt: skip
        # (A container image's policy-rc.d, exit 101, forbids maintainer scripts to start or restart services; a
        # server has none. Removed in the overlay, the scripts act as on a server.)
        # (man-db's trigger updates the machine's manual page index after each install, upgrade and purge: some 3 s
        # of CPU each time, more than half of an install's, for an index no test reads. Without this flag file
        # (debconf's man-db/auto-update = false, as in Debian's container images) the trigger runs and skips that
        # work. The pages themselves are checked in the package: test_contents_conffile_and_depends, and lintian.)
        yield system
    finally:
        system.down()


def test_install_start_run_purge(deb: Path, sd: Sdns) -> None:
    status = sd.run("dpkg-query", "-W", "-f", "${Status}", "jobd").stdout
    assert "installed" not in status.split(), f"a jobd package is installed already ({status}): not testing over it"
    for path in ("/etc/jobd", "/var/lib/jobd"):
        assert not sd.exists(path), f"{path} exists before the package is installed"
    groups_before = {group for group in GROUPS if sd.run("getent", "group", group).returncode == 0}

    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    assert sd.ns("dpkg-query", "-W", "-f", "${Status}", "jobd") == "install ok installed"
    for group in GROUPS:
        assert sd.ns("getent", "group", group).startswith(f"{group}:")
    # The maintainer scripts enabled both units and started them (README.Debian).
    assert sd.ns("systemctl", "is-enabled", "jobd.socket", "jobd.service").split() == ["enabled", "enabled"]
    assert sd.ns("systemctl", "is-active", "jobd.socket", "jobd.service").split() == ["active", "active"]
    main_pid = sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip()
    assert sd.ns("cat", f"/proc/{main_pid}/cmdline").split("\0")[:2] == ["/usr/bin/python3", "/usr/bin/jobd"]

    # bash-completion loads completions/jobctl by the command's name; it defines jobctl's completion.
    loaded = sd.ns("bash", "-c", ". /usr/share/bash-completion/completions/jobctl && complete -p jobctl")
    assert loaded.startswith("complete ") and loaded.split()[-1] == "jobctl", loaded
    # A job, through the installed jobctl and the default socket /run/jobd/jobd.sock, as root (an admin).
    assert sd.ns("sh", "-c", "command -v jobctl").strip() == "/usr/bin/jobctl"
    token = f"installed-by-dpkg-{os.getpid()}"
    job = json.loads(sd.ns("jobctl", "--json", "run", "--", "/bin/echo", token))["id"]
    sd.ns("jobctl", "wait", str(job))
    assert sd.ns("jobctl", "log", str(job)) == f"{token}\n"
    assert sd.exists("/var/lib/jobd/jobd.sqlite3")
    # An administrator's drop-in: jobd reads /etc/jobd/jobd.d, and a task without a user runs as the shipped
    # default_user, nobody. (The drop-in is also what purge must remove besides the conffile.)
    # Its completion callback, and a queue's pause, are written in transactions of jobd's own: with Debian's
    # peewee (3.14, which commits after each write it makes outside a transaction of its own) these broke half-way,
    # and the package never delivered a callback nor paused a queue.
    fifo = Path(f"{sd.root}/run/jobd-callback-{os.getpid()}")
    os.mkfifo(fifo)
    fifo.chmod(0o666)  # the callback runs as the job's user, nobody
    drop_in = Path(f"{sd.root}/etc/jobd/jobd.d/50-local.toml")
    drop_in.parent.mkdir()
    drop_in.write_text(
        '[task.whoami]\ncommand = ["/usr/bin/id", "-un"]\n'
        f'on_success = [{{ exec = ["/bin/sh", "-c", "cat > /run/{fifo.name}"] }}]\n'
    )
    sd.ns("jobctl", "reload")
    sd.ns("jobctl", "pause", "default")
    sd.ns("jobctl", "resume", "default")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open before the callback writes: it never blocks on us
    try:
        job = json.loads(sd.ns("jobctl", "--json", "submit", "whoami"))["id"]
        sd.ns("jobctl", "wait", str(job))
        assert sd.ns("jobctl", "log", str(job)) == "nobody\n"
        summary = b""
        while not summary.endswith(b"}") and select.select([reader], [], [], 60)[0]:
            chunk = os.read(reader, 65536)
            if not chunk:  # the writer closed before a whole summary came
                break
            summary += chunk
        assert json.loads(summary)["id"] == job, summary
    finally:
        os.close(reader)
        fifo.unlink()
    # README.Debian's users: a member of jobd may connect, and do what [access] grants (no ad-hoc command); one
    # of jobd-admin too is an administrator.
    sd.ns("useradd", "--no-create-home", "alice")
    sd.ns("adduser", "--quiet", "alice", "jobd")
    alice = ("setpriv", "--reuid", "alice", "--regid", "alice", "--init-groups", "jobctl")
    assert json.loads(sd.ns(*alice, "--json", "ls"))["jobs"] == []  # connected; root's jobs are not hers to read
    refused = sd.run(*alice, "run", "--", "/bin/echo", token)
    assert refused.returncode == 1 and "INSUFFICIENT_RIGHTS" in refused.stderr, refused
    sd.ns("adduser", "--quiet", "alice", "jobd-admin")
    job = json.loads(sd.ns(*alice, "--json", "run", "--", "/bin/echo", token))["id"]
    sd.ns(*alice, "wait", str(job))
    assert sd.ns(*alice, "log", str(job)) == f"{token}\n"

    files = sd.ns("dpkg", "--listfiles", "jobd").splitlines()
    assert "/usr/bin/jobd" in files
    sd.ns("apt-get", "purge", "--yes", "jobd")

    assert "installed" not in sd.run("dpkg-query", "-W", "-f", "${Status}", "jobd").stdout.split()
    assert sd.ns("systemctl", "show", "-p", "LoadState", "--value", "jobd.service").strip() == "not-found"
    left = [path for path in files if sd.exists(path) and not Path(f"{sd.root}{path}").is_dir()]
    assert left == []
    # Directories of the package's own, with what jobd and the maintainer scripts made in them (database, job
    # output, byte-compiled modules, the administrator's drop-ins), and what deb-systemd-helper remembered.
    own = ["/etc/jobd", "/var/lib/jobd", "/run/jobd", "/usr/share/jobd", "/usr/share/doc/jobd"]
    own += ["/usr/lib/python3/dist-packages/jobd", "/usr/lib/python3/dist-packages/jobd-0.1.0.dist-info"]
    assert [path for path in own if sd.exists(path)] == []
    remembered = sd.ns("find", "/var/lib/systemd", "-name", "*jobd*").split()
    assert remembered == []
    # The system groups stay (README.Debian: files may still belong to them), as Debian does with system groups.
    for group in set(GROUPS) - groups_before:
        assert sd.ns("getent", "group", group).startswith(f"{group}:")


def test_purge_leaves_file_systems_mounted_in_the_state_directory(deb: Path, sd: Sdns) -> None:
    """/var/lib/jobd on a disk of its own, and another disk at /var/lib/jobd/backup for `jobctl backup`'s copies
    (README.Debian, Backups, suggests it): purge removes the database and the output, and leaves both mount points
    and the copy on the backup disk. It used to delete the copy and then fail (rm: Device or resource busy),
    leaving the package half-purged."""
    # Mounted before jobd starts: the sandbox's mount namespace (ProtectSystem=) sees later mounts only through
    # propagation, which sdns's systemd, in a private namespace, does not have (a server's, rshared, has).
    sd.ns("sh", "-ec", """
        mkdir -p /var/lib/jobd && mount -t tmpfs -o mode=0750 state /var/lib/jobd
        mkdir /var/lib/jobd/backup && mount -t tmpfs -o mode=0700 backups /var/lib/jobd/backup
    """)  # fmt: skip
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    job = json.loads(sd.ns("jobctl", "--json", "run", "--", "/bin/true"))["id"]
    sd.ns("jobctl", "wait", str(job))
    sd.ns("jobctl", "backup")
    assert sd.exists("/var/lib/jobd/output") and sd.exists("/var/lib/jobd/backup/jobd.sqlite3")

    sd.ns("apt-get", "purge", "--yes", "jobd")  # succeeds

    assert "installed" not in sd.run("dpkg-query", "-W", "-f", "${Status}", "jobd").stdout.split()
    assert not sd.exists("/etc/jobd")
    assert sd.ns("ls", "-A", "/var/lib/jobd").split() == ["backup"]
    assert sd.ns("ls", "-A", "/var/lib/jobd/backup").split() == ["jobd.sqlite3"]
    assert sd.ns("findmnt", "-rn", "-o", "SOURCE", "/var/lib/jobd").split() == ["state"]
    assert sd.ns("findmnt", "-rn", "-o", "SOURCE", "/var/lib/jobd/backup").split() == ["backups"]


# What jobs do that the unit's sandbox must allow (jobd.service, "Deliberately NOT set"; docs/systemd.md,
# Sandboxing), run as a user of the machine: write in its home directory, exchange files with other programs
# through /tmp, gain root's rights through a setuid program (as sudo does), make a setuid file of its own (as a
# package build does). And what it forbids: writing /etc.
PROBE = r"""
echo job >"$HOME/from-job" && echo "home: written"
echo "tmp: $(cat /tmp/from-outside)"
echo job >/tmp/from-job
echo "setuid: euid $(/usr/local/bin/id-setuid -u)"
cp /bin/true "$HOME/made-setuid" && chmod u+s "$HOME/made-setuid" && echo "setuid file: made"
touch /etc/from-job 2>/dev/null || echo "etc: read-only"
"""
PROBE_OK = ["home: written", "tmp: outside", "setuid: euid 0", "setuid file: made", "etc: read-only"]


def _probe(sd: Sdns) -> list[str]:
    job = json.loads(sd.ns("jobctl", "--json", "submit", "probe"))["id"]
    sd.ns("jobctl", "wait", str(job))
    return sd.ns("jobctl", "log", str(job)).splitlines()


def test_the_sandbox_lets_jobs_do_what_the_unit_says_and_each_setting_left_out_would_break_it(
    deb: Path, sd: Sdns
) -> None:
    """The installed jobd.service runs a job as a user that writes its home, shares /tmp with a program outside
    jobd, becomes root through a setuid program and makes one, and cannot write /etc (ProtectSystem=full). Each
    setting the unit leaves out on purpose, added in a drop-in, breaks one of those: none of them can be tightened
    without breaking what the unit and docs/systemd.md say jobs may do."""
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    # /home and /tmp of the namespace's own (sdns shares the host's), mounted while jobd is stopped (see above).
    sd.ns("systemctl", "stop", "jobd.service")
    sd.ns("sh", "-ec", "mount -t tmpfs -o mode=0755 home /home && mount -t tmpfs -o mode=1777 tmp /tmp")
    sd.ns("systemctl", "start", "jobd.service")
    sd.ns("useradd", "--create-home", "carol")
    sd.ns("sh", "-ec", "install -m 4755 /usr/bin/id /usr/local/bin/id-setuid && echo outside >/tmp/from-outside")
    drop_in = Path(f"{sd.root}/etc/jobd/jobd.d/50-probe.toml")
    drop_in.parent.mkdir()
    drop_in.write_text(f'[task.probe]\ncommand = ["/bin/sh", "-c", {json.dumps(PROBE)}]\nuser = "carol"\n')
    sd.ns("jobctl", "reload")

    assert _probe(sd) == PROBE_OK
    assert sd.ns("cat", "/home/carol/from-job", "/tmp/from-job") == "job\njob\n"  # seen outside jobd's sandbox

    service_drop_in = Path(f"{sd.root}/etc/systemd/system/jobd.service.d/50-tighter.conf")
    service_drop_in.parent.mkdir()
    broken = {
        "ProtectHome=yes": "home: written",
        "PrivateTmp=yes": "tmp: outside",
        "NoNewPrivileges=yes": "setuid: euid 0",
        "RestrictSUIDSGID=yes": "setuid file: made",
    }
    for setting, lost in broken.items():
        sd.ns("rm", "-f", "/home/carol/from-job", "/home/carol/made-setuid")
        service_drop_in.write_text(f"[Service]\n{setting}\n")
        sd.ns("systemctl", "daemon-reload")
        sd.ns("systemctl", "restart", "jobd.service")
        probed = _probe(sd)
        assert lost not in probed and probed != PROBE_OK, (setting, probed)
    # A bounding set without the capabilities to switch users: jobd cannot start a job as its user at all.
    service_drop_in.write_text("[Service]\nCapabilityBoundingSet=~CAP_SETUID CAP_SETGID\n")
    sd.ns("systemctl", "daemon-reload")
    sd.ns("systemctl", "restart", "jobd.service")
    job = json.loads(sd.ns("jobctl", "--json", "submit", "probe"))["id"]
    sd.run("jobctl", "wait", str(job))  # exit 1: the job failed
    found = json.loads(sd.ns("jobctl", "--json", "status", str(job)))
    assert (found["state"], found["tries"][0]["outcome"]) == ("failed", "spawn_error"), found
    assert found["error"] == "cannot start '/bin/sh': Operation not permitted", found


def test_install_over_an_existing_group_and_user(deb: Path, sd: Sdns) -> None:
    """dpkg -i where a group jobd (not a system group, with a member) and a user jobd exist already, as after running
    jobd by hand: the package uses the group as it is (id and members) for its sockets, and adds jobd-admin."""
    sd.ns("groupadd", "--gid", "1500", "jobd")
    sd.ns("useradd", "--no-create-home", "--uid", "1500", "--gid", "jobd", "jobd")
    sd.ns("useradd", "--no-create-home", "--groups", "jobd", "bob")
    sd.ns("dpkg", "-i", str(deb))
    assert sd.ns("getent", "group", "jobd").strip() == "jobd:x:1500:bob"
    assert sd.ns("id", "-u", "jobd").strip() == "1500"
    assert sd.ns("getent", "group", "jobd-admin").startswith("jobd-admin:")
    assert sd.ns("stat", "-c", "%G %a", "/run/jobd/jobd.sock").split() == ["jobd", "660"]
    bob = ("setpriv", "--reuid", "bob", "--regid", "bob", "--init-groups", "jobctl")
    assert json.loads(sd.ns(*bob, "--json", "ls"))["jobs"] == []


# A job that tells the test, through FIFOs, that it runs and that it got SIGTERM, and after SIGTERM waits for the
# test's word before it goes (its kill_grace is long enough for the test to act meanwhile). Once the test removed
# the FIFOs' directory it just goes.
HOLD = r"""
trap 'echo stopping >/run/jobd-test/stopping && read _ </run/jobd-test/release; exit 0' TERM
echo running >/run/jobd-test/running
while :; do sleep 1000 & wait $!; done
"""


def _stopping_the_held_job(sd: Sdns, args: list[str], meanwhile: Callable[[], None] = lambda: None) -> None:
    """Run `args` (dpkg or apt-get), which stops jobd and so the HOLD job: once the job has SIGTERM (the old jobd
    no longer listens), call `meanwhile`, then let the job go and wait for `args` to end."""
    command = subprocess.Popen(
        sd.enter(*args), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=CLEAN_ENV
    )
    try:
        assert sd.ns("cat", "/run/jobd-test/stopping") == "stopping\n"
        meanwhile()
        sd.ns("sh", "-c", "echo go >/run/jobd-test/release")
        assert command.wait(TIMEOUT) == 0, command.communicate()[0]
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(TIMEOUT)


def test_upgrade_and_remove_keep_jobs_configuration_and_waiting_clients(deb: Path, sd: Sdns) -> None:
    """dpkg -i over the installed package while a job runs and another waits: jobd.service restarts (the new jobd
    runs), the running job is stopped and runs again from the start, the queued one keeps its place, the
    administrator's change to the conffile stays, and a client that connected while the old jobd stopped is
    answered by the new one (jobd.socket is not restarted). Then apt-get remove stops both units and keeps all
    that, and installing again resumes it."""
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    sd.ns("sh", "-ec", "mkdir -m 0700 /run/jobd-test && cd /run/jobd-test && mkfifo running stopping release")
    drop_in = Path(f"{sd.root}/etc/jobd/jobd.d/50-local.toml")
    drop_in.parent.mkdir()
    hold = f'[task.hold]\ncommand = ["/bin/sh", "-c", {json.dumps(HOLD)}]\nuser = "root"\nkill_grace = 600\n'
    drop_in.write_text(f'{hold}\n[task.after]\ncommand = ["/bin/true"]\n')
    conffile = Path(f"{sd.root}/etc/jobd/jobd.toml")
    edited = conffile.read_text().replace("concurrency = 1", "concurrency = 1  # the administrator's", 1)
    conffile.write_text(edited)
    sd.ns("jobctl", "reload")
    held = json.loads(sd.ns("jobctl", "--json", "submit", "hold"))["id"]
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    queued = json.loads(sd.ns("jobctl", "--json", "submit", "after"))["id"]
    old_pid = sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip()

    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)  # hang guard

        def connect() -> None:  # into the listening socket's queue, while no jobd accepts
            client.connect(f"{sd.root}/run/jobd/jobd.sock")
            client.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')

        _stopping_the_held_job(sd, ["dpkg", "-i", str(deb)], connect)
        answer = client.makefile("rb").readline()
    assert answer and "result" in json.loads(answer), answer

    assert sd.ns("systemctl", "is-active", "jobd.socket", "jobd.service").split() == ["active", "active"]
    assert sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip() != old_pid
    # The job the restart stopped runs again, from the start, under the new jobd; the queued one still waits.
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    job = json.loads(sd.ns("jobctl", "--json", "status", str(held)))
    assert job["state"] == "running" and job["attempts"] == 2, job
    assert json.loads(sd.ns("jobctl", "--json", "status", str(queued)))["state"] == "queued"
    assert conffile.read_text() == edited

    _stopping_the_held_job(sd, ["apt-get", "remove", "--yes", "jobd"])
    assert sd.ns("dpkg-query", "-W", "-f", "${Status}", "jobd") == "deinstall ok config-files"
    assert sd.run("systemctl", "is-active", "jobd.socket", "jobd.service").stdout.split() == ["inactive"] * 2
    assert conffile.read_text() == edited and sd.exists("/var/lib/jobd/jobd.sqlite3")
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    assert json.loads(sd.ns("jobctl", "--json", "status", str(held)))["attempts"] == 3
    assert json.loads(sd.ns("jobctl", "--json", "status", str(queued)))["state"] == "queued"
    sd.ns("rm", "-r", "/run/jobd-test")  # the job goes at once when stopped (at sd_down)


# The fleet's previous version: the first packaged jobd (debian/ came with this commit), whose database is at schema
# version 11. Built from git history as 0.1.0~prev, a lower version than this checkout's, so that installing this
# checkout's package over it is an upgrade, with the previous package's maintainer scripts and jobd.
PREVIOUS = "5bb66c42e0d8a76a1d651417033721306e90fbe7"
PREVIOUS_VERSION = "0.1.0~prev"
PREVIOUS_SCHEMA = 11


@pytest.fixture(scope="module")
def previous_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("previous-deb") / "jobd"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, timeout=TIMEOUT, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, timeout=TIMEOUT, check=True)
    return _build(source, PREVIOUS_VERSION)


def _schema_version(sd: Sdns) -> int:
    """The database's schema version (SQLite's user_version); jobd must be stopped (it holds the file exclusively)."""
    database = "sqlite3.connect('/var/lib/jobd/jobd.sqlite3')"
    read = f"import sqlite3; print({database}.execute('PRAGMA user_version').fetchone()[0])"
    return int(sd.ns("python3", "-c", read))


def test_upgrade_from_the_previous_version_migrates_the_database_and_keeps_the_jobs(
    deb: Path, previous_deb: Path, sd: Sdns
) -> None:
    """dpkg -i of this checkout's package over the previous version's, with a job running, jobs queued behind it and
    one finished: the new jobd, restarted once by the postinst, brings the database to its schema, keeps every job
    and their output, runs the stopped job again and then the queued ones."""
    new_version = _run(["dpkg-deb", "--field", str(deb), "Version"]).stdout.strip()
    assert not _version_ge(PREVIOUS_VERSION, new_version), (PREVIOUS_VERSION, new_version)
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(previous_deb))
    assert sd.ns("dpkg-query", "-W", "-f", "${Version}", "jobd") == PREVIOUS_VERSION
    sd.ns("systemctl", "stop", "jobd.service")
    assert _schema_version(sd) == PREVIOUS_SCHEMA  # made by the previous jobd
    sd.ns("systemctl", "start", "jobd.service")

    sd.ns("sh", "-ec", "mkdir -m 0700 /run/jobd-test && cd /run/jobd-test && mkfifo running stopping release")
    drop_in = Path(f"{sd.root}/etc/jobd/jobd.d/50-local.toml")
    drop_in.parent.mkdir()
    hold = f'[task.hold]\ncommand = ["/bin/sh", "-c", {json.dumps(HOLD)}]\nuser = "root"\nkill_grace = 600\n'
    drop_in.write_text(f'{hold}\n[task.after]\ncommand = ["/bin/echo", "after"]\n')
    sd.ns("jobctl", "reload")
    token = f"before-the-upgrade-{os.getpid()}"
    finished = json.loads(sd.ns("jobctl", "--json", "run", "--", "/bin/echo", token))["id"]
    sd.ns("jobctl", "wait", str(finished))
    held = json.loads(sd.ns("jobctl", "--json", "submit", "hold"))["id"]
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    queued = [json.loads(sd.ns("jobctl", "--json", "submit", "after"))["id"] for _ in range(3)]
    cursor = sd.ns("journalctl", "-q", "-n", "0", "--show-cursor").strip().removeprefix("-- cursor: ")

    _stopping_the_held_job(sd, ["dpkg", "-i", str(deb)])

    assert sd.ns("dpkg-query", "-W", "-f", "${Version}", "jobd") == new_version
    assert sd.ns("systemctl", "is-active", "jobd.socket", "jobd.service").split() == ["active", "active"]
    # The unit's entries are picked here, not by `-u`: systemd 252's journalctl --after-cursor with a match skips the
    # first matching entry when the cursor's own entry does not match.
    entries = [
        json.loads(line) for line in sd.ns("journalctl", "-q", "-o", "json", f"--after-cursor={cursor}").splitlines()
    ]
    messages = [
        str(entry.get("MESSAGE"))
        for entry in entries
        if "jobd.service" in (entry.get("_SYSTEMD_UNIT"), entry.get("UNIT"))
    ]
    assert [m for m in messages if m == "stopped" or " ready: socket " in m][-2:] == [
        "stopped",
        f"jobd {new_version} ready: socket /run/jobd/jobd.sock, state /var/lib/jobd",
    ], messages
    assert len([m for m in messages if " ready: socket " in m]) == 1, messages  # restarted once
    assert sd.ns("getent", "group", "jobd-admin").startswith("jobd-admin:")  # the new sysusers.d entry
    # The stopped job runs again, from the start, under the new jobd; the queued ones wait behind it; the finished
    # one and its output are there.
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    job = json.loads(sd.ns("jobctl", "--json", "status", str(held)))
    assert (job["state"], job["attempts"]) == ("running", 2), job
    assert [json.loads(sd.ns("jobctl", "--json", "status", str(i)))["state"] for i in queued] == ["queued"] * 3
    assert json.loads(sd.ns("jobctl", "--json", "status", str(finished)))["state"] == "succeeded"
    assert sd.ns("jobctl", "log", str(finished)) == f"{token}\n"
    sd.ns("rm", "-r", "/run/jobd-test")  # the held job now goes at once when cancelled
    sd.ns("jobctl", "cancel", str(held))
    for job_id in queued:
        sd.ns("jobctl", "wait", str(job_id))
        assert sd.ns("jobctl", "log", str(job_id)) == "after\n"
    sd.ns("systemctl", "stop", "jobd.service")
    assert _schema_version(sd) == SCHEMA_VERSION


@pytest.fixture(scope="module")
def next_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's package as a next version, 0.1.0+next, whose /etc/jobd/jobd.toml has one line more."""
    source = tmp_path_factory.mktemp("next-deb") / "jobd"
    _copy_checkout(source)
    with (source / "examples" / "jobd.toml").open("a") as shipped:
        shipped.write("# a line the next version adds\n")
    return _build(source, "0.1.0+next")


def test_an_upgrade_that_changes_the_edited_conffile_keeps_the_administrators_version(
    deb: Path, next_deb: Path, sd: Sdns
) -> None:
    """The administrator changed /etc/jobd/jobd.toml and the next version ships a changed one: with dpkg's
    --force-confold (what an unattended upgrade passes; dpkg would ask otherwise) the administrator's file stays in
    force, the new one is left beside it as jobd.toml.dpkg-dist, which jobd does not read, and the restarted jobd
    runs with the administrator's configuration."""
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    conffile = Path(f"{sd.root}/etc/jobd/jobd.toml")
    shipped = conffile.read_text()
    edited = shipped.replace("[queue.default]\nconcurrency = 1\n", "[queue.default]\nconcurrency = 3\n", 1)
    assert edited != shipped
    conffile.write_text(edited)
    sd.ns("jobctl", "reload")
    old_pid = sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip()

    sd.ns("dpkg", "--force-confold", "-i", str(next_deb))

    assert sd.ns("dpkg-query", "-W", "-f", "${Version}", "jobd") == "0.1.0+next"
    assert sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip() != old_pid
    assert conffile.read_text() == edited
    assert Path(f"{sd.root}/etc/jobd/jobd.toml.dpkg-dist").read_text() == f"{shipped}# a line the next version adds\n"
    queues = {queue["name"]: queue for queue in json.loads(sd.ns("jobctl", "--json", "queues"))["queues"]}
    assert queues["default"]["concurrency"] == 3, queues
    assert sd.ns("journalctl", "-q", "-o", "cat", "-u", "jobd.service", "-p", "warning") == ""
