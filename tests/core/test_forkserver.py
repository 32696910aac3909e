"""Workers forked from the pool's fork server are what fresh interpreters would be.

``skunq work`` forks its workers from a server it forked at start, before it imported a job
module (skunkqueue/pool/forkserver.py). These tests run the same probe job in pools whose
workers start both ways (``SKUNQ_WORKER_START=spawn`` is a fresh interpreter per worker) and
compare what the job sees; every import of the job module leaves a line in a file outside the
queue. Then the hostile cases: the server killed, the pool killed, the whole group signalled,
orphans the pool adopts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE
from skunkqueue.testing.suite_support import make_record, wait_until
from skunkqueue.testing.workers import FORK_SERVER_NAME, process_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")

SKUNQ = str(Path(sys.executable).with_name("skunq"))

PROBE = textwrap.dedent("""
    import json, os, random, signal, sys, threading

    with open(os.environ["PROBE_LOADS"], "a") as fh:  # every import of this module, outside the queue
        fh.write(f"{os.getpid()}\\n")
    SEEN = []
    from skunkqueue import SkunkQueue
    queue = SkunkQueue("probe", conn_url=os.environ["PROBE_DB"])

    def _handler(sig):
        h = signal.getsignal(sig)
        return {signal.SIG_DFL: "default", signal.SIG_IGN: "ignore"}.get(h, getattr(h, "__qualname__", repr(h)))

    def _fd(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return "gone"
        return target.split(":")[0] if ":" in target else target

    @queue.event(routes=["r"])
    def describe(pause=0.0):
        SEEN.append(1)
        import time
        time.sleep(pause)
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
        return json.dumps({
            "signals": {str(s): _handler(s) for s in sorted(signal.valid_signals())
                        if s not in (signal.SIGKILL, signal.SIGSTOP)},
            "fds": sorted(_fd(fd) for fd in fds),
            "threads": sorted(t.name for t in threading.enumerate()),
            "path": sys.path, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": os.environ.get("PROBE_ENV"),
            "seen": len(SEEN), "random": random.random(), "pid": os.getpid(), "ppid": os.getppid(),
            "pgid": os.getpgid(0), "main": "probe_jobs" in sys.modules,
        })

    @queue.event(routes=["r"])
    def orphan():
        # A grandchild whose parent exits at once: the pool, a subreaper, adopts it.
        if os.fork() == 0:
            if os.fork() == 0:
                import time
                time.sleep(0.2)
            os._exit(0)
        return os.getpid()
""")


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "probe_jobs.py").write_text(PROBE)
    return folder


def run_burst(tmp_path: Path, jobs_dir: Path, start: str, func: str, count: int,
              extra: tuple[str, ...] = (), payload: str = "[[], {}]") -> list[dict[str, Any]]:
    """Enqueue ``count`` jobs and run ``skunq work --burst`` until they are done; their results."""
    db = tmp_path / f"{start}.db"
    store = SQLitePersistence("probe", url=str(db))
    records = [make_record("probe", func=f"probe_jobs:{func}", payload=payload.encode()) for _ in range(count)]
    store.enqueue(records)
    env = {**os.environ, "SKUNQ_WORKER_START": start, "PROBE_ENV": "set", "PROBE_DB": str(db),
           "PROBE_LOADS": str(tmp_path / "loads"), "SKUNQ_IMPORT": ""}
    log = tmp_path / f"{start}.log"
    try:
        with open(log, "wb") as out:
            pool = subprocess.run([SKUNQ, "work", "-q", "probe", "-r", "r", "--url", str(db), "--burst",
                                   "--path", str(jobs_dir), "--import", "probe_jobs", *extra],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120)
        found = [store.get(r.id) for r in records]
    finally:
        store.close()
    assert pool.returncode == 0, log.read_text()
    assert all(r is not None and r.state == COMPLETE for r in found), log.read_text()
    # The two runs' files differ by name only (fork.db, spawn.db).
    return [json.loads(json.loads(r.result).replace(f"/{start}.", "/RUN.")) for r in found
            if r is not None and r.result is not None]


def test_a_forked_worker_sees_what_a_fresh_interpreter_sees(tmp_path: Path, jobs_dir: Path) -> None:
    fresh = run_burst(tmp_path, jobs_dir, "spawn", "describe", 2, ("--max-jobs-per-child", "1"))
    forked = run_burst(tmp_path, jobs_dir, "fork", "describe", 2, ("--max-jobs-per-child", "1"))
    same = ("signals", "fds", "threads", "path", "argv0", "cwd", "env", "seen", "main")
    for one in fresh + forked:
        assert one["seen"] == 1 and one["env"] == "set"
    for k in same:
        assert [one[k] for one in forked] == [one[k] for one in fresh], k
    # Its own random state, its own pid; the pool's child, in the pool's process group.
    assert forked[0]["random"] != forked[1]["random"]
    assert forked[0]["pid"] != forked[1]["pid"]
    assert forked[0]["ppid"] == forked[1]["ppid"] and forked[0]["pgid"] == forked[1]["pgid"]
    # The job module was imported by each pool at start and by each worker, never by a server
    # or passed down: two pools and six workers (two jobs and the one that found none each).
    loads = (tmp_path / "loads").read_text().split()
    assert len(loads) == 8 and len(set(loads)) == 8, loads


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class Pool:
    """A ``skunq work`` pool of two workers on SQLite, its jobs from probe_jobs."""

    def __init__(self, tmp_path: Path, jobs_dir: Path, *extra: str) -> None:
        self.db = tmp_path / "pool.db"
        self.log = tmp_path / "pool.log"
        env = {**os.environ, "PROBE_LOADS": str(tmp_path / "loads"), "SKUNQ_IMPORT": "", "PROBE_DB": str(self.db)}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [SKUNQ, "work", "-q", "probe", "-r", "r", "--url", str(self.db), "--concurrency", "2",
                 "--path", str(jobs_dir), "--import", "probe_jobs", *extra],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.store = SQLitePersistence("probe", url=str(self.db))

    def server(self) -> int | None:
        return next((p for p in _children(self.process.pid) if process_name(p) == FORK_SERVER_NAME), None)

    def workers(self) -> list[int]:
        return [p for p in _children(self.process.pid) if process_name(p) != FORK_SERVER_NAME]

    def registered(self, but: Sequence[int] = ()) -> int:
        """How many of its live workers, but those in ``but``, have registered."""
        alive = set(self.workers()) - set(but)
        return len([w for w in self.store.workers() if w.pid in alive])

    def run(self, func: str, count: int = 1) -> list[Any]:
        records = [make_record("probe", func=f"probe_jobs:{func}", payload=b"[[], {}]") for _ in range(count)]
        self.store.enqueue(records)
        wait_until(lambda: all((r := self.store.get(x.id)) is not None and r.state == COMPLETE for x in records)
                   or self.process.poll() is not None, timeout=60, what="the jobs to complete")
        done = [self.store.get(r.id) for r in records]
        assert all(r is not None and r.state == COMPLETE for r in done), self.log.read_text()
        return [json.loads(r.result) for r in done if r is not None and r.result is not None]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.store.close()


@pytest.fixture
def pool(tmp_path: Path, jobs_dir: Path) -> Any:
    started = Pool(tmp_path, jobs_dir)
    wait_until(lambda: started.registered() == 2 or started.process.poll() is not None, timeout=60,
               what="two workers registered")
    assert started.server() is not None and len(started.workers()) == 2
    yield started
    started.close()


def test_the_server_killed_leaves_workers_started_as_fresh_interpreters(pool: Pool) -> None:
    server = pool.server()
    assert server is not None
    os.kill(server, signal.SIGKILL)
    first = pool.workers()
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pool.registered(but=first) == 2, timeout=60,
               what="two new workers")
    assert pool.server() is None  # reaped
    assert len(pool.run("describe", 4)) == 4
    assert "starting workers as fresh interpreters from now on" in pool.log.read_text()
    # Fresh interpreters: the python command, not the pool's.
    assert all(b"skunkqueue.worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pool.workers())


def test_a_pool_killed_takes_its_workers_and_server_with_it(pool: Pool) -> None:
    everyone = [pool.process.pid, *_children(pool.process.pid)]
    assert len(everyone) == 4
    pool.process.kill()
    pool.process.wait(10)
    wait_until(lambda: all(_state(pid) in ("gone", "Z") for pid in everyone), timeout=10,
               what="the workers and the fork server to die with the pool")


def test_signals_to_the_whole_group_stop_the_pool_gently_and_the_server_with_it(pool: Pool) -> None:
    server = pool.server()
    assert server is not None
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        # The server ignores what a terminal sends the group; the pool decides for its workers.
        os.kill(server, sig)
    time.sleep(0.3)
    assert pool.server() == server and _state(server) != "Z"
    for pid in pool.workers():
        os.kill(pid, signal.SIGKILL)
    assert len(pool.run("describe", 2)) == 2  # and it still forks them
    assert all(b"skunkqueue.worker_main" not in Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid in pool.workers())
    os.killpg(pool.process.pid, signal.SIGTERM)
    assert pool.process.wait(30) == 0, pool.log.read_text()
    wait_until(lambda: _state(server) == "gone", timeout=10, what="the fork server to exit")


def test_workers_restarted_after_the_group_was_stopped_and_continued_still_fork(pool: Pool) -> None:
    server = pool.server()
    os.killpg(pool.process.pid, signal.SIGSTOP)
    time.sleep(0.2)
    os.killpg(pool.process.pid, signal.SIGCONT)
    for pid in pool.workers():
        os.kill(pid, signal.SIGKILL)
    assert len(pool.run("describe", 4)) == 4
    assert pool.server() == server  # still there, and still the one the workers come from
    assert all(b"skunkqueue.worker_main" not in Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid in pool.workers())


def test_orphans_the_pool_adopts_are_reaped(pool: Pool) -> None:
    pool.run("orphan", 6)
    time.sleep(0.5)  # each orphan lives 0.2 s, then is the pool's zombie until reaped

    def zombies() -> list[int]:
        return [p for p in _children(pool.process.pid) if _state(p) == "Z"]

    wait_until(lambda: not zombies(), timeout=15, what="the pool to reap the orphans it adopted")
    assert len(pool.workers()) == 2


def test_a_stopped_server_does_not_hold_the_pool(pool: Pool) -> None:
    server = pool.server()
    assert server is not None
    os.kill(server, signal.SIGSTOP)  # alone, not the group: the pool runs on and must not wait on it
    first = pool.workers()
    os.kill(first[0], signal.SIGKILL)
    started = time.monotonic()
    wait_until(lambda: pool.registered(but=first[:1]) == 2, timeout=30,
               what="the killed worker's replacement")
    assert time.monotonic() - started < 5  # a 0.5 s back-off, then a fresh interpreter's start
    assert "the fork server is stopped" in pool.log.read_text()
    wait_until(lambda: _state(server) == "gone", timeout=10, what="the stopped server killed and reaped")
    assert len(pool.run("describe", 2)) == 2
