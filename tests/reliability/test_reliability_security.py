"""Servers that require credentials work end to end, and passwords never leak.

Redis with ``--requirepass`` and with an ACL user in the URL; mongod with
``--auth`` and a user. A real worker pool runs jobs through the credentialed
URL; its whole log, and the output of every ``skunq`` command (including the
failures with a wrong password), must not contain any password.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import reliability_jobs
from conftest import Figures, open_queue, pool_starter
from reliability_backends import Target
from reliability_support import executions

from skunkqueue.errors import SkunkQueueError
from skunkqueue.testing.kit import BackendUnderTest


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
