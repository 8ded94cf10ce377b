"""jobd on the oldest peewee it accepts: pyproject.toml and debian/control say peewee >= 3.14, and the .deb runs on
Debian 12's python3-peewee, 3.14.10, while the suite runs on the newest from PyPI. The two write some queries
differently (3.14 writes `x.is_null()` as `x IS ?` with a NULL parameter, which cannot use a partial index and
broke INDEXED BY queries), so the store's tests also run here on Debian's peewee, in a process of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PACKAGES = Path("/usr/lib/python3/dist-packages")  # python3-peewee: `make system-deps` installs it


def _lowest_accepted() -> str:
    found = re.search(r'"peewee>=([0-9.]+),', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml no longer says `peewee>=X,`: update this test"
    return found.group(1)


def test_the_store_tests_pass_on_debian_12s_peewee_the_oldest_accepted(tmp_path: Path) -> None:
    only_peewee = tmp_path / "lib"  # Debian's peewee alone: every other package stays the suite's own
    only_peewee.mkdir()
    for name in ("peewee.py", "playhouse"):
        assert (DEBIAN_PACKAGES / name).exists(), f"python3-peewee is not installed ({DEBIAN_PACKAGES / name})"
        (only_peewee / name).symlink_to(DEBIAN_PACKAGES / name)
    env = {**os.environ, "PYTHONPATH": str(only_peewee)}
    version = subprocess.run(
        [sys.executable, "-c", "import peewee; print(peewee.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lowest = _lowest_accepted()
    assert version.split(".")[:2] == lowest.split(".")[:2], f"Debian's peewee {version}, the oldest accepted {lowest}"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--basetemp={tmp_path / 'bt'}",
            "tests/test_store.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"tests/test_store.py on peewee {version}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert re.search(r"\b[0-9]+ passed\b", run.stdout), run.stdout[-2000:]
