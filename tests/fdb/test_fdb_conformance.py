"""The shared conformance kit on the fdb backend.

``TestFDBStandInConformance`` runs it against the STAND-IN cluster
(tests/fdb/standin), which is not FoundationDB. ``TestFDBRealClusterConformance``
runs the same tests, unchanged, against a real cluster when
``SKUNKQUEUE_FDB_CLUSTER_FILE`` is set (``make test-fdb-real``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest

from skunkqueue.testing import BackendUnderTest, ConformanceSuite

STANDIN_LABEL = "fdb (stand-in, not a real FoundationDB)"


def _inject_foreign(cluster_file: str, root: str) -> Callable[[str, str], None]:
    def inject(queue: str, route: str) -> None:
        # What another program could leave where the route's jobs live: due
        # entries for a record whose fields are not JSON and for one that does
        # not exist, and a key in the jobs subspace that is not a tuple.
        import fdb
        import fdb.tuple

        space = fdb.Subspace((root, queue))
        db = fdb.open(cluster_file)
        stamp = fdb.tuple.Versionstamp(b"\x00" * 10)
        garbage = space["due"].pack((route, "", time.time() - 1, stamp, "foreign-garbage"))
        missing = space["due"].pack((route, "", time.time() - 1, stamp, "foreign-missing"))

        @fdb.transactional
        def write(tr: Any) -> None:
            tr[space["job"].pack(("foreign-garbage", "meta"))] = b"not json"
            tr[garbage] = b""
            tr[missing] = b""
            tr[space["job"].key() + b"\xfe not a tuple"] = b"?"

        write(db)

    return inject


def _backend(cluster_file: str, root: str, env: dict[str, str], label: str) -> BackendUnderTest:
    return BackendUnderTest(name="fdb", url=cluster_file, db=root, env=env, label=label,
                            inject_foreign=_inject_foreign(cluster_file, root))


class TestFDBStandInConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, standin_cluster: Any, fdb_root: str) -> BackendUnderTest:
        from skunkqueue_tests_fdb_servers import standin_env  # type: ignore[import-not-found]

        return _backend(standin_cluster.cluster_file, fdb_root, standin_env(), STANDIN_LABEL)

    def test_really_runs_on_the_standin(self, backend: BackendUnderTest) -> None:
        import fdb

        assert getattr(fdb, "STANDIN", False), "the stand-in must shadow the fdb bindings here"
        assert "stand-in" in backend.label and backend.env["PYTHONPATH"].split(":")[0].endswith("standin")


class TestFDBRealClusterConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, real_cluster_file: str, fdb_root: str) -> BackendUnderTest:
        return _backend(real_cluster_file, fdb_root, {}, "fdb (real FoundationDB cluster)")
