"""Workers forked from the pool's fork server are what fresh interpreters would be.

``skunq work`` forks its workers from a server it forked at start, before it imported a job
module (skunkqueue/forkserver.py). These tests run the same probe job in pools whose
workers start both ways (``SKUNQ_WORKER_START=spawn`` is a fresh interpreter per worker) and
compare what the job sees; every import of the job module leaves a line in a file outside the
queue. Then the hostile cases: the server killed, the pool killed, the whole group signalled,
orphans the pool adopts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import pools
import pytest

from skunkqueue import SkunkQueue
from skunkqueue.forkserver import REPLY_TIMEOUT
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.pool.supervisor import REAP_EVERY
from skunkqueue.record import COMPLETE
from skunkqueue.testing.suite_support import make_record, wait_until
from skunkqueue.testing.workers import FORK_SERVER_NAME, process_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")

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
            "command": open("/proc/self/cmdline", "rb").read().decode(errors="replace"),
        })

    @queue.event(routes=["r"])
    def unflushed():
        # Left in buffers when the job returns: C stdio's, and Python's behind a replaced sys.stdout.
        import ctypes
        ctypes.CDLL(None).printf(b"printf-line\\n")
        sys.stdout = open(os.devnull, "w")
        sys.__stdout__.write("dunder-line\\n")
        return "done"

    @queue.event(routes=["r"])
    def spawned():
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(1) as children:
            return children.map(abs, [-9])

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
              extra: tuple[str, ...] = (), payload: str = "[[], {}]", imports: tuple[str, ...] = ("probe_jobs",),
              env: dict[str, str] | None = None, module: str = "probe_jobs") -> list[Any]:
    """Enqueue ``count`` jobs and run ``skunq work --burst`` until they are done; their results."""
    db = tmp_path / f"{start}.db"
    store = SQLitePersistence("probe", url=str(db))
    records = [make_record("probe", func=f"{module}:{func}", payload=payload.encode()) for _ in range(count)]
    store.enqueue(records)
    env = {**os.environ, **(env or {}), "SKUNQ_WORKER_START": start, "PROBE_ENV": "set", "PROBE_DB": str(db),
           "PROBE_LOADS": str(tmp_path / "loads"), "SKUNQ_IMPORT": ""}
    log = tmp_path / f"{start}.log"
    try:
        with open(log, "wb") as out:
            pool = subprocess.run([pools.SKUNQ, "work", "-q", "probe", "-r", "r", "--url", str(db), "--burst",
                                   "--path", str(jobs_dir), *(a for name in imports for a in ("--import", name)),
                                   *extra],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120)
        found = [store.get(r.id) for r in records]
    finally:
        store.close()
    assert pool.returncode == 0, log.read_text()
    assert all(r is not None and r.state == COMPLETE for r in found), log.read_text()
    return [json.loads(r.result) for r in found if r is not None and r.result is not None]


def test_a_forked_worker_sees_what_a_fresh_interpreter_sees(tmp_path: Path, jobs_dir: Path) -> None:
    fresh = run_burst(tmp_path, jobs_dir, "spawn", "describe", 2, ("--max-jobs-per-child", "1"))
    forked = run_burst(tmp_path, jobs_dir, "fork", "describe", 2, ("--max-jobs-per-child", "1"))
    same = ("signals", "fds", "threads", "path", "argv0", "cwd", "env", "seen", "main")
    # The two runs' files differ by name only (fork.db, spawn.db).
    fresh = [json.loads(one.replace("/spawn.", "/RUN.")) for one in fresh]
    forked = [json.loads(one.replace("/fork.", "/RUN.")) for one in forked]
    for one in fresh + forked:
        assert one["seen"] == 1 and one["env"] == "set"
    for k in same:
        assert [one[k] for one in forked] == [one[k] for one in fresh], k
    # SKUNQ_WORKER_START=spawn is a fresh interpreter running the worker module; the default, a fork.
    assert all("skunkqueue.worker_main" in one["command"] for one in fresh)
    assert not any("skunkqueue.worker_main" in one["command"] for one in forked)
    # Its own random state, its own pid; the pool's child, in the pool's process group.
    assert forked[0]["random"] != forked[1]["random"]
    assert forked[0]["pid"] != forked[1]["pid"]
    assert forked[0]["ppid"] == forked[1]["ppid"] and forked[0]["pgid"] == forked[1]["pgid"]
    # The job module was imported by each pool at start and by each worker, never by a server
    # or passed down: two pools and six workers (two jobs and the one that found none each).
    loads = (tmp_path / "loads").read_text().split()
    assert len(loads) == 8 and len(set(loads)) == 8, loads


def _children(pid: int) -> list[int]:
    try:  # /proc, not pgrep: fast enough to catch a process that lives a millisecond
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


NAMED_LIKE_THE_POOLS = textwrap.dedent("""
    import os
    from skunkqueue import SkunkQueue
    queue = SkunkQueue("probe", conn_url=os.environ["PROBE_DB"])

    @queue.event(routes=["r"])
    def hello():
        return __name__ + " from " + __file__
""")


@pytest.mark.parametrize("name", ["click", "cronsim", "decimal"])
def test_a_job_module_named_like_one_the_pool_imports_is_found_in_bare_mode(tmp_path: Path, name: str) -> None:
    # The pool imports click (and the scheduler's cronsim...); a fresh worker does not, so a bare-mode
    # job module of that name is found under --path. A forked worker must not hold the pool's.
    folder = tmp_path / "named"
    folder.mkdir()
    (folder / f"{name}.py").write_text(NAMED_LIKE_THE_POOLS)
    results = run_burst(tmp_path, folder, "fork", "hello", 1, imports=(), module=name)
    assert results == [f"{name} from {folder / (name + '.py')}"]


def test_output_a_job_leaves_in_buffers_reaches_the_log(tmp_path: Path, jobs_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as by default
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONUNBUFFERED", raising=False)
        run_burst(tmp_path, jobs_dir, "fork", "unflushed", 1, ("--max-jobs-per-child", "1"), env=env)
    log = (tmp_path / "fork.log").read_text()
    assert "printf-line" in log and "dunder-line" in log, log


def test_a_job_using_multiprocessing_spawn_runs(tmp_path: Path, jobs_dir: Path) -> None:
    # A spawned child re-imports __main__ when it has a file: a forked worker's is the -c program's.
    assert run_burst(tmp_path, jobs_dir, "fork", "spawned", 1) == [[9]]


class Pool:
    """A ``skunq work`` pool of two workers on SQLite, its jobs from probe_jobs."""

    def __init__(self, tmp_path: Path, jobs_dir: Path, *extra: str) -> None:
        self.db = tmp_path / "pool.db"
        self.log = tmp_path / "pool.log"
        env = {**os.environ, "PROBE_LOADS": str(tmp_path / "loads"), "SKUNQ_IMPORT": "", "PROBE_DB": str(self.db)}
        self.process = pools.start(["-q", "probe", "-r", "r", "--url", str(self.db), "--concurrency", "2",
                                    "--path", str(jobs_dir), "--import", "probe_jobs", *extra],
                                   cwd=tmp_path, env=env, log=self.log)
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
        pools.kill_group(self.process)
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


SHADOW = textwrap.dedent("""
    # The standard library's textwrap, under this folder's name: a file left in the folder a pool starts in.
    import importlib.machinery, os, sys
    with open(os.environ["PROBE_SHADOW"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    _here = os.path.dirname(os.path.abspath(__file__))
    _real = importlib.machinery.PathFinder.find_spec(
        "textwrap", [p for p in sys.path if os.path.abspath(p or ".") != _here]).origin
    with open(_real) as _source:
        exec(compile(_source.read(), _real, "exec"))
""")


def test_a_pool_that_imported_a_module_from_its_folder_forks_no_worker(tmp_path: Path, jobs_dir: Path) -> None:
    # `python -m skunkqueue.command work` puts the working directory first on the path, so the pool
    # itself imports the textwrap.py lying there. A fresh worker would not: the server must not carry it.
    (tmp_path / "textwrap.py").write_text(SHADOW)
    (jobs_dir / "which_textwrap.py").write_text(textwrap.dedent("""
        import os, textwrap
        from skunkqueue import SkunkQueue
        queue = SkunkQueue("probe", conn_url=os.environ["PROBE_DB"])

        @queue.event(routes=["r"])
        def where():
            return textwrap.__file__
    """))
    db = tmp_path / "shadow.db"
    store = SQLitePersistence("probe", url=str(db))
    record = make_record("probe", func="which_textwrap:where", payload=b"[[], {}]")
    store.enqueue([record])
    env = {**os.environ, "PROBE_DB": str(db), "PROBE_SHADOW": str(tmp_path / "shadowed"), "SKUNQ_IMPORT": ""}
    done = subprocess.run([sys.executable, "-m", "skunkqueue.command", "work", "-q", "probe", "-r", "r",
                           "--url", str(db), "--burst", "--path", str(jobs_dir), "--import", "which_textwrap"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    found = store.get(record.id)
    store.close()
    assert found is not None and found.state == COMPLETE, done.stdout + done.stderr
    assert found.result is not None and not json.loads(found.result).startswith(str(tmp_path))
    output = done.stdout + done.stderr
    assert "which a worker never does" in output, output
    pool = output.split("skunkqueue.pool[", 1)[1].split("]", 1)[0]
    assert (tmp_path / "shadowed").read_text().split() == [pool]  # imported by the pool alone


def test_a_worker_forked_for_a_request_the_pool_gave_up_on_never_runs(tmp_path: Path, jobs_dir: Path) -> None:
    # The server stalls (SIGSTOP here; a swap storm does the same) after it forked the middle
    # process: the pool gives up after REPLY_TIMEOUT and starts a fresh interpreter, and the worker
    # already forked finds its pipes closed and exits. Executions are counted outside the queue.
    (jobs_dir / "counted.py").write_text(textwrap.dedent("""
        import os, time
        from skunkqueue import SkunkQueue
        queue = SkunkQueue("probe", conn_url=os.environ["PROBE_DB"])

        @queue.event(routes=["r"])
        def run():
            with open(os.environ["PROBE_RAN"], "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(0.02)
    """))
    db = tmp_path / "ghost.db"
    store = SQLitePersistence("probe", url=str(db))
    store.enqueue([make_record("probe", func="counted:run", payload=b"[[], {}]") for _ in range(3000)])
    env = {**os.environ, "PROBE_DB": str(db), "PROBE_RAN": str(tmp_path / "ran"), "SKUNQ_IMPORT": ""}
    log = tmp_path / "ghost.log"
    args = ["-q", "probe", "-r", "r", "--url", str(db), "--path", str(jobs_dir), "--import", "counted",
            "--max-jobs-per-child", "1"]
    with contextlib.closing(store), pools.running(args, cwd=tmp_path, env=env, log=log) as pool:
        wait_until(lambda: any(process_name(p) == FORK_SERVER_NAME for p in _children(pool.pid)), timeout=30,
                   what="the fork server")
        server = next(p for p in _children(pool.pid) if process_name(p) == FORK_SERVER_NAME)
        deadline = time.monotonic() + 20
        while True:  # a worker restarts after every job: catch the server forking one
            assert time.monotonic() < deadline, "the server never stopped mid-request while watched"
            assert _state(server) != "gone", f"the pool gave up on the server too early:\n{log.read_text()}"
            if not _children(server):
                continue
            os.kill(server, signal.SIGSTOP)
            wait_until(lambda: _state(server) in ("T", "t"), timeout=5, what="the server to stop")
            # The server answers only after it reaped its middle process, so a middle process still
            # alive means the answer was not sent, and its worker is not the pool's child yet: the
            # pool's children now are all workers it took before (or none). A middle that exited
            # already (a zombie) may have left its worker to the pool: try again with the next one.
            before = set(_children(pool.pid))
            middles = [m for m in _children(server) if _state(m) not in ("Z", "X", "gone")]
            if middles:
                break
            os.kill(server, signal.SIGCONT)
        # The pool waits for the server's answer now and starts nothing: the middle process's child,
        # or a new child of the pool with the pool's command line once the middle exits, is the
        # worker the server forked. It waits for the pool to take it, in vain. (The fresh
        # interpreter the pool starts after it gives up has a command line of its own.)
        forked = _cmdline(pool.pid)
        ghosts: set[int] = wait_until(
            lambda: {p for m in middles for p in _children(m)}
            | {p for p in set(_children(pool.pid)) - before - {server} if _cmdline(p) == forked},
            timeout=REPLY_TIMEOUT + 10, what="the forked worker")
        wait_until(lambda: "did not answer" in log.read_text(), timeout=30, what="the pool to give up on the server")
        wait_until(lambda: not ghosts & set(_children(pool.pid)), timeout=REAP_EVERY + 5,
                   what="the worker the pool gave up on to exit and be reaped")
        # The pool goes on with fresh interpreters: wait for one to run a job (the first worker may
        # have been the one caught, so none may have run before), then look for the ghosts' pids.
        counted = tmp_path / "ran"
        ran_before = _ran(counted)
        wait_until(lambda: _ran(counted) - ran_before, timeout=60,
                   what="a worker started after the pool gave up to run a job")
        assert not ghosts & _ran(counted), "a worker the pool did not take ran a job"


def _ran(path: Path) -> set[int]:
    """The pids that appended to a job's count file (none yet: no file)."""
    return set(map(int, path.read_text().split())) if path.exists() else set()


def test_a_pool_stops_even_when_its_server_is_stopped(pool: Pool) -> None:
    server = pool.server()
    assert server is not None
    os.kill(server, signal.SIGSTOP)
    pool.process.send_signal(signal.SIGTERM)
    assert pool.process.wait(15) == 0, pool.log.read_text()
    assert _state(server) == "gone"


def _masks(pid: int) -> dict[str, int]:
    """The signal masks /proc/PID/status shows (SigBlk, SigIgn, SigCgt), as bit sets; {} if gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in lines)
            if k in ("SigBlk", "SigIgn", "SigCgt")}


def _forked_since(server: int, pool: int, known: set[int]) -> list[int]:
    """A worker the server forked: still its middle process's child, or adopted by the pool already."""
    return [p for m in _children(server) for p in _children(m)] or list(set(_children(pool)) - known - {server})


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stop_that_comes_while_a_worker_is_forked_stops_it(tmp_path: Path, jobs_dir: Path, kind: str) -> None:
    # The whole group's SIGTERM reaches a worker the server has just forked, before the worker
    # has the pool's dispositions in place of the server's SIG_IGN: it must not be lost (the pool
    # would wait for ever for an async worker). The pool is stopped while its server forks, and
    # the worker before the pool takes it: the signals come then, and both go on.
    (jobs_dir / "quick.py").write_text(textwrap.dedent("""
        import os
        from skunkqueue import SkunkQueue
        queue = SkunkQueue("probe", conn_url=os.environ["PROBE_DB"])

        @queue.event(routes=["r"])
        def run():
            pass

        @queue.event(routes=["r"])
        async def arun():
            pass
    """))
    db = tmp_path / "stop.db"
    store = SQLitePersistence("probe", url=str(db))
    store.enqueue([make_record("probe", func=f"quick:{'arun' if kind == 'async' else 'run'}", payload=b"[[], {}]")
                   for _ in range(3000)])
    env = {**os.environ, "PROBE_DB": str(db), "SKUNQ_IMPORT": ""}
    log = tmp_path / "stop.log"
    args = ["-q", "probe", "-r", "r", "--url", str(db), "--path", str(jobs_dir), "--import", "quick",
            "--max-jobs-per-child", "1", *(["--async-concurrency", "4"] if kind == "async" else [])]
    term = 1 << (signal.SIGTERM - 1)
    with contextlib.closing(store), pools.running(args, cwd=tmp_path, env=env, log=log) as pool:
        wait_until(lambda: any(process_name(p) == FORK_SERVER_NAME for p in _children(pool.pid)), timeout=30,
                   what="the fork server")
        server = next(p for p in _children(pool.pid) if process_name(p) == FORK_SERVER_NAME)
        deadline = time.monotonic() + 30
        while True:  # a worker restarts after every job: catch one that is not taken yet
            assert time.monotonic() < deadline, "never caught a worker before the pool took it"
            workers = set(_children(pool.pid)) - {server}
            if not _children(server):
                continue
            os.kill(pool.pid, signal.SIGSTOP)
            wait_until(lambda: _state(pool.pid) in ("T", "t"), timeout=5, what="the pool to stop")
            fresh: list[int] = []
            with contextlib.suppress(AssertionError):  # forked, or the pool took it before the stop
                fresh = wait_until(lambda known=workers: _forked_since(server, pool.pid, known), timeout=1,
                                   what="the forked worker")
            # Not taken yet: no handler of its own, still the server's SIG_IGN (held back or not).
            masks = _masks(fresh[0]) if len(fresh) == 1 else {}
            if masks and not masks["SigCgt"] & term:
                break
            os.kill(pool.pid, signal.SIGCONT)
        # The worker is held before it reads the pool's pulse: the terminal's SIGTERM to the whole
        # group, then the pool's own (on its way out) reach it before it has the pool's dispositions.
        [worker] = fresh
        os.kill(worker, signal.SIGSTOP)
        SkunkQueue("probe", conn_url=str(db)).pause("r")  # it finds no job then: it waits, idle
        os.killpg(pool.pid, signal.SIGTERM)
        os.kill(pool.pid, signal.SIGCONT)
        wait_until(lambda: b"stopping workers gently" in log.read_bytes(), timeout=10, what="the pool's stop")
        time.sleep(0.2)  # its pulse and SIGTERM sent
        os.kill(worker, signal.SIGCONT)
        try:
            code = pool.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the pool did not stop within 10 s of SIGTERM:\n{log.read_text()[-3000:]}")
        assert code == 0, log.read_text()[-3000:]
