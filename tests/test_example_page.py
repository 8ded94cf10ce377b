"""The example page (examples/web/) in headless Chromium against a real jobd: the form launches the `thumbnails`
workflow, the page follows it live through events.php (jobd's GET /events relayed by PHP), and ends showing the
steps as instance.get reports them.

jobd runs with the example's own drop-in and workflow (plus a drop-in of this test: a free port, and the token's
hash); php -S serves examples/web/public with workers; chromedriver drives Chromium through the W3C WebDriver HTTP
protocol, spoken here with urllib. Waits are the browser's (a MutationObserver in an async script, bounded by the
session's script timeout); every process started here is stopped, with its children, even when the test fails.
PHP's connections to jobd are held a while by strace (slow_connections), as a loaded machine holds them at times.
`make test` installs php-cli, chromium and chromium-driver when they are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_http_api import address

pytestmark = pytest.mark.timeout(240)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "web"
TOKEN = "example-page-test-token"  # the page's: only the PHP side gets it
PACE = "0.25"  # seconds per quarter of each step: long enough for the page to show steps half done
HANG_GUARD = 120.0  # seconds: the longest any wait of this test may take
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key


class Process:
    """A child in its own process group, its output read by a thread; `wait_for` blocks (with a deadline) until
    a line matches. `stop` ends the whole group: php -S workers, Chromium's processes."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self.changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = HANG_GUARD) -> re.Match[str]:
        with self.changed:
            found: list[re.Match[str]] = []

            def seen() -> bool:
                found[:] = [m for line in self.lines if (m := re.search(pattern, line))][:1]
                return bool(found) or self.process.poll() is not None

            if not self.changed.wait_for(seen, timeout) or not found:
                raise AssertionError(f"{self.process.args[0]} never said /{pattern}/; it said:\n{self.output()}")
            return found[0]

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # Whatever the group left behind (a worker, a renderer) goes too; none left is the usual case.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.reader.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# WebDriver.wait_until's async script: done once an element matches the CSS selector; the document it runs in is marked.
WAIT_SCRIPT = """
    const [css, mark, done] = arguments;
    window.webdriverWait = mark;
    if (document.querySelector(css)) { done(true); return; }
    const observer = new MutationObserver(() => {
        if (document.querySelector(css)) { observer.disconnect(); done(true); }
    });
    observer.observe(document.documentElement, {subtree: true, childList: true, attributes: true});
"""


class WebDriverError(AssertionError):
    """An error answer of the WebDriver server; `error` is its W3C error code ("script timeout", ...)."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


class WebDriver:
    """Just enough of the W3C WebDriver protocol, over urllib."""

    def __init__(self, url: str, profile: Path) -> None:
        self.url = url
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": shutil.which("chromium"),
                # As root Chromium needs --no-sandbox; a temporary profile keeps runs apart.
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    f"--user-data-dir={profile}",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1024,768",
                ],
            },
            "timeouts": {"script": int(HANG_GUARD * 1000), "pageLoad": 60_000, "implicit": 0},
        }
        session = self._send("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{session['sessionId']}"

    def _send(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=HANG_GUARD + 30) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            text = error.read().decode()
            try:
                code = str(json.loads(text)["value"]["error"])
            except (ValueError, KeyError, TypeError):
                code = ""
            raise WebDriverError(f"WebDriver {method} {path}: {error.code} {text}", code) from None

    def command(self, method: str, path: str, body: Any = None) -> Any:
        return self._send(method, self.session + path, body)

    def go(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        found = self.command("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def type_into(self, css: str, text: str) -> None:
        element = self.find(css)
        self.command("POST", f"/element/{element}/clear", {})
        self.command("POST", f"/element/{element}/value", {"text": text})

    def click(self, css: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def script(self, source: str, *args: Any) -> Any:
        return self.command("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait_until(self, css: str) -> None:
        """Until an element matches `css`: a MutationObserver in the page resolves the async script (no polling);
        the session's script timeout is the hang guard.

        The script runs in the document shown when the command comes, which may not be the one waited for: a click
        on a submit button can return before the form's navigation has begun (ChromeDriver waits only for one it
        has seen start, and Chromium starts a form's submission in a task of its own), so the script runs in the
        form's page. When the navigation replaces that document, ChromeDriver ends the script at once with a
        "script timeout" error, long before the timeout. So each run marks its document; a "script timeout" whose
        document is no longer shown is such an end, and the wait is made again in the document that replaced it
        (each turn takes a navigation: the pages waited for do not navigate by themselves). One whose document is
        still shown did time out."""
        while True:
            mark = secrets.token_hex(8)
            try:
                self.command("POST", "/execute/async", {"script": WAIT_SCRIPT, "args": [css, mark]})
                return
            except WebDriverError as failure:
                if failure.error != "script timeout" or self.script("return window.webdriverWait") == mark:
                    raise

    def quit(self) -> None:
        self._send("DELETE", self.session)


@pytest.fixture
def jobd(make_daemon: Any) -> Any:
    daemon = make_daemon(start=False)
    shutil.copy(EXAMPLE / "jobd" / "jobd.d" / "10-thumbnails.toml", daemon.config_dir / "jobd.d")
    shutil.copytree(EXAMPLE / "jobd" / "workflows", daemon.config_dir / "workflows")
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    (daemon.config_dir / "jobd.d" / "90-test.toml").write_text(
        f'[http]\nlisten = "127.0.0.1:0"\n\n[http.tokens.web-demo]\ntoken_sha256 = "{digest}"\n'
    )
    daemon.start()
    return daemon


@pytest.fixture
def page(jobd: Any, tmp_path: Path) -> Iterator[str]:
    """php -S serving the example, talking to `jobd` with the token; its base URL."""
    assert shutil.which("php"), "php-cli is missing (make test installs it)"
    sessions = tmp_path / "php-sessions"
    sessions.mkdir()
    host, port = address(jobd)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "JOBD_HTTP": f"tcp://{host}:{port}",
        "JOBD_TOKEN": TOKEN,
        "PHP_CLI_SERVER_WORKERS": "4",  # events.php holds one for as long as the page watches
    }
    web_port = free_port()
    php = Process(
        ["php", "-d", f"session.save_path={sessions}", "-S", f"127.0.0.1:{web_port}", "-t", str(EXAMPLE / "public")],
        env=env,
    )
    slowed: list[subprocess.Popen[str]] = []
    try:
        php.wait_for(r"Development Server \(.*\) started")
        slowed = slow_connections(php.process.pid)
        yield f"http://127.0.0.1:{web_port}/"
    finally:
        for tracer in slowed:
            tracer.terminate()
            tracer.wait(10)
        php.stop()
        print(php.output())  # shown by pytest when the test failed


# PHP's every connection to jobd waits this long first (µs): as long as a step's two quarters, and more.
SLOW_CONNECT = 1_500_000


def slow_connections(php: int) -> list[subprocess.Popen[str]]:
    """strace on php -S and each of its workers, holding every connect(2) they make (to jobd) SLOW_CONNECT first:
    the page is certain to subscribe after the first step is half done, and to read a new task's tree after the
    step has gone on, as a loaded machine would have it at times."""
    workers = Path(f"/proc/{php}/task/{php}/children").read_text().split()
    tracers = []
    for pid in [str(php), *workers]:
        tracer = subprocess.Popen(
            [
                "strace",
                "-o",
                "/dev/null",
                "-e",
                "trace=connect",
                "-e",
                f"inject=connect:delay_enter={SLOW_CONNECT}",
                "-p",
                pid,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        tracers.append(tracer)
        assert tracer.stderr is not None and "attached" in tracer.stderr.readline()  # tracing from here on
    return tracers


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    assert shutil.which("chromium") and shutil.which("chromedriver"), "chromium or chromium-driver is missing"
    port = free_port()
    driver = Process(["chromedriver", f"--port={port}"])
    driver_ = None
    try:
        driver.wait_for(r"ChromeDriver was started successfully")
        driver_ = WebDriver(f"http://127.0.0.1:{port}", tmp_path / "chromium-profile")
        yield driver_
    finally:
        try:
            if driver_ is not None:
                driver_.quit()
        finally:
            driver.stop()


def tree_tasks(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [task for job in jobs for task in [*job["tasks"], *tree_tasks(job["subjobs"])]]


def test_the_page_launches_a_workflow_and_shows_its_progress(jobd: Any, page: str, browser: WebDriver) -> None:
    browser.go(page)
    browser.type_into("#image", "cat.png")
    browser.type_into("#pace", PACE)
    # A first connection to GET /events gets live events only: a step reaching 50 % before events.php subscribed
    # (the browser, PHP and the redirect taking more than two PACEs on a loaded machine) was never shown. The queue
    # holds the first step until the page's first note, the snapshot events.php reads after subscribing.
    jobd.call("queue.pause", {"name": "thumbnails"})
    browser.click("#submit")
    # Or the page's error (index.php could not launch: jobd refused, or did not answer within the PHP client's
    # 10 s): said at once, with the page's words, rather than as a script timeout two minutes later.
    browser.wait_until("#events li, #error")
    assert browser.script("return document.getElementById('error')?.textContent ?? null") is None
    assert browser.script("return document.querySelector('#events li').textContent") == "snapshot: EXECUTING"
    jobd.call("queue.resume", {"name": "thumbnails"})
    browser.wait_until('#instance[data-finished="yes"], #error')
    assert browser.script("return document.getElementById('error')?.textContent ?? null") is None

    url = browser.command("GET", "/url")
    instance_id = int(re.search(r"[?&]instance=(\d+)", url).group(1))  # type: ignore[union-attr]
    got = jobd.call("instance.get", {"id": instance_id})
    assert got["status"] == "TERMINATED" and got["errors"] == 0
    assert got["parameters"] == {"image": "cat.png", "pace": PACE}

    shown = browser.script(
        """
        const section = document.getElementById('instance');
        return {
            status: document.getElementById('status').dataset.status,
            text: document.getElementById('status').textContent,
            progress: section.dataset.progress,
            errors: section.dataset.errors,
            steps: [...document.querySelectorAll('#steps tr')].map((row) => ({
                evqid: Number(row.dataset.evqid),
                name: row.querySelector('.name').textContent,
                status: row.querySelector('.status').textContent,
                progression: Number(row.dataset.progression),
                retval: row.querySelector('.retval').textContent,
            })),
            events: [...document.querySelectorAll('#events li')].map((item) => item.textContent),
        };
        """
    )
    assert (shown["status"], shown["text"], shown["progress"], shown["errors"]) == (
        "TERMINATED",
        "finished",
        "100",
        "0",
    )
    # The steps shown are the daemon's, in its order, as instance.get reports them at the end.
    expected = [
        {
            "evqid": task["evqid"],
            "name": task["name"],
            "status": task["status"],
            "progression": task["progression"],
            "retval": "" if task["retval"] is None else str(task["retval"]),
        }
        for task in tree_tasks(got["jobs"])
    ]
    assert shown["steps"] == expected
    assert [step["name"] for step in shown["steps"]] == [
        "download",
        "resize 64px",
        "resize 256px",
        "resize 1024px",
        "publish",
    ]
    # It got there live: each step was shown running part way, and the last event was the end.
    events = shown["events"]
    for step in ("download", "resize 64px", "resize 256px", "resize 1024px", "publish"):
        assert any(re.fullmatch(rf"#\d+ {step}: EXECUTING 50%", line) for line in events), events
    assert re.fullmatch(r"#\d+ instance TERMINATED", events[-1]), events
    ids = [int(m.group(1)) for line in events if (m := re.match(r"#(\d+) ", line))]
    assert ids == sorted(set(ids))  # in jobd's order, none twice

    # The token stays on the server: not in the page, not in what the browser can fetch.
    source = browser.command("GET", "/source")
    assert TOKEN not in source
    # And another browser (no session cookie) may not watch the instance.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{page}events.php?instance={instance_id}", timeout=30)
    assert refused.value.code == 404
