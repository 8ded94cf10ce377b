"""The Debian package (debian/): built from this checkout, checked by lintian, installed, used and purged for real,
in a throw-away systemd (tests/debian_support.py says how). Upgrades: tests/test_debian_upgrades.py.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from debian_support import (
    CLEAN_ENV,
    MARKS,
    NO_SOURCES,
    TIMEOUT,
    Sdns,
    booted,
    run,
    version_ge,
)
from harness import REPO

pytestmark = MARKS

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


@pytest.fixture
def sd() -> Iterator[Sdns]:
    with booted() as system:
        yield system


def _requirements() -> dict[str, str]:
    """pyproject's dependencies: name -> its lower bound (every one of them has a `>=`)."""
    bounds = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, rest = requirement.partition(">=")
        bounds[name.strip()] = rest.split(",")[0].strip()
    return bounds


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
    listing = run(["dpkg-deb", "--contents", str(deb)]).stdout
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
    assert run(["dpkg-deb", "--info", str(deb), "conffiles"]).stdout.split() == ["/etc/jobd/jobd.toml"]
    run(["dpkg-deb", "--extract", str(deb), str(tmp_path)])
    assert (tmp_path / "etc" / "jobd" / "jobd.toml").read_text() == (REPO / "examples" / "jobd.toml").read_text()

    depends = [d.strip() for d in run(["dpkg-deb", "--field", str(deb), "Depends"]).stdout.split(",")]
    bounds = _requirements()
    assert set(bounds) == set(DEBIAN_PACKAGES) | set(BUNDLED), "a new dependency: map it here and in debian/control"
    for name, package in DEBIAN_PACKAGES.items():
        # Depends carries pyproject's lower bound, and Debian 12's package (installed here) meets it.
        assert f"{package} (>= {bounds[name]})" in depends, (name, depends)
        installed = run(["dpkg-query", "-W", "-f", "${Version}", package]).stdout
        assert version_ge(installed, bounds[name]), (package, installed, bounds[name])
    # Bundled modules: no dependency on a Debian package of them, and the bundled version meets pyproject's bound.
    sums = (REPO / "debian" / "vendor" / "SHA256SUMS").read_text().split()[1::2]
    for name, module in BUNDLED.items():
        assert not [d for d in depends if d.startswith(f"python3-{name}")], depends
        (sdist,) = [s for s in sums if s.startswith(f"{module}-")]
        assert version_ge(sdist.removeprefix(f"{module}-").removesuffix(".tar.gz"), bounds[name]), sdist


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
