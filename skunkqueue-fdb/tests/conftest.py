"""FoundationDB backend tests: a stand-in cluster by default, a real one if asked for.

Without ``SKUNKQUEUE_FDB_CLUSTER_FILE`` this process (and every worker it
starts) imports the STAND-IN ``fdb`` package; with it, the real bindings and
the given cluster. One process cannot hold both, so the other kind of test
class is skipped.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import fdb_servers as servers
import pytest

if servers.REAL_CLUSTER_FILE is None:
    servers.activate_standin()


def pytest_report_header(config: pytest.Config) -> str:
    if servers.REAL_CLUSTER_FILE:
        return f"fdb: real FoundationDB cluster {servers.REAL_CLUSTER_FILE}"
    return servers.NOTICE


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"fdb: real FoundationDB cluster {servers.REAL_CLUSTER_FILE}" if servers.REAL_CLUSTER_FILE
        else servers.NOTICE)


@pytest.fixture(scope="session")
def standin_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if servers.REAL_CLUSTER_FILE:
        pytest.skip("SKUNKQUEUE_FDB_CLUSTER_FILE is set: this run uses the real fdb bindings, not the stand-in")
    cluster = servers.StandInCluster(tmp_path_factory.mktemp("fdb-standin")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def faults(standin_cluster: Any) -> Iterator[Any]:
    """The stand-in's fault switches (commit_unknown_result, timeouts, latency...), reset around each test."""
    from fdb.standin_faults import FAULTS

    FAULTS.reset()
    yield FAULTS
    FAULTS.reset()


@pytest.fixture(scope="session")
def real_cluster_file() -> Iterator[str]:
    if not servers.REAL_CLUSTER_FILE:
        pytest.skip("no real FoundationDB cluster: set SKUNKQUEUE_FDB_CLUSTER_FILE to its cluster file")
    yield servers.REAL_CLUSTER_FILE


@pytest.fixture(scope="session")
def fdb_root() -> Iterator[str]:
    """A root name of our own, so a real cluster's other data is never touched; cleared afterwards."""
    root = f"skunkqueue-test-{uuid.uuid4().hex[:8]}"
    yield root
    if servers.REAL_CLUSTER_FILE:
        import fdb

        try:
            if not fdb.is_api_version_selected():
                fdb.api_version(710)
        except Exception:  # no client library: then nothing was written either
            return
        db = fdb.open(servers.REAL_CLUSTER_FILE)
        del db[fdb.Subspace((root,)).range()]
