"""Every refusal of job.submit, single and in a batch, against a real jobd: each names the parameter at fault as
`data.param` (one of the parameters job.submit takes, as the daemon lists them), and its message says what is
allowed. Every message starts `job.submit: `, once, whichever check refused it (the parameters' own, or the task's,
the queue's and the rights' checks of the engine); a batch member's refusal also says which member (`data.index`,
and `job.submit: jobs[N]: ` starting the message).

A refusal added to the submit path belongs in one of the tables below; its `data.param` is then checked here."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from test_http_api import request
from test_protocol import error_of, exchange
from test_protocol_docs import params_taken

from jobd.client import RemoteError
from jobd.engine.submit import MAX_ARG_STRLEN

TIMEOUT = 30
ADMIN_TOKEN = "remote-admin-token"
CAROL_TOKEN = "carol-token"
# Users that are no local account: their clients are remote logins (uid -1).
REMOTE_ADMIN, CAROL = "jobdtest-no-such-admin", "jobdtest-no-such-carol"


def _token(name: str, token: str, user: str, admin: bool) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f'[http.tokens.{name}]\ntoken_sha256 = "{digest}"\nuser = "{user}"\nadmin = {str(admin).lower()}\n\n'


CONFIG = f"""
[http]
listen = "127.0.0.1:0"

{_token("remote_admin", ADMIN_TOKEN, REMOTE_ADMIN, True)}
{_token("carol", CAROL_TOKEN, CAROL, False)}
[queue.default]
concurrency = 1

[queue.other]
concurrency = 1

[queue.held]
concurrency = 1

[task.open]
command = ["/bin/true"]
parameters = "env"
allowed_params = ["A"]

[task.argv]
command = ["/bin/echo"]

[task.hook]
http = {{ url = "http://127.0.0.1:9/" }}

[task.mine]
command = ["/bin/true"]
run_as = "caller"

[[access.grant]]
users = ["{CAROL}"]
rights = ["read", "exec"]
tasks = ["open", "mine", "hook"]
"""

COMMAND = ["/bin/true"]
HTTP = {"url": "http://127.0.0.1:9/"}
TOO_LONG = "x" * MAX_ARG_STRLEN  # one byte too many with its NUL (as `A=` and two fewer)

# (params, data.code, data.param, what the message must say: the allowed values, or what to give instead)
BY_AN_ADMIN: list[tuple[dict[str, Any], str, str, str]] = [
    # what to run
    ({}, "INVALID_PARAMS", "task", "give exactly one of 'task' (a configured task), 'command' (an argv list) or"),
    ({"task": "open", "command": COMMAND}, "INVALID_PARAMS", "command", "give exactly one of 'task'"),
    ({"command": COMMAND, "http": HTTP}, "INVALID_PARAMS", "http", "'command' (an argv list) or 'http' (a request)"),
    ({"task": "nope"}, "UNKNOWN_TASK", "task", "defined tasks: argv, hook, mine, open"),
    ({"task": "a b"}, "INVALID_PARAMS", "task", "expected a name: 1 to 64 characters from A-Z a-z 0-9 _ . -"),
    ({"command": "/bin/true"}, "INVALID_PARAMS", "command", "expected a list of strings without NUL"),
    ({"command": []}, "INVALID_PARAMS", "command", "expected a non-empty list of strings whose first is the program"),
    ({"http": "http://x/"}, "INVALID_PARAMS", "http", "expected an object"),
    ({"http": {"url": "ftp://x/"}}, "INVALID_PARAMS", "http", "is not an http:// or https:// URL"),
    ({"http": {**HTTP, "verb": "GET"}}, "INVALID_PARAMS", "http", "unknown key 'verb'; allowed: type, method, url"),
    # where and when
    ({"task": "open", "queue": "nope"}, "UNKNOWN_QUEUE", "queue", "defined queues: default, held, other"),
    ({"command": COMMAND, "queue": "../q"}, "INVALID_PARAMS", "queue", "expected a name: 1 to 64 characters"),
    ({"task": "open", "priority": -1}, "INVALID_PARAMS", "priority", "expected an integer from 0 to 4294967295"),
    ({"task": "open", "priority": 2**32}, "INVALID_PARAMS", "priority", "expected an integer from 0 to 4294967295"),
    ({"task": "open", "delay": -1}, "INVALID_PARAMS", "delay", "expected a number >= 0 and <= "),
    ({"task": "open", "timeout": 0}, "INVALID_PARAMS", "timeout", "expected a number > 0 and <= "),
    # what the job gets
    ({"task": "argv", "args": "x"}, "INVALID_PARAMS", "args", "expected a list of strings without NUL"),
    ({"task": "argv", "args": ["x"], "params": {"A": "1"}}, "INVALID_PARAMS", "params", "give 'args' (a list) or"),
    ({"task": "open", "args": ["x"]}, "INVALID_PARAMS", "args", "give 'params' (the names its allowed_params lists)"),
    ({"task": "open", "params": ["A"]}, "INVALID_PARAMS", "params", "expected an object whose values are strings"),
    ({"task": "open", "params": {"1A": "x"}}, "INVALID_PARAMS", "params", "allowed: [A-Za-z_][A-Za-z0-9_]*"),
    ({"task": "open", "params": {"JOBD_X": "1"}}, "INVALID_PARAMS", "params", "not starting with JOBD_"),
    ({"command": COMMAND, "env": {"A": 1}}, "INVALID_PARAMS", "env", "expected an object whose values are strings"),
    ({"command": COMMAND, "env": {"A-B": "1"}}, "INVALID_PARAMS", "env", "allowed: [A-Za-z_][A-Za-z0-9_]*"),
    ({"command": COMMAND, "env": {"JOBD_QUEUE": "x"}}, "INVALID_PARAMS", "env", "not starting with JOBD_"),
    # a string Linux starts no program with (MAX_ARG_STRLEN): refused, where it failed as the job's turn came
    ({"command": ["/bin/echo", TOO_LONG]}, "INVALID_PARAMS", "command", f"an argument of {MAX_ARG_STRLEN + 1} bytes"),
    ({"task": "argv", "args": [TOO_LONG]}, "INVALID_PARAMS", "args", f"of more than {MAX_ARG_STRLEN} bytes"),
    ({"task": "argv", "params": {"A": TOO_LONG}}, "INVALID_PARAMS", "params", "Linux starts no program with an"),
    ({"task": "open", "params": {"A": TOO_LONG[2:]}}, "INVALID_PARAMS", "params", "an environment variable of"),
    ({"command": COMMAND, "env": {"A": TOO_LONG[2:]}}, "INVALID_PARAMS", "env", "(NAME=value) of more than"),
    ({"task": "open", "stdin": 5}, "INVALID_PARAMS", "stdin", "expected a string without NUL"),
    ({"task": "open", "stdin_base64": "!!"}, "INVALID_PARAMS", "stdin_base64", "expected base64 text"),
    (
        {"task": "open", "stdin": "x", "stdin_base64": "eA=="},
        "INVALID_PARAMS",
        "stdin_base64",
        "give 'stdin' (text) or 'stdin_base64' (bytes in base64), not both",
    ),
    ({"task": "open", "context": ["x"]}, "INVALID_PARAMS", "context", "expected a string without NUL"),
    ({"task": "open", "key": ""}, "INVALID_PARAMS", "key", "expected a non-empty string"),
    ({"task": "open", "key": "instance:7"}, "INVALID_PARAMS", "key", "not starting with 'instance:'"),
    ({"task": "open", "merge_stderr": "yes"}, "INVALID_PARAMS", "merge_stderr", "expected true or false"),
    ({"task": "open", "callbacks": []}, "INVALID_PARAMS", "callbacks", "on_success, on_failure, on_finish"),
    # the settings of an ad-hoc command, which a task takes from its configuration
    ({"command": COMMAND, "working_dir": "tmp"}, "INVALID_PARAMS", "working_dir", "expected an absolute path"),
    ({"command": COMMAND, "retry": 3}, "INVALID_PARAMS", "retry", "expected an object"),
    ({"command": COMMAND, "retry": {"times": -1}}, "INVALID_PARAMS", "retry", "times = -1 is not allowed; expected an"),
    ({"command": COMMAND, "retry": {"tries": 1}}, "INVALID_PARAMS", "retry", "allowed: backoff, delay, on_exit_codes"),
    ({"command": COMMAND, "retry": {"on_exit_codes": [256]}}, "INVALID_PARAMS", "retry", "exit codes 0-255"),
    ({"command": COMMAND, "kill_grace": -1}, "INVALID_PARAMS", "kill_grace", "expected a number >= 0"),
    ({"command": COMMAND, "max_output": -1}, "INVALID_PARAMS", "max_output", "expected an integer from 0 to"),
    (
        {"task": "open", "working_dir": "/tmp"},
        "INVALID_PARAMS",
        "working_dir",
        "allowed for ad-hoc jobs only ('command'",
    ),
    ({"task": "open", "retry": {}}, "INVALID_PARAMS", "retry", "allowed for ad-hoc jobs only ('command'"),
    ({"task": "open", "kill_grace": 1}, "INVALID_PARAMS", "kill_grace", "allowed for ad-hoc jobs only ('command'"),
    ({"task": "open", "max_output": 1}, "INVALID_PARAMS", "max_output", "allowed for ad-hoc jobs only ('command'"),
    # HTTP jobs take no program's input
    ({"task": "hook", "stdin": "x"}, "INVALID_PARAMS", "stdin", "it takes no 'args', 'params', 'stdin' or 'merge"),
    ({"task": "hook", "stdin_base64": "eA=="}, "INVALID_PARAMS", "stdin_base64", "it takes no 'args', 'params',"),
    ({"http": HTTP, "stdin_base64": ""}, "INVALID_PARAMS", "stdin_base64", "beside 'http' it takes queue, priority,"),
    ({"task": "hook", "args": ["x"]}, "INVALID_PARAMS", "args", "it takes no 'args', 'params', 'stdin' or 'merge"),
    ({"task": "hook", "merge_stderr": True}, "INVALID_PARAMS", "merge_stderr", "it takes no 'args', 'params',"),
    ({"http": HTTP, "params": {"A": "1"}}, "INVALID_PARAMS", "params", "beside 'http' it takes queue, priority,"),
    ({"http": HTTP, "env": {"A": "1"}}, "INVALID_PARAMS", "env", "beside 'http' it takes queue, priority,"),
    ({"http": HTTP, "working_dir": "/"}, "INVALID_PARAMS", "working_dir", "beside 'http' it takes queue, priority,"),
    ({"http": HTTP, "kill_grace": 1}, "INVALID_PARAMS", "kill_grace", "beside 'http' it takes queue, priority,"),
    ({"http": HTTP, "merge_stderr": True}, "INVALID_PARAMS", "merge_stderr", "beside 'http' it takes queue,"),
    # a name job.submit does not take
    ({"task": "open", "zz": 1}, "INVALID_PARAMS", "zz", "unknown parameter 'zz'; allowed: args, callbacks,"),
]

# Refused to carol (exec and read on tasks open, mine and hook only), a remote login (HTTP token).
BY_CAROL: list[tuple[dict[str, Any], str, str, str]] = [
    ({"command": COMMAND}, "INSUFFICIENT_RIGHTS", "command", "that is for admins"),
    ({"http": HTTP}, "INSUFFICIENT_RIGHTS", "http", "that is for admins"),
    ({"task": "argv"}, "INSUFFICIENT_RIGHTS", "task", "may not exec task argv: the exec right is missing"),
    ({"task": "open", "queue": "other"}, "INSUFFICIENT_RIGHTS", "queue", "may not exec queue other: the exec right"),
    ({"task": "open", "env": {"A": "1"}}, "INSUFFICIENT_RIGHTS", "env", "pass values as the task's 'params' instead"),
    # documented as naming the variable, with `allowed` (docs/protocol.md): a parameter of the task
    ({"task": "open", "params": {"B": "1"}}, "INSUFFICIENT_RIGHTS", "B", "only the names in its allowed_params (A)"),
    ({"task": "mine"}, "INSUFFICIENT_RIGHTS", "task", "a remote client has no local user to run it as; submit it as"),
    ({"task": "open", "callbacks": {"on_finish": [{"exec": COMMAND}]}}, "INSUFFICIENT_RIGHTS", "callbacks", "admins"),
]


def _starts_once(message: str, index: int | None = None) -> bool:
    """Whether a refusal's `message` starts `job.submit: ` (of a batch's member `index`: `job.submit: jobs[N]: `)
    and says so once: a check whose message had the prefix already does not get it twice."""
    prefix = "job.submit: " if index is None else f"job.submit: jobs[{index}]: "
    return message.startswith(prefix) and not message[len(prefix) :].startswith(("job.submit", "jobs["))


def _http_call(daemon: Any, token: str, params: dict[str, Any]) -> dict[str, Any]:
    """job.submit over HTTP with `token`: the error object of its refusal (the members of a JSON-RPC `data`)."""
    status, body = request(daemon, "POST", "/api/job.submit", params, token=token)
    assert status >= 400 and "error" in body, f"{params} was accepted: {body}"
    error: dict[str, Any] = body["error"]
    return error


def _refusal(daemon: Any, params: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    with daemon.client() as client, pytest.raises(RemoteError) as refused:
        client.call("job.submit", params, timeout=TIMEOUT)
    return refused.value.code, refused.value.message, refused.value.data


class TestEverySubmitRefusalNamesItsParameter:
    def test_single_submits(self, make_daemon: Any) -> None:
        daemon = make_daemon(CONFIG)
        with daemon.client() as client:
            taken = params_taken(client, "job.submit")
        wrong = []
        for params, code, param, says in BY_AN_ADMIN:
            got_code, message, data = _refusal(daemon, params)
            if (got_code, data.get("param")) != (code, param) or says not in message or "index" in data:
                wrong.append((params, got_code, message, data))
            if not _starts_once(message):
                wrong.append((params, message))
            if param not in taken and param != "zz":
                wrong.append((params, f"{param} is no parameter of job.submit: {sorted(taken)}"))
        assert not wrong, "\n".join(map(str, wrong))
        assert daemon.call("job.list")["jobs"] == []  # nothing refused was made

    def test_the_members_of_a_batch(self, make_daemon: Any) -> None:
        """The same refusals, of the second member of a batch: `data.index` is 1, and the message says `jobs[1]`.
        The batch is refused whole: its first member, good, makes no job either."""
        daemon = make_daemon(CONFIG)
        wrong = []
        for params, code, param, says in BY_AN_ADMIN:
            got_code, message, data = _refusal(daemon, {"jobs": [{"task": "open"}, params]})
            expected = (code, param, 1)
            if (got_code, data.get("param"), data.get("index")) != expected or says not in message:
                wrong.append((params, got_code, message, data))
            if not _starts_once(message, 1):
                wrong.append((params, message))
        assert not wrong, "\n".join(map(str, wrong))
        got_code, message, data = _refusal(daemon, {"jobs": [{"task": "open"}], "task": "open"})
        assert (got_code, data["param"], data["allowed"]) == ("INVALID_PARAMS", "task", ["jobs"]), (message, data)
        assert "index" not in data, data  # the batch's own parameters are no member's
        got_code, message, data = _refusal(daemon, {"jobs": []})
        assert (got_code, data["param"]) == ("INVALID_PARAMS", "jobs") and "a list of 1 to 10000" in message, data
        assert daemon.call("job.list")["jobs"] == []

    def test_what_only_some_may_do(self, make_daemon: Any) -> None:
        daemon = make_daemon(CONFIG)
        with daemon.client() as client:
            taken = params_taken(client, "job.submit")
        wrong = []
        for params, code, param, says in BY_CAROL:
            for sent, index in ((params, None), ({"jobs": [{"task": "open"}, params]}, 1)):
                error = _http_call(daemon, CAROL_TOKEN, sent)
                named = (error["code"], error.get("param"), error.get("index"))
                if named != (code, param, index) or says not in error["message"]:
                    wrong.append((sent, error))
                if not _starts_once(error["message"], index):
                    wrong.append((sent, error["message"]))
            if param not in taken and param != "B":
                wrong.append((params, f"{param} is no parameter of job.submit"))
        # An admin that is a remote login has no local user to run an ad-hoc command as.
        error = _http_call(daemon, ADMIN_TOKEN, {"command": COMMAND})
        if (error["code"], error.get("param")) != ("INSUFFICIENT_RIGHTS", "command") or (
            "submit a configured task instead" not in error["message"] or not _starts_once(error["message"])
        ):
            wrong.append(("remote admin", error))
        assert not wrong, "\n".join(map(str, wrong))

    def test_a_key_another_job_has(self, make_daemon: Any) -> None:
        """A key taken by a job carol may not read: refused as `key`, in a batch with its member's index."""
        daemon = make_daemon(CONFIG)
        daemon.submit(command=COMMAND, queue="held", key="taken")
        error = _http_call(daemon, CAROL_TOKEN, {"task": "open", "key": "taken"})
        assert (error["code"], error["param"], error["missing"]) == ("INSUFFICIENT_RIGHTS", "key", "read"), error
        assert _starts_once(error["message"]), error
        error = _http_call(
            daemon, CAROL_TOKEN, {"jobs": [{"task": "open", "key": "mine"}, {"task": "open", "key": "taken"}]}
        )
        assert (error["code"], error["param"], error["index"]) == ("INSUFFICIENT_RIGHTS", "key", 1), error
        assert _starts_once(error["message"], 1), error

    def test_a_name_the_client_gave_is_quoted_as_its_values_are(self, make_daemon: Any) -> None:
        """docs/protocol.md: a refusal quotes what the client sent JSON-style, up to 60 characters. The names of
        `env` and `params` were sent back whole, in Python's quotes: a name of 100,000 characters made a message of
        100,000, and a NUL in it showed as Python's `\\x00`."""
        daemon = make_daemon(CONFIG)
        long_name = "\u0000" + "x" * 100_000
        quoted = '"\\u0000' + "x" * 50 + "..."  # cut as values are: 57 characters of the JSON text, then "..."
        for params, param in (
            ({"command": COMMAND, "env": {long_name: "1"}}, "env"),
            ({"task": "open", "params": {long_name: "1"}}, "params"),
            ({"command": COMMAND, "env": {"JOBD_" + long_name: "1"}}, "env"),
        ):
            code, message, data = _refusal(daemon, params)
            assert (code, data["param"]) == ("INVALID_PARAMS", param), (message[:200], data)
            assert len(message) < 200, message[:200]
            shown = quoted if "JOBD_" not in message else '"JOBD_\\u0000' + "x" * 45 + "..."
            assert message.startswith(f"job.submit: {param}: {shown} "), message
        error = _http_call(daemon, CAROL_TOKEN, {"task": "open", "params": {"B" + "x" * 100_000: "1"}})
        assert error["code"] == "INSUFFICIENT_RIGHTS" and len(error["message"]) < 300, error["message"][:300]
        assert _starts_once(error["message"]), error["message"][:300]
        assert f'may not set "B{"x" * 55}... for task' in error["message"], error["message"]
        assert daemon.call("job.list")["jobs"] == []

    def test_a_queue_removed_from_the_configuration(self, make_daemon: Any) -> None:
        """A queue that drains after a reload removed it takes no new job: refused as `queue`."""
        daemon = make_daemon(CONFIG)
        daemon.submit(command=COMMAND, queue="held", delay=3600)  # it waits, and keeps the removed queue draining
        daemon.write_config(CONFIG.replace("[queue.held]\nconcurrency = 1\n", ""))
        assert daemon.call("daemon.reload")["ok"] is True
        for params, index in (
            ({"command": COMMAND, "queue": "held"}, None),
            ({"jobs": [{"command": COMMAND}, {"command": COMMAND, "queue": "held"}]}, 1),
        ):
            code, message, data = _refusal(daemon, params)
            assert (code, data.get("param"), data.get("queue"), data.get("index")) == (
                "QUEUE_CLOSED",
                "queue",
                "held",
                index,
            ), (message, data)
            assert "was removed from the configuration; it drains and takes no new jobs" in message, message
            assert _starts_once(message, index), message

    def test_a_number_too_large_for_a_float_is_quoted_as_the_client_wrote_it(self, make_daemon: Any) -> None:
        """`1e400` is JSON, but too large for a float: Python's json reads it as infinity, and its refusal quoted it
        as `Infinity`, which is neither JSON nor what the client sent. It is quoted as sent, wherever it is (a
        parameter, a batch member's, inside a list or an object), and the refusal answers the request's id."""
        daemon = make_daemon(CONFIG)
        http = b'{"url": "http://127.0.0.1:9/", "timeout": 1e400}'
        cases = [  # (params, data.param, data.index, what the message says)
            (b'{"task": "open", "priority": 1e400}', "priority", None, "priority = 1e400 is not allowed; expected an"),
            (b'{"task": "open", "delay": -1E+400}', "delay", None, "delay = -1E+400 is not allowed; expected a number"),
            (b'{"task": "open", "timeout": 2.5e999}', "timeout", None, "timeout = 2.5e999 is not allowed; expected"),
            (b'{"command": ["/bin/true"], "retry": {"delay": 1e400}}', "retry", None, "retry: delay = 1e400 is not"),
            (
                b'{"jobs": [{"task": "open"}, {"task": "open", "priority": 1e400}]}',
                "priority",
                1,
                "job.submit: jobs[1]: priority = 1e400 is not allowed; expected an integer from 0 to 4294967295",
            ),
            (b'{"jobs": [{"task": "open"}, 1e400]}', "jobs", None, 'jobs = [{"task": "open"}, 1e400] is not allowed'),
            (
                b'{"task": "open", "callbacks": {"on_finish": [{"http": ' + http + b"}]}}",
                "callbacks",
                None,
                "callbacks.on_finish[1].http.timeout: expected a number of seconds > 0 and <= 3600, got 1e400",
            ),
        ]
        wrong = []
        for request_id, (params, param, index, says) in enumerate(cases, start=100):
            line = b'{"jsonrpc": "2.0", "id": %d, "method": "job.submit", "params": %s}' % (request_id, params)
            answer = exchange(daemon, line)
            assert answer is not None, line
            error = error_of(answer)
            named = (answer["id"], error["data"]["code"], error["data"]["param"], error["data"].get("index"))
            if named != (request_id, "INVALID_PARAMS", param, index) or says not in error["message"]:
                wrong.append((params, answer))
            if "Infinity" in error["message"] or not _starts_once(error["message"], index):
                wrong.append((params, error["message"]))
        assert not wrong, "\n".join(map(str, wrong))
        assert daemon.call("job.list")["jobs"] == []


def test_the_longest_argument_and_variable_linux_takes_are_accepted_and_reach_the_job(make_daemon: Any) -> None:
    daemon = make_daemon(CONFIG)
    longest = "x" * (MAX_ARG_STRLEN - 1)  # with its NUL, MAX_ARG_STRLEN
    script = 'printf "%s %s" "${#1}" "${#A}"'
    job = daemon.submit(command=["/bin/sh", "-c", script, "sh", longest], env={"A": longest[2:]})  # A=...
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"]) == f"{MAX_ARG_STRLEN - 1} {MAX_ARG_STRLEN - 3}"
