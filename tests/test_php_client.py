"""evQueue's way of talking, from PHP: tests/php/evqueue_client.php against a real daemon's evqueue socket.

The PHP script does what evQueue's PHP class does (greeting first, one document per request, read until the root
closes, skip <ping />); `make test` installs php-cli and php-xml when they are missing. tests/php/evqueue_requests.php
holds a scripted conversation the same way, with PHP's expat parser, over the evqueue socket or the TCP listener.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "php" / "evqueue_client.php"
CONVERSATION = HERE / "php" / "evqueue_requests.php"
CORPUS = HERE / "workflows"
PHP = shutil.which("php")

SLOW_ECHO = b"""<workflow>
  <parameters><parameter name="word"/></parameters>
  <subjobs>
    <job name="nap">
      <tasks><task name="nap" path="/bin/sleep 1" queue="default"/></tasks>
      <subjobs>
        <job name="say">
          <tasks>
            <task name="say" path="/bin/echo" queue="default">
              <input name="word"><value select="evqGetWorkflowParameter('word')"/></input>
            </task>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


@pytest.fixture
def corpus_daemon(make_daemon: Any) -> Any:
    daemon = make_daemon(
        (CORPUS / "corpus.toml").read_text(), start=False, daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"'
    )
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    for path in CORPUS.glob("*.xml"):
        shutil.copy(path, workflows / path.name)
    (workflows / "slow_echo.xml").write_bytes(SLOW_ECHO)
    daemon.env["JOBD_EVQUEUE_KEEPALIVE_INTERVAL"] = "0.2"
    daemon.start()
    return daemon


def run_client(daemon: Any, *args: str) -> dict[str, Any]:
    if PHP is None:
        pytest.fail("php is not installed: `make test` installs php-cli and php-xml")
    done = subprocess.run(
        [PHP, str(CLIENT), str(daemon.evqueue_socket), *args], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, f"{done.stderr}\n{done.stdout}\n{daemon.log()[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_php_launches_with_parameters_waits_and_reads_the_output(corpus_daemon: Any) -> None:
    result = run_client(corpus_daemon, "parameters", "greeting=hello", "who=PHP", "verbose=no")
    assert result["profile"] == "ADMIN" and result["version"]
    assert (result["status"], result["errors"], result["comment"]) == ("TERMINATED", 0, "from PHP")
    said = next(task for task in result["tasks"] if task["name"] == "say")
    assert (said["status"], said["retval"], said["output"]) == ("TERMINATED", "0", "hello dear PHP\n")
    assert result["first_queue"] == "default"  # an xpathfilter answer, read as any answer
    files = next(task for task in result["tasks"] if task["name"] == "names")
    assert files["output"] == "files: f1.txt f2.txt\n"
    # The instance the PHP client launched is the one jobd's own API reports.
    instance = corpus_daemon.call("instance.get", {"id": result["id"]})
    assert instance["status"] == "TERMINATED" and instance["parameters"]["who"] == "PHP"


def test_php_synchronous_launch_skips_keepalives(corpus_daemon: Any) -> None:
    result = run_client(corpus_daemon, "slow_echo", "--synchronous", "word=patience")
    assert result["keepalives"] >= 2, result
    assert (result["status"], result["errors"]) == ("TERMINATED", 0)
    assert [task["output"] for task in result["tasks"]] == ["", "patience\n"]


def test_php_reports_an_unknown_workflow(corpus_daemon: Any) -> None:
    assert PHP is not None
    done = subprocess.run(
        [PHP, str(CLIENT), str(corpus_daemon.evqueue_socket), "nosuch"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and "UNKNOWN_WORKFLOW" in done.stderr, done.stderr


# -- scripted conversations (tests/php/evqueue_requests.php) -----------------------------------------------------

TCP_LOGINS = f"""
[tcp]
listen = "127.0.0.1:0"

[tcp.users.admin]
password_sha1 = "{hashlib.sha1(b"admin").hexdigest()}"
admin = true

[tcp.users.reports]
password_sha1 = "{hashlib.sha1(b"reports").hexdigest()}"

# A team with a grant per workflow: what it may read is 150 name patterns in one listing.
[[access.grant]]
users = ["reports"]
rights = ["read", "exec"]
workflows = {json.dumps(["trivial", *(f"report-{number}" for number in range(149))])}
"""


@pytest.fixture
def tcp_daemon(make_daemon: Any) -> Any:
    daemon = make_daemon("[queue.default]\nconcurrency = 2\n" + TCP_LOGINS, start=False)
    daemon.write_workflows(trivial=(CORPUS / "trivial.xml").read_bytes())
    daemon.start()
    return daemon


def converse(address: str, requests: list[dict[str, Any]], **login: str) -> dict[str, Any]:
    """The PHP conversation's report: greeting, answers (root, attributes, text), keepalives, closed."""
    if PHP is None:
        pytest.fail("php is not installed: `make test` installs php-cli and php-xml")
    script = json.dumps({**login, "requests": requests})
    done = subprocess.run([PHP, str(CONVERSATION), address], input=script, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr + done.stdout
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def tcp_address(daemon: Any) -> str:
    return "tcp://" + daemon.call("daemon.status")["tcp_listen"]


def many_attributes(root: str, count: int, **attributes: str) -> dict[str, str]:
    """A raw request: `attributes`, then `count` more (written here: PHP's DOM takes quadratic time to add them)."""
    given = " ".join(f'{name}="{value}"' for name, value in attributes.items())
    extra = " ".join(f'a{number}="x"' for number in range(count))
    return {"raw": f"<{root} {given} {extra}/>"}


def test_php_request_with_too_many_attributes_is_refused_and_the_connection_goes_on(tcp_daemon: Any) -> None:
    # Reading a root's attributes costs jobd the square of their number: 20,000 of them (200 KB) held its event
    # loop, every client's, for seconds. They are counted first and refused past 256.
    report = converse(
        str(tcp_daemon.evqueue_socket),
        [
            many_attributes("ping", 20_000),
            many_attributes("ping", 256),
        ],
    )
    refused, served = report["answers"]
    assert refused["attributes"]["error-code"] == "INVALID_XML", refused
    assert "20000 attributes on <ping>; at most 256" in refused["attributes"]["error"]
    assert served["attributes"]["status"] == "OK" and not report["closed"]


def test_php_login_with_too_many_attributes_is_refused_before_any_password_check(tcp_daemon: Any) -> None:
    # Before the login too: whoever reaches the TCP port could otherwise stall jobd without knowing a password.
    auth = many_attributes("auth", 20_000, response="0" * 40, user="admin")
    report = converse(tcp_address(tcp_daemon), [auth])
    assert report["greeting"]["root"] == "auth"
    [refused] = report["answers"]
    assert refused["attributes"]["error-code"] == "INVALID_XML", refused
    assert report["closed"]
    # A login that follows the rules still works.
    report = converse(tcp_address(tcp_daemon), [{"group": "ping"}], user="admin", password="admin")
    assert report["greeting"]["attributes"]["profile"] == "ADMIN"
    assert report["answers"][0]["attributes"]["status"] == "OK"


def test_php_instances_list_filters_on_a_hundred_values_and_reads_through_many_grants(tcp_daemon: Any) -> None:
    # Each filter, and each workflow a non-admin may read, is one more condition of the listing's query: nested
    # one in another they overflowed SQLite's parser, which jobd reported as its database failing (STORE_FAILED).
    launched = converse(
        tcp_address(tcp_daemon),
        [{"group": "instance", "attributes": {"action": "launch", "name": "trivial", "mode": "synchronous"}}],
        user="reports",
        password="reports",
    )
    assert launched["greeting"]["attributes"]["profile"] == "USER"
    instance = launched["answers"][0]["attributes"]["workflow-instance-id"]
    listing = {"group": "instances", "attributes": {"action": "list", "xpathfilter": "/response/workflow/@id"}}
    filtered = {
        "group": "instances",
        "attributes": {"action": "list", **{f"customattribute_c{number}": "x" for number in range(100)}},
        "parameters": {f"p{number}": "x" for number in range(100)},
    }
    one_too_many = {**filtered, "parameters": {f"p{number}": "x" for number in range(101)}}
    report = converse(tcp_address(tcp_daemon), [listing, filtered, one_too_many], user="reports", password="reports")
    everything, none, refused = (answer["attributes"] for answer in report["answers"])
    assert everything["status"] == "OK" and report["answers"][0]["text"] == instance, report["answers"][0]
    assert (none["status"], none["rows"]) == ("OK", "0"), none
    assert refused["error-code"] == "INVALID_PARAMETER", refused
    assert "at most 100 launch parameter values, not 101" in refused["error"]
    assert tcp_daemon.call("daemon.status")["store_trouble"] is None


def test_php_xpathfilter_numbers_are_answered_as_xpath_writes_them(tcp_daemon: Any) -> None:
    # evQueue wrote an integer result as an integer, and failed on every result of `div` (a float, which its
    # DOMXPathResult::GetNodeType does not know: UNEXPECTED_EXCEPTION, and the connection closed). jobd cut such
    # numbers down to an integer, so half a queue read as 0 queues: a wrong answer that looked right. They are now
    # answered as XPath's string() writes them, whole numbers still without a fraction.
    filters = ["count(/response/queue)", "count(/response/queue) div 2", "-1 div 8", "1 div 0", "-1 div 0", "0 div 0"]
    report = converse(
        str(tcp_daemon.evqueue_socket),
        [{"group": "queuepool", "attributes": {"action": "list", "xpathfilter": expression}} for expression in filters],
    )
    answers = [(answer["attributes"]["status"], answer["text"]) for answer in report["answers"]]
    assert answers == [
        ("OK", "1"),
        ("OK", "0.5"),
        ("OK", "-0.125"),
        ("OK", "Infinity"),
        ("OK", "-Infinity"),
        ("OK", "NaN"),
    ], report


# evQueue 3.3's git repository keeps a workflow as its group and comment around its definition (Workflow::SaveToXML).
GIT_FILE = b"""<workflow group="media" comment="thumbnails &amp; previews">
  <workflow>
    <subjobs><job name="a"><tasks><task name="t" path="/bin/true" queue="default"/></tasks></job></subjobs>
  </workflow>
</workflow>
"""


def test_php_sees_the_group_and_comment_of_a_workflow_file_from_evqueues_git(make_daemon: Any) -> None:
    # evQueue's `workflow get` and `workflows list` show the group and comment a git file holds (its web UI sorts the
    # workflows by group); jobd read such a file but dropped both, and answered them empty.
    daemon = make_daemon(
        '[queue.default]\nconcurrency = 1\n[schedule.nightly]\nworkflow = "git"\ncalendar = "0 3 * * *"\n',
        start=False,
    )
    daemon.write_workflows(git=GIT_FILE, trivial=(CORPUS / "trivial.xml").read_bytes())
    daemon.start()

    def wrapper(row: str) -> str:  # an answer's text is what PHP's evQueue class reads of a filtered answer
        return f"concat({row}/@group, '|', {row}/@comment)"

    asked = [
        ("workflows", {"action": "list", "xpathfilter": wrapper("/response/workflow[@name='git']")}),
        ("workflows", {"action": "list", "full": "yes", "xpathfilter": wrapper("/response/workflow[@name='git']")}),
        ("workflow", {"action": "get", "name": "git", "xpathfilter": wrapper("/response/workflow")}),
        ("workflow", {"action": "get", "name": "trivial", "xpathfilter": wrapper("/response/workflow")}),
        ("workflow_schedules", {"action": "list", "xpathfilter": "/response/workflow_schedule/@workflow_group"}),
    ]
    report = converse(
        str(daemon.evqueue_socket), [{"group": group, "attributes": attributes} for group, attributes in asked]
    )
    answers = [(answer["attributes"]["status"], answer["text"]) for answer in report["answers"]]
    shown = ("OK", "media|thumbnails & previews")
    # The plain file has neither: both empty, as evQueue shows a workflow created without them.
    assert answers == [shown, shown, shown, ("OK", "|"), ("OK", "media")], report
    # jobd's own API shows them too, and the definition alone as the workflow's XML.
    got_json = daemon.call("workflow.get", {"name": "git"})
    assert (got_json["group"], got_json["comment"]) == ("media", "thumbnails & previews")
    assert 'group="media"' not in got_json["xml"]
    listed_json = {w["name"]: (w["group"], w["comment"]) for w in daemon.call("workflow.list")["workflows"]}
    assert listed_json == {"git": ("media", "thumbnails & previews"), "trivial": ("", "")}


def test_php_a_refused_filter_status_is_quoted_as_sent(tcp_daemon: Any) -> None:
    # filter_status is compared without regard to case, as evQueue's MySQL does; a value it refused was quoted
    # upper-cased ('RUNNING' for the 'running' sent), which is not what the client wrote.
    listing = {"group": "instances", "attributes": {"action": "list", "filter_status": "running"}}
    [refused] = converse(str(tcp_daemon.evqueue_socket), [listing])["answers"]
    assert refused["attributes"]["error-code"] == "INVALID_PARAMETER", refused
    assert refused["attributes"]["error"] == (
        "Invalid value 'running' for parameter 'filter_status'; allowed: EXECUTING, TERMINATED, ABORTED"
    )
