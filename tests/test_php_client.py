"""evQueue's way of talking, from PHP: tests/php/evqueue_client.php against a real daemon's evqueue socket.

The PHP script does what evQueue's PHP class does (greeting first, one document per request, read until the root
closes, skip <ping />); `make test` installs php-cli and php-xml when they are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "php" / "evqueue_client.php"
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
