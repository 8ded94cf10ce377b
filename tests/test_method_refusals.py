"""Every JSON-RPC method's refusals start with the method's name, once: `job.cancel: no job 999 …`. The refusals of
the parameters' own checks always did (`job.cancel: missing parameter 'id'`), but those of the engine (an unknown
job, queue, workflow, instance or schedule, a finished job, the rights) said nothing of the method, so a client's
log of several calls did not say which one was refused. Api.call names the method for them all, socket and HTTP,
also for a method that refuses once it has waited (job.wait, job.output, instance.wait are coroutines).

A method added to jobd belongs in REFUSALS: the test checks that the table has every method the daemon serves."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from test_http_api import request
from test_protocol_docs import methods_of

from jobd import api
from jobd.client import RemoteError
from jobd.errors import UnknownJob

TIMEOUT = 30
CAROL_TOKEN = "carol-token"
CAROL = "jobdtest-no-such-carol"  # no local account: a remote login (uid -1) with no right at all

CONFIG = f"""
[http]
listen = "127.0.0.1:0"

[http.tokens.carol]
token_sha256 = "{hashlib.sha256(CAROL_TOKEN.encode()).hexdigest()}"
user = "{CAROL}"
admin = false

[queue.default]
concurrency = 1

[task.t]
command = ["/bin/true"]

[schedule.s]
task = "t"
calendar = "@daily"
"""

UNKNOWN = {"zz_not_a_parameter": 1}  # for the methods that refuse nothing else to an admin

# method -> [(params, data.code)]: refusals an admin gets. `JOB` is replaced by the id of a job that has ended.
REFUSALS: dict[str, list[tuple[dict[str, Any], str]]] = {
    "ping": [(UNKNOWN, "INVALID_PARAMS")],
    "job.submit": [({"task": "nope"}, "UNKNOWN_TASK"), ({"task": "t", "queue": "nope"}, "UNKNOWN_QUEUE")],
    "job.get": [({"id": 999}, "UNKNOWN_JOB"), ({"id": "x"}, "INVALID_PARAMS")],
    "job.list": [(UNKNOWN, "INVALID_PARAMS")],
    "job.output": [({"id": 999}, "UNKNOWN_JOB"), ({"id": "JOB", "attempt": 9}, "UNKNOWN_JOB")],
    "job.wait": [({"id": 999}, "UNKNOWN_JOB")],
    "job.cancel": [({"id": 999}, "UNKNOWN_JOB"), ({"id": "JOB"}, "JOB_FINISHED"), ({}, "INVALID_PARAMS")],
    "queue.list": [(UNKNOWN, "INVALID_PARAMS")],
    "queue.pause": [({"name": "nope"}, "UNKNOWN_QUEUE")],
    "queue.resume": [({"name": "nope"}, "UNKNOWN_QUEUE")],
    "daemon.status": [(UNKNOWN, "INVALID_PARAMS")],
    "daemon.reload": [(UNKNOWN, "INVALID_PARAMS")],
    "daemon.backup": [(UNKNOWN, "INVALID_PARAMS")],
    "events.subscribe": [({"types": ["nope"]}, "INVALID_PARAMS")],
    "task.list": [(UNKNOWN, "INVALID_PARAMS")],
    "workflow.list": [(UNKNOWN, "INVALID_PARAMS")],
    "workflow.get": [({"name": "nope"}, "UNKNOWN_WORKFLOW")],
    "instance.launch": [({"workflow": "nope"}, "UNKNOWN_WORKFLOW")],
    "instance.get": [({"id": 999}, "UNKNOWN_INSTANCE")],
    "instance.wait": [({"id": 999}, "UNKNOWN_INSTANCE")],
    "instance.cancel": [({"id": 999}, "UNKNOWN_INSTANCE")],
    "instance.debug_resume": [({"id": 999}, "UNKNOWN_INSTANCE")],
    "instance.list": [(UNKNOWN, "INVALID_PARAMS")],
    "schedule.list": [(UNKNOWN, "INVALID_PARAMS")],
    "schedule.enable": [({"name": "nope"}, "UNKNOWN_SCHEDULE")],
    "schedule.disable": [({"name": "nope"}, "UNKNOWN_SCHEDULE")],
    "schedule.trigger": [({"name": "nope"}, "UNKNOWN_SCHEDULE")],
    "audit.list": [(UNKNOWN, "INVALID_PARAMS")],
}

# What carol, who has no right, is refused (over HTTP, which serves every method but events.subscribe).
CAROL_REFUSALS: list[tuple[str, dict[str, Any]]] = [
    ("job.get", {"id": "JOB"}),
    ("job.cancel", {"id": "JOB"}),
    ("job.wait", {"id": "JOB"}),
    ("job.output", {"id": "JOB"}),
    ("job.submit", {"task": "t"}),
    ("queue.pause", {"name": "default"}),
    ("daemon.reload", {}),
    ("schedule.trigger", {"name": "s"}),
    ("audit.list", {}),
]


def _says_the_method_once(method: str, message: str) -> bool:
    return message.startswith(f"{method}: ") and not message[len(method) + 2 :].startswith(method)


def _with_job(params: dict[str, Any], job: int) -> dict[str, Any]:
    return {key: job if value == "JOB" else value for key, value in params.items()}


def test_every_methods_refusals_start_with_its_name(make_daemon: Any) -> None:
    daemon = make_daemon(CONFIG)
    job = daemon.submit(task="t")["id"]
    assert daemon.wait(job)["state"] == "succeeded"
    wrong = []
    with daemon.client() as client:
        served = methods_of(client)
        assert sorted(REFUSALS) == sorted(served), "REFUSALS must have every method the daemon serves"
        for method, cases in REFUSALS.items():
            for params, code in cases:
                try:
                    client.call(method, _with_job(params, job), timeout=TIMEOUT)
                except RemoteError as refused:
                    if refused.code != code or not _says_the_method_once(method, refused.message):
                        wrong.append((method, params, refused.code, refused.message))
                else:
                    wrong.append((method, params, "accepted"))
    assert not wrong, "\n".join(map(str, wrong))


def test_the_refusals_of_the_rights_start_with_the_methods_name_over_http(make_daemon: Any) -> None:
    daemon = make_daemon(CONFIG)
    job = daemon.submit(task="t")["id"]
    assert daemon.wait(job)["state"] == "succeeded"
    wrong = []
    for method, params in CAROL_REFUSALS:
        status, body = request(daemon, "POST", f"/api/{method}", _with_job(params, job), token=CAROL_TOKEN)
        error = body.get("error", {}) if isinstance(body, dict) else {}
        if status != 403 or error.get("code") != "INSUFFICIENT_RIGHTS":
            wrong.append((method, status, body))
        elif not _says_the_method_once(method, error["message"]):
            wrong.append((method, error["message"]))
    assert not wrong, "\n".join(map(str, wrong))


def test_a_waiting_methods_refusal_is_named_and_closing_it_unstarted_closes_the_method() -> None:
    """In-process: a coroutine method's refusal gets the prefix when it comes; closed before it ran (its client
    left while its replies were not read), the method's own coroutine is closed too, not left never awaited."""

    async def refuses() -> None:
        await asyncio.sleep(0)
        raise UnknownJob("no job 5", id=5)

    with pytest.raises(UnknownJob, match=r"^job\.wait: no job 5$"):
        asyncio.run(api._naming_the_method("job.wait", refuses))
    work = refuses()
    waiting = api._naming_the_method("job.wait", lambda: work)
    assert work.cr_frame is not None  # not run yet
    waiting.close()
    assert work.cr_frame is None  # closed
