"""Servers that require credentials work end to end, and passwords never leak; and a
record in the store can neither make a worker import a module the operator did not
allow nor run a function not declared on the worker's queue and route.

Redis with ``--requirepass`` and with an ACL user in the URL; mongod with
``--auth`` and a user. A real worker pool runs jobs through the credentialed
URL; its whole log, and the output of every ``skunq`` command (including the
failures with a wrong password), must not contain any password.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_jobs
from conftest import JOBS_DIR, Figures, open_queue, pool_starter
from reliability_backends import Target
from reliability_support import executions

from skunkqueue import signing
from skunkqueue.errors import SkunkQueueError
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import ERROR, JobRecord, new_id
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.workers import PoolProcess


def skunq(backend: BackendUnderTest, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skunkqueue.cli", *args, *backend.cli_args()],
                          capture_output=True, text=True, timeout=timeout, env=backend.process_env())


def assert_no_secret(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a password appears in {where}"


def test_credentials_work_end_to_end_and_never_leak(target: Target, tmp_path: Path, figures: Figures) -> None:
    if target.secured is None:
        pytest.skip(target.notes.get("auth", "no credentials to test"))
    tried = 0
    with target.secured(tmp_path) as ways:
        for n, way in enumerate(ways):
            secrets = [*way.secrets, *(s for s in way.wrong.url.split("@")[0].split(":") if "Wrong-" in s)]
            queue_name = f"rel-auth-{n}"
            logs = tmp_path / f"way-{n}"
            logs.mkdir()
            start, pools = pool_starter(way.backend, queue_name, logs)
            # A pool with the wrong password, started alongside: it must give up without a traceback.
            denied = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", queue_name, "-r", "a",
                                       *way.wrong.cli_args()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=way.wrong.process_env())
            try:
                pool = start(["a"], extra=["--log-level", "DEBUG"])
                q = open_queue(way.backend, queue_name)
                mark = q.event(routes=["a"])(reliability_jobs.mark.func)
                log = tmp_path / f"executions-{n}"
                handles = [mark.fire(str(log), f"j{i}") for i in range(20)]
                assert all(h.wait(timeout=60) for h in handles), way.description
                assert sorted(executions(log)) == sorted(f"j{i}" for i in range(20))

                for command in (["status"], ["workers"], ["dead"]):
                    out = skunq(way.backend, *command, "-q", queue_name)
                    assert out.returncode == 0, out.stderr
                    assert_no_secret(out.stdout + out.stderr, secrets, f"skunq {command[0]}")
                wrong = skunq(way.wrong, "status", "-q", queue_name)
                assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr
                assert wrong.stderr.strip().splitlines()[-1].startswith("Error: "), wrong.stderr
                assert_no_secret(wrong.stdout + wrong.stderr, secrets, "skunq status with a wrong password")
                with pytest.raises(SkunkQueueError) as info:
                    open_queue(way.wrong, queue_name).event(routes=["a"])(reliability_jobs.mark.func).fire("x", "y")
                assert_no_secret(str(info.value), secrets, "the exception fire raises")
                q.close()

                denied_out, _ = denied.communicate(timeout=120)
                assert denied.returncode == 1 and "Traceback" not in denied_out, denied_out
                assert_no_secret(denied_out, secrets, "the output of skunq work with a wrong password")
                tried += 4
            finally:
                if denied.poll() is None:
                    denied.kill()
                    denied.wait()
                for p in pools:
                    p.stop()
            pool_log = pool.log_path.read_text(errors="replace") if pool.log_path else ""
            assert "DEBUG" in pool_log or "INFO" in pool_log, "the pool log was not captured"
            assert_no_secret(pool_log, secrets, "the worker pool's log (DEBUG level)")
    figures.record("credentials", fired=20 * len(ways), lost=0, duplicates=0, bad_inputs=tried,
                   ways_in=", ".join(w.description for w in ways))


# -- the trust boundary: what a record in the store can make a worker do ---------------------

ZEN = "Beautiful is better than ugly"


def _forged(queue: str, func: str, payload: bytes = b"[[],{}]") -> JobRecord:
    # retries=3: a refusal must end the record at once, not be retried.
    now = time.time()
    return JobRecord(id=new_id(), queue=queue, route="a", func=func, payload=payload, due=now, created=now,
                     retries=3)


@pytest.mark.parametrize("mode", ["explicit", "bare"])
def test_a_record_cannot_import_or_run_what_the_operator_did_not_allow(
        mode: str, backend: BackendUnderTest, queue: SkunkQueue, tmp_path: Path, figures: Figures) -> None:
    """Worker of queue Q, route a: forged and cross-tenant records end `error` once; nothing of theirs runs."""
    workdir, outside = tmp_path / "workdir", tmp_path / "elsewhere"
    workdir.mkdir()
    outside.mkdir()
    # Modules whose top-level code leaves a file behind: proof that they were imported.
    for folder, module in ((workdir, "sidefx"), (outside, "outside_fx")):
        (folder / f"{module}.py").write_text(
            f"open({str(tmp_path / (module + '.imported'))!r}, 'w').close()\n"
            "def x():\n    return 'ran'\n")
    log = tmp_path / "executions"
    imports = ["reliability_jobs"] if mode == "explicit" else []
    pool = PoolProcess(backend, queue.name, ["a"], concurrency=2, log_path=tmp_path / "pool.log",
                       extra=["--path", JOBS_DIR], imports=imports, cwd=workdir,
                       # Added to the path, not replacing it: a backend may need its own (the fdb stand-in).
                       env={"PYTHONPATH": os.pathsep.join(filter(None, [str(outside),
                                                                       backend.env.get("PYTHONPATH")]))})
    try:
        pool.wait_ready(60)
        workers = sorted(pool.worker_pids())
        mark = queue.event(routes=["a"])(reliability_jobs.mark.func)
        good = [mark.fire(str(log), f"before-{i}") for i in range(10)]
        refused = "Refused to import module"
        cases = [("this:x", b"[[],{}]", f"{refused} 'this'"),  # stdlib, prints the Zen on import
                 ("outside_fx:x", b"[[],{}]", f"{refused} 'outside_fx'"),  # on sys.path, not a root
                 ("unittest.__main__:main", b"[[],{}]", f"{refused} 'unittest"),  # runs tests, exits
                 ("os:system", b'[["touch /tmp/skunq-pwned"],{}]', "not decorated")]
        records = [_forged(queue.name, func, payload) for func, payload, _ in cases]
        expected = {r.id: needle for r, (_, _, needle) in zip(records, cases)}
        if mode == "explicit":
            # Even a module in the worker's own directory is not imported without --import.
            sidefx = _forged(queue.name, "sidefx:x")
            records.append(sidefx)
            expected[sidefx.id] = f"{refused} 'sidefx'"
        queue.persistence.enqueue(records)
        # Fired the ordinary way by a producer of Q: one function declared on another
        # queue (another tenant's), one declared on Q but for another route.
        other_queue = queue.event(routes=["a"])(reliability_jobs.other_queue_job.func).fire(str(log), "tenant")
        other_route = queue.event(routes=["a"])(reliability_jobs.other_route_job.func).fire(str(log), "admin")
        expected[other_queue.id] = f"on another queue, not on queue '{queue.name}'"
        expected[other_route.id] = "for route(s) 'admin-only', not for route 'a'"
        good += [mark.fire(str(log), f"after-{i}") for i in range(10)]

        assert all(h.wait(timeout=60) for h in good)
        for job_id, needle in expected.items():
            done = queue.persistence.wait_finished(job_id, 30)
            assert done is not None and done.state == ERROR and done.error is not None, (needle, done)
            assert needle in done.error["message"], (needle, done.error)
            assert (done.attempts, done.dead) == (1, True), (needle, done)
        assert sorted(pool.worker_pids()) == workers, "a worker died (the pool restarted it)"
    finally:
        pool.stop()
    runs = executions(log)
    assert sorted(runs) == sorted([f"before-{i}" for i in range(10)] + [f"after-{i}" for i in range(10)])
    assert all(len(v) == 1 for v in runs.values())
    pool_log = pool.log()
    assert ZEN not in pool_log, "a record made the worker import `this`"
    assert "Ran 0 tests" not in pool_log and "NO TESTS RAN" not in pool_log
    assert not (tmp_path / "outside_fx.imported").exists(), "a module outside the roots was imported"
    assert not os.path.exists("/tmp/skunq-pwned")
    if mode == "explicit":
        assert not (tmp_path / "sidefx.imported").exists(), "a module not named with --import was imported"
    figures.record(f"trust-boundary-{mode}", fired=20, lost=0, duplicates=0, bad_inputs=len(expected),
                   refused=len(expected))


def test_bare_mode_imports_modules_of_the_working_directory_and_still_checks_them(
        backend: BackendUnderTest, queue: SkunkQueue, tmp_path: Path) -> None:
    """Bare mode trusts the working directory: its module is imported, but a non-job still never runs."""
    (tmp_path / "sidefx.py").write_text(
        f"open({str(tmp_path / 'sidefx.imported')!r}, 'w').close()\n"
        f"def x():\n    open({str(tmp_path / 'sidefx.ran')!r}, 'w').close()\n")
    pool = PoolProcess(backend, queue.name, ["a"], log_path=tmp_path / "pool.log", imports=[], cwd=tmp_path)
    try:
        pool.wait_ready(60)
        record = _forged(queue.name, "sidefx:x")
        queue.persistence.enqueue([record])
        done = queue.persistence.wait_finished(record.id, 30)
    finally:
        pool.stop()
    assert done is not None and done.state == ERROR and done.error is not None
    assert "not decorated with @queue.event" in done.error["message"]
    assert (tmp_path / "sidefx.imported").exists() and not (tmp_path / "sidefx.ran").exists()


def test_with_a_secret_only_signed_records_run(backend: BackendUnderTest, queue_name: str, tmp_path: Path,
                                               figures: Figures, monkeypatch: pytest.MonkeyPatch) -> None:
    """SKUNQ_SECRET on producer and workers: unsigned, wrongly signed and altered records run nothing."""
    monkeypatch.setenv("SKUNQ_SECRET", "producer-and-workers-share-this")
    queue = open_queue(backend, queue_name)  # reads the key from the environment, as producers do
    pool = PoolProcess(backend, queue_name, ["a"], concurrency=2, log_path=tmp_path / "pool.log",
                       extra=["--path", JOBS_DIR], imports=["reliability_jobs"])
    try:
        pool.wait_ready(60)
        log = tmp_path / "executions"
        mark = queue.event(routes=["a"])(reliability_jobs.mark.func)
        good = [mark.fire(str(log), f"before-{i}") for i in range(10)]
        template = queue.get(good[0].id)
        assert template is not None and template.payload.startswith(b"skunq-hmac1:")
        body = signing.body(template.payload)

        def copy(**changes: object) -> JobRecord:
            now = time.time()
            fields = {**template.to_dict(), "id": new_id(), "state": "pending", "due": now, "created": now,
                      "owner": None, "lease_until": None, "token": 0, "attempts": 0, "started": None,
                      "finished": None, "result": None, "error": None, **changes}
            return JobRecord.from_dict(fields)

        wrong_key = copy(payload=body)
        signing.sign(b"a key the workers do not have", wrong_key)
        forged = [copy(payload=body),                                                # unsigned
                  wrong_key,                                                         # another key
                  copy(),                                                            # signature of another id
                  copy(payload=template.payload.replace(b"before-0", b"evil-0")),   # arguments altered
                  copy(func=reliability_jobs.fail_and_log.name)]                     # function swapped
        queue.persistence.enqueue(forged)
        good += [mark.fire(str(log), f"after-{i}") for i in range(10)]
        assert all(h.wait(timeout=60) for h in good)
        for record in forged:
            done = queue.persistence.wait_finished(record.id, 30)
            assert done is not None and done.state == ERROR and done.error is not None, done
            assert "nothing of it ran" in done.error["message"] and done.attempts == 1, done.error
    finally:
        pool.stop()
        queue.close()
    runs = executions(log)
    assert sorted(runs) == sorted([f"before-{i}" for i in range(10)] + [f"after-{i}" for i in range(10)])
    assert all(len(v) == 1 for v in runs.values())
    figures.record("signed-records", fired=20, lost=0, duplicates=0, bad_inputs=len(forged))
