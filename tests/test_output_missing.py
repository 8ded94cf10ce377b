"""job.output of a job whose output files were removed under jobd (an administrator deleted STATE_DIR/output/N, the
disk of the state directory was replaced): `OUTPUT_MISSING`, naming the job, the attempt, the stream and the file,
over the socket, over HTTP (410) and in `jobctl log` (exit 1); not the empty string of a job that printed nothing,
which a stream jobd never wrote still answers.

A running job is held by a FIFO it reads: it goes on when the test writes a line into it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_http_api import request
from test_jobctl import ctl

from jobd.client import RemoteError

pytestmark = pytest.mark.timeout(120)

TOKEN = "output-missing-token"
CONFIG = f"""
[http]
listen = "127.0.0.1:0"

[http.tokens.ops]
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
user = "root"
admin = true

[queue.default]
concurrency = 2
"""


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    return make_daemon(CONFIG)


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def missing(daemon: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The error data of a job.output that must be refused as OUTPUT_MISSING."""
    with pytest.raises(RemoteError) as refused:
        daemon.call("job.output", params)
    data: dict[str, Any] = refused.value.data
    assert data["code"] == "OUTPUT_MISSING", refused.value
    assert refused.value.rpc_code == -32017
    return data


def output_dir(daemon: Any, job_id: int) -> Path:
    return Path(daemon.state_dir) / "output" / str(job_id)


def test_output_of_an_ended_job_whose_directory_was_removed_is_refused_naming_what_is_missing(daemon: Any) -> None:
    job = daemon.submit(command=sh("echo out; echo err >&2; echo a log line >&3"))
    daemon.wait(job["id"])
    assert daemon.output(job["id"]) == "out\n"
    shutil.rmtree(output_dir(daemon, job["id"]))

    for stream in ("stdout", "stderr", "log"):
        data = missing(daemon, {"id": job["id"], "stream": stream})
        path = str(output_dir(daemon, job["id"]) / f"1.{stream}")
        assert data == {
            "code": "OUTPUT_MISSING",
            "id": job["id"],
            "attempt": 1,
            "stream": stream,
            "path": path,
        }
    with pytest.raises(RemoteError) as refused:
        daemon.call("job.output", {"id": job["id"], "encoding": "base64", "wait": True})
    assert refused.value.message == (
        f"job.output: job {job['id']}'s stdout of attempt 1 is missing: jobd wrote it to "
        f"{output_dir(daemon, job['id'])}/1.stdout, "
        "which is no longer there (removed, or the disk of jobd's state directory replaced, since)"
    )
    # jobd goes on: other jobs' output is read as before.
    other = daemon.submit(command=sh("echo fine"))
    daemon.wait(other["id"])
    assert daemon.output(other["id"]) == "fine\n"


def test_a_stream_the_job_never_wrote_is_still_empty(daemon: Any) -> None:
    """Files are made at the first byte: a stream with none has no file, and is empty, not missing."""
    silent = daemon.submit(command=["/bin/true"])
    daemon.wait(silent["id"])
    assert not output_dir(daemon, silent["id"]).exists()
    for stream in ("stdout", "stderr", "log"):
        assert daemon.call("job.output", {"id": silent["id"], "stream": stream})["data"] == ""

    only_stderr = daemon.submit(command=sh("echo err >&2"))
    daemon.wait(only_stderr["id"])
    (output_dir(daemon, only_stderr["id"]) / "1.stderr").unlink()
    assert daemon.call("job.output", {"id": only_stderr["id"]})["data"] == ""  # stdout: never written
    missing(daemon, {"id": only_stderr["id"], "stream": "stderr"})
    # The log file alone was not removed (the directory is there): jobd cannot tell it had any, so it is empty.
    assert daemon.call("job.output", {"id": only_stderr["id"], "stream": "log"})["data"] == ""


def test_output_removed_while_the_job_runs_and_after_it_ended(daemon: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    job = daemon.submit(command=sh(f"echo before; echo logged >&3; read line < {fifo}; echo after"))
    first = daemon.call("job.output", {"id": job["id"], "wait": True})  # until the job has written
    assert first["data"] == "before\n" and not first["complete"]
    log = daemon.call("job.output", {"id": job["id"], "stream": "log", "wait": True})
    assert log["data"] == "logged\n"
    shutil.rmtree(output_dir(daemon, job["id"]))

    assert missing(daemon, {"id": job["id"]})["attempt"] == 1
    missing(daemon, {"id": job["id"], "stream": "log"})
    # stderr: the running job has written none, so it has none.
    assert daemon.call("job.output", {"id": job["id"], "stream": "stderr"})["data"] == ""

    with open(fifo, "w") as go:
        go.write("go\n")
    assert daemon.wait(job["id"])["state"] == "succeeded"
    missing(daemon, {"id": job["id"]})
    missing(daemon, {"id": job["id"], "stream": "log"})


def test_http_answers_410_and_jobctl_log_exits_1_naming_the_missing_file(daemon: Any) -> None:
    job = daemon.submit(command=sh("echo out"))
    daemon.wait(job["id"])
    shutil.rmtree(output_dir(daemon, job["id"]))
    path = f"{output_dir(daemon, job['id'])}/1.stdout"

    status, reply = request(daemon, "POST", "/api/job.output", {"id": job["id"]}, token=TOKEN)
    assert status == 410, reply
    assert reply["error"]["code"] == "OUTPUT_MISSING"
    assert reply["error"]["path"] == path and reply["error"]["id"] == job["id"]

    result = ctl(daemon, "log", str(job["id"]))
    assert result.code == 1, result
    assert result.out == ""
    # the form man/jobctl.1 and docs/jobctl.md quote: the code, the method, then what is missing and where
    said = f"jobctl: OUTPUT_MISSING: job.output: job {job['id']}'s stdout of attempt 1 is missing: jobd wrote it to "
    assert result.err.startswith(said) and path in result.err, result
