"""One throw-away systemd booted by sdns.sh (harness.SDNS), for the tests of the units and of the Debian package.

The bash process that ran sd_up stays, blocked reading its stdin; closing that stdin makes it run sd_down. So the
namespace goes away when a test ends however it ends, even when pytest itself is killed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness import SDNS

BOOT = '. "$0" && sd_up || exit 1\necho "$SD_NSPID $SD_WORK"\nread -r _\nsd_down\necho down\n'


class Sdns:
    """A booted systemd: `nspid` its PID 1 as the host sees it, `root` its file system seen from the host, `work`
    sdns's scratch directory (removed by sd_down)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout  # hang guard for waiting on the bash process; never a measurement
        self.process = subprocess.Popen(
            ["bash", "-c", BOOT, str(SDNS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if len(first) != 2:
            rest = self.process.stdout.read()
            self.process.wait(timeout)
            raise AssertionError(f"sdns did not boot: {' '.join(first)} {rest}")
        self.nspid, self.work = int(first[0]), Path(first[1])
        self.root = Path(f"/proc/{self.nspid}/root")

    def enter(self, *args: str) -> list[str]:
        """The command line that runs `args` inside the namespace (what sdns.sh's sd_ns does)."""
        return ["nsenter", "--target", str(self.nspid), "--mount", "--pid", "--uts", "--ipc", *args]

    def down(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()  # `read` returns: sd_down
        rest = self.process.stdout.read()
        self.process.wait(self.timeout)
        assert "down" in rest, rest
