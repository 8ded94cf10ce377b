"""job.output of a job whose output files were removed under jobd (an administrator deleted STATE_DIR/output/N, the
disk of the state directory was replaced): `OUTPUT_MISSING`, naming the job, the attempt, the stream and the file,
over the socket, over HTTP (410) and in `jobctl log` (exit 1); not the empty string of a job that printed nothing,
which a stream jobd never wrote still answers. A workflow task whose output is so missing when it ends is ABORTED.

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
from test_jobs import next_matching

from jobd import safexml
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


def test_a_workflow_task_whose_output_was_removed_while_it_ran_ends_in_error_naming_the_file(
    make_daemon: Any, tmp_path: Path
) -> None:
    """A task's end is read into its instance's document: a stream jobd wrote and an administrator removed while
    the task ran was read as empty, and the task passed as one that printed nothing, its subjobs run on an output
    that was not its own. It is ABORTED instead, its error naming the file, as job.output says of its job, and
    jobd's log says so too; the subjob after it never runs. (Its retval is its exit code, 0.)"""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    workflow = f"""<workflow><subjobs>
  <job name="one">
    <tasks><task name="held" path="/bin/sh -c 'echo before; read go &lt; {gate}; echo after'" queue="default"/></tasks>
    <subjobs><job name="two"><tasks><task name="next" path="/bin/echo next" queue="default"/></tasks></job></subjobs>
  </job>
</subjobs></workflow>"""
    daemon = make_daemon(CONFIG, start=False)
    daemon.write_workflows(held=workflow)
    daemon.start()
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        launched = daemon.call("instance.launch", {"workflow": "held"})
        running = next_matching(client, lambda event: event["job"]["state"] == "running", 60)
    job_id = running["job"]["id"]
    assert daemon.call("job.output", {"id": job_id, "wait": True})["data"] == "before\n"  # it has written
    shutil.rmtree(output_dir(daemon, job_id))
    with open(gate, "w") as go:
        go.write("go\n")

    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert done["status"] == "TERMINATED" and done["errors"] == 1, done
    reply = daemon.call("instance.get", {"id": launched["id"], "format": "xml"})
    document = safexml.parse(reply["xml"].encode())
    held = document.find(".//task[@name='held']")
    assert held is not None, reply["xml"]
    assert held.get("status") == "ABORTED" and held.get("retval") == "0", reply["xml"]
    # As job.output says of each stream: the log too, its bytes not being counted (its directory is gone).
    missing = [
        f"job {job_id}'s {stream} of attempt 1 is missing: jobd wrote it to {output_dir(daemon, job_id)}/1.{stream}, "
        "which is no longer there (removed, or the disk of jobd's state directory replaced, since)"
        for stream in ("stdout", "log")
    ]
    assert held.get("error") == f"Output missing ({'; '.join(missing)})", reply["xml"]
    output = held.find("output")
    assert output is not None and output.text is None and output.get("retval") == "0", reply["xml"]  # none is left
    assert document.find(".//task[@name='next']").get("status") is None, reply["xml"]  # never reached
    assert f"task {held.get('evqid')}: Output missing (job {job_id}'s stdout" in daemon.log()
    assert [job["id"] for job in daemon.call("job.list", {})["jobs"]] == [job_id]
