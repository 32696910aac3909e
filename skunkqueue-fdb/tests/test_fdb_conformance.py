"""The shared conformance kit on the fdb backend.

``TestFDBStandInConformance`` runs it against the STAND-IN cluster
(tests/fdb_standin), which is not FoundationDB. ``TestFDBRealClusterConformance``
runs the same tests, unchanged, against a real cluster when
``SKUNKQUEUE_FDB_CLUSTER_FILE`` is set (``make test-fdb-real``).
"""

from __future__ import annotations

import functools
from typing import Any

import fdb_servers as servers
import pytest

from skunkqueue.testing import BackendUnderTest, ConformanceSuite
from skunkqueue.testing.kit import AppTransactions


class FdbTransactions(AppTransactions):
    """An application on the fdb bindings: a transaction it resets for each unit of work, and rows
    of its own in a subspace beside the queue's (``(root, "app", scope, tag)``)."""

    def __init__(self, cluster_file: str, root: str) -> None:
        self.cluster_file = cluster_file
        self.root = root

    def _db(self) -> Any:
        import fdb

        if not fdb.is_api_version_selected():
            fdb.api_version(710)  # skunkqueue_fdb's
        return fdb.open(self.cluster_file)

    def open(self) -> Any:
        return self._db().create_transaction()

    def begin(self, handle: Any) -> None:
        handle.reset()

    def add_row(self, handle: Any, scope: str, tag: str) -> None:
        import fdb

        handle[fdb.Subspace((self.root, "app", scope)).pack((tag,))] = b""

    def commit(self, handle: Any) -> None:
        handle.commit().wait()

    def rollback(self, handle: Any) -> None:
        handle.reset()

    def close(self, handle: Any) -> None:
        handle.reset()

    def rows(self, scope: str) -> list[str]:
        import fdb

        space = fdb.Subspace((self.root, "app", scope))
        tr = self._db().create_transaction()
        return sorted(space.unpack(kv.key)[0] for kv in tr.get_range(space.range().start, space.range().stop))


def _backend(cluster_file: str, root: str, env: dict[str, str], label: str) -> BackendUnderTest:
    return BackendUnderTest(name="fdb", url=cluster_file, db=root, env=env, label=label,
                            transactions=FdbTransactions(cluster_file, root),
                            inject_foreign=functools.partial(servers.write_foreign_entries, cluster_file, root),
                            misfile=functools.partial(servers.misfile, cluster_file, root))


class TestFDBStandInConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, standin_cluster: Any, fdb_root: str) -> BackendUnderTest:
        return _backend(standin_cluster.cluster_file, fdb_root, servers.standin_env(), servers.STANDIN_LABEL)

    def test_really_runs_on_the_standin(self, backend: BackendUnderTest) -> None:
        import fdb

        assert getattr(fdb, "STANDIN", False), "the stand-in must shadow the fdb bindings here"
        assert "stand-in" in backend.label and backend.env["PYTHONPATH"].split(":")[0].endswith("standin")


class TestFDBRealClusterConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, real_cluster_file: str, fdb_root: str) -> BackendUnderTest:
        return _backend(real_cluster_file, fdb_root, {}, "fdb (real FoundationDB cluster)")
