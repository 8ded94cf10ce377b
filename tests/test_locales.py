"""jobd in a locale whose encoding is not UTF-8, on a real daemon: what it passes to its jobs, and what it says when a
value cannot be passed.

The locale (fr_FR.ISO-8859-1) is compiled with localedef into the test's own directory and named through LOCPATH, so
the machine's locales are neither needed nor touched (localedef is libc-bin's, its sources the `locales` package's).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import BASE_CONFIG
from test_jobctl import shown_on_a_terminal

from jobd.client import RemoteError

pytestmark = pytest.mark.timeout(120)

LATIN_1 = "fr_FR.ISO-8859-1"


@pytest.fixture
def latin1_locale(tmp_path: Path) -> dict[str, str]:
    """The environment that puts a process in fr_FR.ISO-8859-1, compiled into the test's directory."""
    locales = tmp_path / "locales"
    locales.mkdir()
    made = subprocess.run(
        ["localedef", "-i", "fr_FR", "-f", "ISO-8859-1", str(locales / LATIN_1)], capture_output=True, text=True
    )
    assert made.returncode in (0, 1), made  # 1: made, with warnings about the locale's sources
    assert (locales / LATIN_1 / "LC_CTYPE").exists(), made
    return {"LOCPATH": str(locales), "LC_ALL": LATIN_1}


@pytest.fixture
def latin1_daemon(make_daemon: Any, latin1_locale: dict[str, str]) -> Any:
    daemon = make_daemon(
        """
        [queue.default]
        concurrency = 2

        [task.accented]
        command = ["/usr/bin/printf", "caf\u00e9"]
        """,
        start=False,
    )
    daemon.env = latin1_locale
    daemon.start()
    return daemon


def test_a_value_the_locale_cannot_encode_fails_the_job_saying_which_and_why(latin1_daemon: Any) -> None:
    """Python passes a job's argv, environment and working directory in the locale's encoding, as the job (which
    inherits jobd's LC_ALL and LANG) reads them: in ISO-8859-1 "café" is passed, "日本" cannot be. Such a job failed as
    "internal error in jobd" with a traceback in the log; it fails naming the value, the encoding and what to do."""
    daemon = latin1_daemon
    # The locale is in force: é reaches the program as the one byte ISO-8859-1 has for it.
    accented = daemon.wait(daemon.submit(task="accented")["id"])
    assert accented["state"] == "succeeded", accented
    assert daemon.call("job.output", {"id": accented["id"], "encoding": "base64"})["data"] == "Y2Fm6Q=="  # caf\xe9

    cases = [
        ({"command": ["/bin/echo", "\u65e5\u672c"]}, "its argument 1 '\u65e5\u672c'"),
        ({"command": ["/bin/true"], "env": {"CITY": "\u6771\u4eac"}}, "its environment variable CITY '\u6771\u4eac'"),
        ({"command": ["/bin/true"], "working_dir": "/tmp/\u03b1"}, "its working directory '/tmp/\u03b1'"),
    ]
    for params, named in cases:
        job = daemon.wait(daemon.submit(**params)["id"])
        assert job["state"] == "failed", job
        error = daemon.call("job.get", {"id": job["id"]})["tries"][0]["error"]
        assert error == (
            f"cannot start {params['command'][0]!r}: {named} holds characters that the encoding of jobd's locale, "
            "iso8859-1 (from LC_ALL, LC_CTYPE or LANG), cannot pass to the system; run jobd in a UTF-8 locale "
            "(such as C.UTF-8)"
        ), job
    assert daemon.wait(daemon.submit(command=["/bin/echo", "still here"])["id"])["state"] == "succeeded"
    assert "Traceback" not in daemon.log() and "internal error" not in daemon.log()


def test_a_path_the_locale_cannot_encode_is_a_config_error(latin1_daemon: Any, make_daemon: Any) -> None:
    """A path jobd uses itself (its sockets, state and tasks directories, a working directory) that the locale's
    encoding cannot hold: jobd did not start (a traceback from the socket's length check) or failed later at each
    use. It is refused as any bad value, naming file, line and key; a reload keeps the running configuration."""
    daemon = latin1_daemon
    drop_in = daemon.config_dir / "jobd.d" / "50-far.toml"
    drop_in.write_text('[task.far]\ncommand = ["/bin/true"]\nworking_dir = "/srv/\u65e5\u672c"\n')
    with pytest.raises(RemoteError) as refused:
        daemon.call("daemon.reload")
    assert refused.value.code == "CONFIG_INVALID" and refused.value.data["key"] == "task.far.working_dir"
    assert refused.value.message == (
        f'{drop_in}:3: task.far.working_dir: "/srv/\\u65e5\\u672c" holds characters that the encoding of jobd\'s '
        "locale, iso8859-1 (from LC_ALL, LC_CTYPE or LANG), cannot pass to the system; run jobd in a UTF-8 locale "
        "(such as C.UTF-8)"
    )
    assert daemon.wait(daemon.submit(task="accented")["id"])["state"] == "succeeded"

    other = make_daemon(start=False)
    socket = other.root / "\u00e9t\u00e9-\u65e5\u672c.sock"
    text = BASE_CONFIG.format(socket=socket, evqueue_socket=other.evqueue_socket, state=other.state_dir)
    (other.config_dir / "jobd.toml").write_text(text)
    other.env = daemon.env
    started = other.start_refused()
    assert started.returncode == 78, started  # EX_CONFIG
    assert "daemon.socket" in started.stderr and "holds characters that the encoding" in started.stderr, started
    assert "Traceback" not in started.stderr, started
    assert "Traceback" not in daemon.log()


def test_log_on_a_terminal_of_another_encoding_reads_the_job_output_in_it(latin1_daemon: Any) -> None:
    """A job in jobd's ISO-8859-1 locale writes é as one byte, which an ISO-8859-1 terminal shows as é: `jobctl log`
    there escapes control characters but shows that text as text (it showed \\xe9, read as UTF-8)."""
    daemon = latin1_daemon
    job = daemon.wait(daemon.submit(command=["/usr/bin/printf", "caf\u00e9 \\033[2J\\n"])["id"])
    assert daemon.call("job.output", {"id": job["id"], "encoding": "base64"})["data"] == "Y2Fm6SAbWzJKCg=="
    shown, result = shown_on_a_terminal(daemon, "log", str(job["id"]), env=daemon.env)
    assert result.code == 0, result
    assert shown == b"caf\xe9 " + rb"\x1b[2J" + b"\n"
