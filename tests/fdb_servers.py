"""The FoundationDB STAND-IN server for tests (not a real FoundationDB), and how to point code at it.

Used by skunkqueue-fdb/tests, tests/reliability and the benchmarks. A
real cluster is used instead when ``SKUNKQUEUE_FDB_CLUSTER_FILE`` is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

STANDIN_DIR = Path(__file__).resolve().parent / "fdb_standin"
REAL_CLUSTER_FILE = os.environ.get("SKUNKQUEUE_FDB_CLUSTER_FILE") or None
STANDIN_LABEL = "fdb (stand-in, not a real FoundationDB)"
NOTICE = ("FoundationDB backend tests run against a STAND-IN (tests/fdb_standin), not a real "
          "FoundationDB; set SKUNKQUEUE_FDB_CLUSTER_FILE to run them against a real cluster.")


def activate_standin() -> None:
    """Make ``import fdb`` in this process load the stand-in instead of the real bindings."""
    loaded = sys.modules.get("fdb")
    if loaded is not None and not getattr(loaded, "STANDIN", False):
        raise RuntimeError("the real fdb bindings were imported before the stand-in could shadow them")
    if str(STANDIN_DIR) not in sys.path:
        sys.path.insert(0, str(STANDIN_DIR))


def standin_env() -> dict[str, str]:
    """Environment for child processes (``skunq work``) so that they load the stand-in too."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(STANDIN_DIR) + (os.pathsep + path if path else "")}


class StandInCluster:
    """A stand-in server process and the cluster file that points at it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cluster_file = str(workdir / "fdb.cluster")
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> StandInCluster:
        self.process = subprocess.Popen([sys.executable, str(STANDIN_DIR / "standin_server.py")],
                                        stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the fdb stand-in server did not start (said {line!r})")
        self.port = int(line)
        # The real cluster-file format; the stand-in client connects to the first coordinator.
        Path(self.cluster_file).write_text(f"standin:{uuid.uuid4().hex[:8]}@127.0.0.1:{self.port}\n")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


def misfile(cluster_file: str, root: str, queue: str, job_id: str, to_queue: str, route: str,
            target: str | None) -> None:
    """Move a pending record to ``to_queue``'s due index for ``route``/``target``; its fields stay
    as they are. What a store writer could do (key layout: skunkqueue_fdb.persistence)."""
    import fdb

    source, dest = fdb.Subspace((root, queue)), fdb.Subspace((root, to_queue))

    @fdb.transactional
    def move(tr: Any) -> None:
        slot = tr[source["job"].pack((job_id, "slot"))]
        assert slot.present(), f"{job_id} is not pending"
        _route, _target, due, stamp, _id = source["due"].unpack(bytes(slot))
        del tr[bytes(slot)]
        span = source["job"].range((job_id,))
        for kv in list(tr.get_range(span.start, span.stop)):
            del tr[kv.key]
            tr[dest["job"].pack(source["job"].unpack(kv.key))] = kv.value
        moved = dest["due"].pack((route, target or "", due, stamp, job_id))
        tr[moved] = b""
        tr[dest["job"].pack((job_id, "slot"))] = moved
        if target:
            tr.add(dest["nudge"].pack((target,)), (1).to_bytes(8, "little"))

    move(fdb.open(cluster_file))


def write_foreign_entries(cluster_file: str, root: str, queue: str, route: str) -> int:
    """Leave what another program could leave where a route's jobs live; return how many due entries.

    A record whose fields are not JSON (indexed as due), a due entry for a
    record that does not exist, and a key in the jobs subspace that is not a
    tuple. Key layout: skunkqueue_fdb.persistence.
    """
    import fdb
    import fdb.tuple

    space = fdb.Subspace((root, queue))
    stamp = fdb.tuple.Versionstamp(b"\x00" * 10)
    garbage = space["due"].pack((route, "", time.time() - 1, stamp, "foreign-garbage"))
    missing = space["due"].pack((route, "", time.time() - 1, stamp, "foreign-missing"))

    @fdb.transactional
    def write(tr: Any) -> None:
        tr[space["job"].pack(("foreign-garbage", "meta"))] = b"not json"
        tr[space["job"].pack(("foreign-garbage", "slot"))] = garbage
        tr[garbage] = b""
        tr[missing] = b""
        tr[space["job"].key() + b"\xfe not a tuple"] = b"?"

    write(fdb.open(cluster_file))
    return 2
