"""Fixtures for the monitor's tests: real `skunq web` and `skunq work` processes, a real Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import postgres_servers
import pytest
import redis_servers

from skunkqueue.testing.kit import free_port

HERE = Path(__file__).resolve().parent
SKUNQ = [sys.executable, "-m", "skunkqueue.cli"]
CHROMIUM = "/usr/bin/chromium"

@dataclass
class Store:
    """Where a test's queue lives; ``env`` points `skunq` and tests/web/webjobs.py at it."""

    backend: str
    url: str
    queue: str
    runs: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "SKUNQ_BACKEND": self.backend, "SKUNQ_URL": self.url, "SKUNQ_QUEUE": self.queue,
                    "WEBTEST_QUEUE": self.queue, "WEBTEST_RUNS": str(self.runs),
                    "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}

    def queue_handle(self) -> Any:
        from skunkqueue import SkunkQueue
        return SkunkQueue(self.queue, backend=self.backend, conn_url=self.url)

    def job(self, name: str, retries: int = 0, **options: Any) -> Any:
        """``webjobs.<name>`` declared on this store's queue, to fire from the test process."""
        import webjobs

        from skunkqueue.job import Job
        return Job(self.queue_handle(), getattr(webjobs, name).func, ["fast"], retries=retries, **options)

    def runs_of(self, name: str) -> int:
        if not self.runs.exists():
            return 0
        return sum(1 for line in self.runs.read_text().splitlines() if line.split()[0] == name)


@dataclass
class Web:
    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        return request(self.base + path, headers=headers)

    def post(self, path: str, data: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, str]:
        from urllib.parse import urlencode
        body = urlencode(data or {}).encode()
        return request(self.base + path, body, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                         **(headers or {})})


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = postgres_servers.PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.destroy()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    queue = f"web{time.time_ns() % 10**9}"
    if request.param == "sqlite":
        return Store("sqlite", str(tmp_path / "queue.db"), queue, tmp_path / "runs.txt")
    server = request.getfixturevalue(f"{request.param}_server")
    return Store(request.param, server.url, queue, tmp_path / "runs.txt")


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    return Store("sqlite", str(tmp_path / "queue.db"), f"web{time.time_ns() % 10**9}", tmp_path / "runs.txt")


@pytest.fixture
def start_web(tmp_path: Path) -> Iterator[Callable[..., Web]]:
    started: list[Web] = []

    def start(store: Store, *extra: str, token: str | None = None) -> Web:
        port = free_port()
        log = tmp_path / f"web-{port}.log"
        env = dict(store.env)
        env.pop("SKUNQ_WEB_TOKEN", None)
        if token:
            env["SKUNQ_WEB_TOKEN"] = token
        process = subprocess.Popen([*SKUNQ, "web", "--port", str(port), "--refresh", "0.5", *extra], env=env,
                                   stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
        web = Web(process, port, log)
        started.append(web)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"skunq web exited: {log.read_text()}")
            try:
                if web.get("/metrics")[0] == 200:
                    return web
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"skunq web did not answer: {log.read_text()}")

    yield start
    for web in started:
        _stop(web.process)


@pytest.fixture
def start_pool(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    pools: list[subprocess.Popen[str]] = []

    def start(store: Store, *extra: str) -> subprocess.Popen[str]:
        log = open(tmp_path / f"pool-{len(pools)}.log", "w")
        pool = subprocess.Popen([*SKUNQ, "work", "-r", "fast", "--path", str(HERE), *extra], env=store.env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        _stop(pool)


# Per module, not per session: Playwright's sync API keeps an asyncio loop running in this
# thread while it is started, so every later test that calls asyncio.run (the kit's async
# producer tests, in the backends' folders) would fail until the session ended.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: `make servers` installs Debian's chromium")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    # A dialog nobody expected (an injected alert) fails the test that opened the page.
    # Confirmation dialogs are accepted and recorded; any other dialog (an injected alert) is recorded
    # and dismissed, so a test can assert that none appeared.
    pg.dialogs = []

    def on_dialog(dialog: Any) -> None:
        pg.dialogs.append((dialog.type, dialog.message))
        dialog.accept() if dialog.type == "confirm" else dialog.dismiss()

    pg.on("dialog", on_dialog)
    yield pg
    context.close()


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screens" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("SKUNQ_WEB_SCREENS")  # copy them out for the README or a person to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path
