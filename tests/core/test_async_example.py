"""examples/async_app.py end to end: uvicorn serving it, a real worker pool, concurrent requests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from skunkqueue.testing.kit import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytest.importorskip("starlette", reason="the example needs starlette (installed with skunkqueue-web)")
pytest.importorskip("uvicorn", reason="the example needs uvicorn (installed with skunkqueue-web)")


def test_the_async_endpoint_fires_and_awaits_while_serving_others(tmp_path: Path) -> None:
    env = {**__import__("os").environ, "SKUNQ_SQLITE_PATH": str(tmp_path / "q.db")}
    pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", "async-demo", "-r", "math",
                             "--import", "async_app", "--async-concurrency", "20"],
                            cwd=EXAMPLES, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "async_app:app", "--port", str(port),
                               "--log-level", "warning"], cwd=EXAMPLES, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base}/add?a=x", timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 400
                break
            except OSError:
                assert time.monotonic() < deadline, "the example server did not start"
                time.sleep(0.1)

        def ask(i: int) -> dict[str, object]:
            with urllib.request.urlopen(f"{base}/add?a={i}&b=1", timeout=30) as reply:
                return dict(json.loads(reply.read()))

        with ThreadPoolExecutor(20) as requests:
            answers = list(requests.map(ask, range(20)))
        assert [a["result"] for a in answers] == [i + 1 for i in range(20)]
        assert len({a["job"] for a in answers}) == 20
    finally:
        server.terminate()
        pool.terminate()
        server.wait(10)
        pool.wait(20)
