"""The Composer package contrib/php-client: its PHPUnit tests, run by Debian's phpunit against a real jobd.

The tests need no `composer install` (their bootstrap maps the PSR-4 prefix itself). This test starts the daemon
they expect (see contrib/php-client/tests/JobdTestCase.php), runs phpunit with the socket in JOBD_TEST_SOCKET and
reads phpunit's JUnit log: every test method of the package must have run and passed — a run of no tests fails.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import importlib
import json
import os
import pkgutil
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobd
from jobd import errors

pytestmark = pytest.mark.timeout(300)

PACKAGE = Path(__file__).resolve().parent.parent / "contrib" / "php-client"
STEPS = Path(__file__).resolve().parent / "php" / "jobd_client_steps.php"
PHP = shutil.which("php")
PHPUNIT = shutil.which("phpunit")

CONFIG = """
[queue.default]
concurrency = 4

[queue.idle]
concurrency = 1

# A thumbnail: progress and a log line on fd 3, the result on stdout.
[task.thumbnail]
command = ["/bin/sh", "-c", 'echo "%50" >&3; echo "resizing $SOURCE" >&3; echo "thumbnail $SIZE of $SOURCE"']
parameters = "env"

[task.sleeper]
command = ["/bin/sleep", "60"]
"""

THUMBNAILS = b"""<workflow>
  <parameters><parameter name="source"/></parameters>
  <subjobs>
    <job name="resize">
      <tasks>
        <task name="small" path="/bin/echo" queue="default">
          <input>small <value select="evqGetWorkflowParameter('source')"/></input>
        </task>
        <task name="large" path="/bin/echo" queue="default">
          <input>large <value select="evqGetWorkflowParameter('source')"/></input>
        </task>
      </tasks>
      <subjobs>
        <job name="publish"><tasks><task name="publish" path="/bin/true" queue="default"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""

# Its second job's condition is false: its task is never run, and counts as done in the progress.
GATED = b"""<workflow>
  <subjobs>
    <job name="run"><tasks><task name="run" path="/bin/true" queue="default"/></tasks></job>
    <job name="never" condition="1 = 2"><tasks><task name="never" path="/bin/true" queue="default"/></tasks></job>
  </subjobs>
</workflow>
"""

SLOW = b"""<workflow>
  <subjobs>
    <job name="nap"><tasks><task name="nap" path="/bin/sleep" queue="default"><input>60</input></task></tasks></job>
  </subjobs>
</workflow>
"""


def php_tools() -> tuple[str, str]:
    if PHP is None or PHPUNIT is None:
        pytest.fail("php and phpunit are needed: `make test` installs php-cli and phpunit (Debian packages)")
    return PHP, PHPUNIT


@pytest.fixture
def php_daemon(make_daemon: Any) -> Any:
    daemon = make_daemon(CONFIG, start=False)
    daemon.write_workflows(thumbnails=THUMBNAILS, slow=SLOW, gated=GATED)
    daemon.start()
    return daemon


def declared_tests() -> set[str]:
    """`Class::method` of every test method in the package's tests."""
    found = set()
    for path in (PACKAGE / "tests").glob("*Test.php"):
        for method in re.findall(r"public function (test\w+)\(", path.read_text()):
            found.add(f"{path.stem}::{method}")
    return found


def test_phpunit_suite_passes_against_a_real_jobd(php_daemon: Any, tmp_path: Path) -> None:
    _, phpunit = php_tools()
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [phpunit, "--configuration", str(PACKAGE / "phpunit.xml.dist"), "--log-junit", str(junit)],
        cwd=PACKAGE,
        env={
            "PATH": "/usr/bin:/bin",
            "JOBD_TEST_SOCKET": str(php_daemon.socket_path),
            "JOBD_TEST_EVQUEUE_SOCKET": str(php_daemon.evqueue_socket),
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = f"{done.stdout}\n{done.stderr}\n--- jobd log ---\n{php_daemon.log()[-4000:]}"
    assert done.returncode == 0, report
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None, report
    counts = {name: int(suite.get(name, "-1")) for name in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, report)
    ran = {f"{case.get('class', '').rsplit(chr(92), 1)[-1]}::{case.get('name')}" for case in junit_cases(junit)}
    expected = declared_tests()
    assert len(expected) >= 15, expected  # the suite exists: a glob that finds nothing must not pass
    assert ran == expected, (sorted(expected - ran), sorted(ran - expected))
    assert counts["tests"] == len(expected)


def junit_cases(path: Path) -> list[ET.Element]:
    return list(ET.parse(path).getroot().iter("testcase"))


def test_error_map_covers_every_wire_code_of_jobd() -> None:
    php, _ = php_tools()
    script = (
        f"require {json.dumps(str(PACKAGE / 'tests' / 'bootstrap.php'))};"
        "$short = fn ($class) => substr($class, strrpos($class, '\\\\') + 1);"
        "echo json_encode(array_map($short, Jobd\\Exception\\ErrorMap::FAMILIES));"
    )
    done = subprocess.run([php, "-r", script], capture_output=True, text=True, timeout=30, check=True)
    families: dict[str, str] = json.loads(done.stdout)
    # Error classes live beside the code that raises them (jobd/protocol/evqueue_auth.py, …): import it all.
    for module in pkgutil.walk_packages(jobd.__path__, "jobd."):
        importlib.import_module(module.name)
    codes = {cls.code for cls in all_subclasses(errors.JobdError)} | {errors.JobdError.code}
    assert codes - set(families) == set(), "codes jobd sends that the PHP client does not map"
    assert set(families) - codes == set(), "codes the PHP client maps that jobd no longer has"
    assert families["UNKNOWN_QUEUE"] == "NotFoundException"
    assert families["INSUFFICIENT_RIGHTS"] == "AccessDeniedException"


def all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | all_subclasses(sub)
    return found


def test_package_files_are_valid_php_and_composer_json() -> None:
    php, _ = php_tools()
    sources = sorted(PACKAGE.rglob("*.php"))
    assert len(sources) > 10
    for path in sources:
        done = subprocess.run([php, "-l", str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
    composer = json.loads((PACKAGE / "composer.json").read_text())
    assert composer["autoload"]["psr-4"] == {"Jobd\\": "src/"}
    assert set(composer["require"]) == {"php", "ext-json"}
    # PSR-4: each class lives at the path its name gives.
    for path in (PACKAGE / "src").rglob("*.php"):
        relative = path.relative_to(PACKAGE / "src").with_suffix("")
        namespace = "Jobd" + "".join("\\" + part for part in relative.parent.parts)
        text = path.read_text()
        assert f"namespace {namespace};" in text, path
        assert re.search(rf"^(final |abstract )?class {relative.name}\b", text, re.M), path


# -- the README's web examples, served by PHP's built-in web server ----------------------------------------------


@pytest.fixture
def web(php_daemon: Any, tmp_path: Path) -> Iterator[str]:
    """contrib/php-client/examples on `php -S`, talking to php_daemon; yields its base URL."""
    php, _ = php_tools()
    with socket.socket() as probe:  # a free port for php -S, which takes no port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [php, "-S", f"127.0.0.1:{port}", "-t", str(PACKAGE / "examples")],
        env={"PATH": "/usr/bin:/bin", "JOBD_SOCKET": str(php_daemon.socket_path), "TMPDIR": str(tmp_path)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        # php -S says when it listens; reading that line blocks until then (the pytest timeout ends a hang).
        started = server.stderr.readline()
        assert "started" in started, started
        # It logs every request on stderr: keep reading it, so that a full pipe never blocks the server.
        drain = threading.Thread(target=server.stderr.read, daemon=True)
        drain.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def request(opener: urllib.request.OpenerDirector, url: str, data: bytes | None = None, **headers: str) -> Any:
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def browser() -> urllib.request.OpenerDirector:
    """A visitor: its own cookie jar, hence its own PHP session."""
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def test_thumbnail_from_a_web_page(web: str) -> None:
    visitor = browser()
    image = b"\x89PNG fake image bytes"
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="cat.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--XyZ--\r\n"
    )
    status, submitted = request(
        visitor, f"{web}/thumbnail.php", body, **{"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert status == 202, submitted
    assert submitted["state"] in ("queued", "running", "succeeded")
    # &wait: the answer comes once the job has ended (job.wait in jobd).
    status, job = request(visitor, f"{web}/thumbnail.php?job={submitted['job']}&wait=25")
    assert status == 200 and job["state"] == "succeeded", job
    size, _, source = job["thumbnail"].removeprefix("thumbnail ").partition(" of ")
    assert size == "256" and Path(source).read_bytes() == image, job
    # Another visitor may not read it, nor learn that it exists: answered as a job that does not; a visitor without
    # an upload is told what is missing.
    assert request(browser(), f"{web}/thumbnail.php?job={submitted['job']}") == (404, {"error": "no such job"})
    assert request(browser(), f"{web}/thumbnail.php?job={submitted['job'] + 1000}") == (404, {"error": "no such job"})
    assert (
        request(visitor, f"{web}/thumbnail.php", b"", **{"Content-Type": "multipart/form-data; boundary=XyZ"})[0] == 400
    )


def test_ajax_progress_of_a_workflow(web: str, php_daemon: Any) -> None:
    visitor = browser()
    form = urllib.parse.urlencode({"source": "holiday.jpg"}).encode()
    status, launched = request(visitor, f"{web}/progress.php", form)
    assert status == 202, launched
    instance = launched["instance"]
    token = ""
    answers = []
    # What the page's script does: ask again with the last token as soon as an answer comes. Each answer comes
    # when something changed (or after 20 s), so a few rounds see the instance to its end.
    for _ in range(20):
        status, progress = request(visitor, f"{web}/progress.php?instance={instance}&since={token}")
        assert status == 200, progress
        answers.append(progress)
        if progress["finished"]:
            break
        token = progress["token"]
    final = answers[-1]
    assert final["finished"] and (final["status"], final["errors"]) == ("TERMINATED", 0), answers
    assert [task["name"] for task in final["tasks"]] == ["small", "large", "publish"]
    assert final == {**final, "id": instance, "workflow": "thumbnails"}
    assert php_daemon.call("instance.get", {"id": instance})["comment"] == "web upload"
    # The instance is this visitor's: another session cannot read it.
    assert request(browser(), f"{web}/progress.php?instance={instance}")[0] == 404


# -- one client kept by a long-lived PHP process (tests/php/jobd_client_steps.php) -------------------------------


class PhpClient:
    """A PHP process holding one Jobd\\Client; step() calls one of its methods and returns what PHP reported."""

    def __init__(self, socket_path: Path) -> None:
        php, _ = php_tools()
        self.process = subprocess.Popen(
            [php, str(STEPS), str(socket_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def step(self, method: str, *arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([method, *arguments]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()  # blocks until PHP answers (the pytest timeout ends a hang)
        assert line, f"the PHP process ended (exit status {self.process.wait(30)})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(30) == 0


@pytest.fixture
def php_client(php_daemon: Any) -> Iterator[PhpClient]:
    client = PhpClient(php_daemon.socket_path)
    yield client
    client.close()


def restart(daemon: Any) -> None:
    assert daemon.stop() == 0
    daemon.start()


def test_a_client_kept_across_a_restart_of_jobd_opens_a_new_connection(php_daemon: Any, php_client: PhpClient) -> None:
    # A worker's client whose connection jobd closed while it was idle (jobd restarted, or stopped, between two
    # calls): the next call found out only by failing ("broke while sending"), though jobd was back, or said so
    # about a jobd that was not running rather than that it was not running.
    assert php_client.step("ping")["result"]["pong"] is True
    restart(php_daemon)
    assert php_client.step("ping")["result"]["pong"] is True
    submitted = php_client.step("submit", ["/bin/echo", "after the restart"])["result"]
    assert php_client.step("wait", submitted["id"], 30)["result"]["state"] == "succeeded"

    assert php_daemon.stop() == 0
    stopped = php_client.step("ping")
    assert stopped["exception"] == "SocketNotFoundException", stopped
    assert "is jobd running" in stopped["message"]
    php_daemon.start()
    assert php_client.step("outputText", submitted["id"])["result"] == "after the restart\n"


def test_a_subscribed_client_is_told_that_its_subscription_ended_with_jobds_restart(
    php_daemon: Any, php_client: PhpClient
) -> None:
    # Its events would be lost without a word on a new connection: the call says so, and the next one reconnects.
    assert isinstance(php_client.step("subscribe", {"types": ["job.state"]})["result"], int)
    restart(php_daemon)
    ended = php_client.step("ping")
    assert (ended["exception"], ended["wire_code"]) == ("ConnectionException", None), ended
    assert "subscription" in ended["message"] and "subscribe again" in ended["message"]
    assert php_client.step("ping")["result"]["pong"] is True


class SignallingTap:
    """A Unix socket in front of jobd's that passes every byte on, both ways, for every connection, and sends
    `signum` to `pid` (set once the client is started) as the first request naming `method` goes through: before it
    reaches jobd, so the signal comes while the client waits for that request's reply."""

    def __init__(self, path: Path, jobd_socket: Path, method: str, signum: int) -> None:
        self.path = path
        self.pid: int | None = None
        self._jobd_socket = jobd_socket
        self._method = f'"method":"{method}"'.encode()
        self._signum = signum
        self._signalled = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._threads: list[threading.Thread] = []
        self._start(self._serve)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed: the test is over
                return
            jobd_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            jobd_side.connect(str(self._jobd_socket))
            self._start(self._pass, client, jobd_side, True)
            self._start(self._pass, jobd_side, client, False)

    def _pass(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        with contextlib.suppress(OSError):  # either end closed: the other is told below
            while data := source.recv(65536):
                # jobd's client writes a request whole, in one frame: its method is in one piece of what comes
                if requests and not self._signalled.is_set() and self._method in data:
                    self._signalled.set()
                    assert self.pid is not None
                    os.kill(self.pid, self._signum)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(30)


def test_a_call_ended_by_the_applications_exception_leaves_the_next_call_in_step(
    php_daemon: Any, tmp_path: Path
) -> None:
    # A signal handler's exception (pcntl; a worker's SIGTERM handler may throw) ended a submit after it was sent:
    # its reply, which came later, was read as the answer to the next call, which failed ("unexpected message from
    # jobd"). The connection is now dropped, as after a timeout; the submit may have been done, and submitting again
    # with its key answers the job it made (README, Errors).
    tap = SignallingTap(tmp_path / "tap.sock", php_daemon.socket_path, "job.submit", signal.SIGUSR1)
    php = PhpClient(tap.path)
    tap.pid = php.process.pid
    try:
        command = ["/bin/echo", "once"]
        interrupted = php.step("submit", command, {"key": "upload-17"})
        assert (interrupted["exception"], interrupted["message"]) == ("RuntimeException", "interrupted by SIGUSR1")
        again = php.step("submit", command, {"key": "upload-17"})
        assert "result" in again, again
        made = php_daemon.call("job.list", {"limit": 10})["jobs"]
        assert [job["id"] for job in made] == [again["result"]["id"]], made
        assert php.step("ping")["result"]["pong"] is True
    finally:
        php.close()
        tap.close()
