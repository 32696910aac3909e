"""Fixtures of the reliability suite: every test runs once per available backend.

``target`` is parametrized over the backends in :mod:`reliability_backends`.
A backend whose distribution is not installed is skipped with a reason naming
the distribution; once it is installed, its server must start (no skip).

Tests report their figures (jobs fired, lost, duplicate executions, restarts
survived, bad inputs tried) through the ``figures`` fixture; at the end of the
session they are merged into ``reliability-results.json`` at the repository
root, which ``scripts/reliability_report.py`` renders.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reliability_backends import BACKENDS, Target, open_target  # noqa: E402

from skunkqueue.queue import SkunkQueue  # noqa: E402
from skunkqueue.testing.kit import BackendUnderTest  # noqa: E402
from skunkqueue.testing.workers import PoolProcess  # noqa: E402

RESULTS = Path(os.environ.get("SKUNQ_RELIABILITY_RESULTS", ROOT / "reliability-results.json"))
JOBS_DIR = str(HERE)

# {backend label: {figure name: {number: value}}} gathered during this session.
_figures: dict[str, dict[str, dict[str, Any]]] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _figures:
        return
    # Under pytest-xdist every worker merges its own figures: one at a time, or one's would be lost.
    with open(RESULTS.with_name(RESULTS.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_figures()


def _merge_figures() -> None:
    try:
        data = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        data = {}
    backends = data.setdefault("backends", {})
    for label, tests in _figures.items():
        entry = backends.setdefault(label, {"tests": {}})
        entry.setdefault("tests", {}).update(tests)
        entry["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session", params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with open_target(request.param, tmp_path_factory) as opened:
        yield opened


@pytest.fixture
def backend(target: Target) -> BackendUnderTest:
    return target.backend


class Figures:
    """What a test reports for docs/reliability.md (see scripts/reliability_report.py)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def record(self, name: str, **numbers: Any) -> None:
        _figures.setdefault(self.label, {})[name] = {**numbers, "at": time.strftime("%Y-%m-%d %H:%M:%S")}


@pytest.fixture
def figures(target: Target) -> Figures:
    return Figures(target.label)


@pytest.fixture
def queue_name(backend: BackendUnderTest) -> str:
    return backend.new_queue_name().replace("kit-", "rel-")


def open_queue(backend: BackendUnderTest, name: str, **kwargs: Any) -> SkunkQueue:
    return SkunkQueue(name, backend=backend.name, conn_url=backend.url, dbname=backend.db,
                      **{**backend.options, **kwargs})


@pytest.fixture
def queue(backend: BackendUnderTest, queue_name: str) -> Iterator[SkunkQueue]:
    q = open_queue(backend, queue_name)
    yield q
    q.close()


PoolStarter = Callable[..., PoolProcess]


def pool_starter(backend: BackendUnderTest, queue_name: str, logs: Path) -> tuple[PoolStarter, list[PoolProcess]]:
    pools: list[PoolProcess] = []

    def start(routes: list[str], *, concurrency: int = 1, lease: float = 30.0, ready: bool = True,
              extra: list[str] | None = None, on: BackendUnderTest | None = None,
              new_session: bool = False, imports: list[str] | None = None) -> PoolProcess:
        pool = PoolProcess(on or backend, queue_name, routes, concurrency=concurrency, lease=lease,
                           log_path=logs / f"pool-{len(pools)}.log",
                           extra=["--path", JOBS_DIR, *(extra or [])], new_session=new_session,
                           imports=["reliability_jobs", "hostile_jobs"] if imports is None else imports)
        pools.append(pool)
        if ready:
            pool.wait_ready(60)
        return pool

    return start, pools


@pytest.fixture
def start_pool(backend: BackendUnderTest, queue_name: str, tmp_path: Path) -> Iterator[PoolStarter]:
    start, pools = pool_starter(backend, queue_name, tmp_path)
    yield start
    for pool in pools:
        pool.stop()
