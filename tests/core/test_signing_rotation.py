"""Rolling out SKUNQ_SECRET and rotating it with zero refused jobs, end to end with real pools.

Every legitimate job is counted in a file outside the queue (one line per execution);
forged ones never appear there. docs/guides/signing.md ("Rolling out signing", "Rotating the key") is
the procedure these tests follow step by step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
import redis_servers

from skunkqueue import SkunkQueue, serializer, signing
from skunkqueue.errors import ConfigurationError
from skunkqueue.job import JobHandle
from skunkqueue.record import COMPLETE, ERROR, JobRecord, new_id
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.workers import PoolProcess

K0, K1, K2 = "key-zero", "key-one-9f2c", "key-two-77ab"
SIGNING_ENV = ("SKUNQ_SECRET", "SKUNQ_SECRET_PREVIOUS", "SKUNQ_ACCEPT_UNSIGNED")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_servers.RedisServer]:
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis-rotation")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BackendUnderTest:
    for name in SIGNING_ENV:
        monkeypatch.delenv(name, raising=False)  # pools copy this environment: start from none
    if request.param == "sqlite":
        return BackendUnderTest(name="sqlite", url=str(tmp_path / "q.db"))
    return BackendUnderTest(name="redis", url=request.getfixturevalue("redis_server").url, db="3")


class Scene:
    """A queue, its producers (each with its own environment) and the pool of the moment."""

    def __init__(self, backend: BackendUnderTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backend, self.tmp, self.mp = backend, tmp_path, monkeypatch
        self.name = backend.new_queue_name()
        self.runs = tmp_path / "runs"
        self.pool: PoolProcess | None = None
        self.logs: list[Path] = []

    def producer(self, secret: str | None) -> SkunkQueue:
        """A fresh producer (a new process, as far as its cached view of the workers goes)."""
        if secret is None:
            self.mp.delenv("SKUNQ_SECRET", raising=False)
        else:
            self.mp.setenv("SKUNQ_SECRET", secret)
        return SkunkQueue(self.name, backend=self.backend.name, conn_url=self.backend.url,
                          dbname=self.backend.db)

    def fire(self, secret: str | None, token: str, delay: float = 0.0) -> JobHandle:
        mark = self.producer(secret).event(routes=["r"])(jobs.mark.func)
        if delay:
            return mark.fire_at(timedelta(seconds=delay), str(self.runs), token)
        return mark.fire(str(self.runs), token)

    def start(self, **env: str) -> None:
        self.stop()
        log = self.tmp / f"pool-{len(self.logs)}.log"
        self.logs.append(log)
        self.pool = PoolProcess(self.backend, self.name, ["r"], log_path=log, env=env)
        self.pool.wait_ready()

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()  # SIGTERM: gentle, running jobs finish
            assert self.pool.process.returncode == 0, self.pool.log()
            self.pool = None

    def forge(self, token: str, sign_with: str | None = None) -> str:
        """A store writer's record: unsigned, or signed with a key the workers do not hold."""
        record = JobRecord(id=new_id(), queue=self.name, route="r", func=jobs.mark.name,
                           payload=serializer.dumps_call((str(self.runs), token), {}, "json"),
                           due=time.time(), created=time.time())
        if sign_with is not None:
            signing.sign(sign_with.encode(), record)
        store = self.backend.open(self.name)
        store.enqueue([record])
        store.close()
        return record.id

    def record(self, job_id: str) -> JobRecord:
        store = self.backend.open(self.name)
        found = store.get(job_id)
        store.close()
        assert found is not None
        return found

    def signatures(self, **env: str) -> dict[str, str]:
        """``skunq jobs --json``'s signature column, judged with ``env``'s keys."""
        import os

        full = {k: v for k, v in os.environ.items() if k not in SIGNING_ENV} | env
        done = subprocess.run([sys.executable, "-m", "skunkqueue.cli", "jobs", "-q", self.name, "-s", "pending",
                               "--json", "--limit", "1000", *self.backend.cli_args()],
                              capture_output=True, text=True, env=full, timeout=60)
        assert done.returncode == 0, done.stderr
        return {row["id"]: row["signature"] for row in json.loads(done.stdout)}

    def executions(self) -> list[str]:
        return sorted(self.runs.read_text().split()) if self.runs.exists() else []


def test_rolling_out_and_rotating_the_key_refuses_no_legitimate_job(
        backend: BackendUnderTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = Scene(backend, tmp_path, monkeypatch)
    legit: dict[str, JobHandle] = {}
    try:
        # Before signing: jobs queued unsigned, some due only after the roll-out's first step.
        for i in range(4):
            legit[f"u{i}"] = scene.fire(None, f"u{i}")
        for i in range(3):
            legit[f"late{i}"] = scene.fire(None, f"late{i}", delay=6)

        # Roll-out 1: workers get the key and still run unsigned records.
        scene.start(SKUNQ_SECRET=K1, SKUNQ_ACCEPT_UNSIGNED="1")
        # 2: producers get the key. One not yet updated still fires (the workers accept unsigned).
        for i in range(3):
            legit[f"s{i}"] = scene.fire(K1, f"s{i}")
        legit["straggler"] = scene.fire(None, "straggler")
        bad_signature = scene.forge("forged-wrong-key", sign_with="not the key")  # refused even now
        for handle in legit.values():
            assert handle.wait(timeout=30) is not None
        # 3: no unsigned job is left pending (skunq jobs --json says "none" for those)...
        assert "none" not in scene.signatures(SKUNQ_SECRET=K1).values()
        # ...so the workers stop accepting unsigned ones.
        scene.start(SKUNQ_SECRET=K1)
        with pytest.raises(ConfigurationError, match="run only signed jobs"):
            scene.fire(None, "never-stored")  # a producer without the key learns it at fire
        forged = [scene.forge(f"forged-unsigned-{i}") for i in range(3)]
        legit["s3"] = scene.fire(K1, "s3")
        assert legit["s3"].wait(timeout=30) is not None

        # Rotation K1 -> K2. Jobs signed with K1 wait in the queue meanwhile (no worker runs
        # while they are fired and judged, so a slow machine cannot run them early).
        scene.stop()
        for i in range(3):
            legit[f"d{i}"] = scene.fire(K1, f"d{i}")
        pending = scene.signatures(SKUNQ_SECRET=K2, SKUNQ_SECRET_PREVIOUS=f"{K0} {K1}")
        assert sorted(pending[legit[f"d{i}"].id] for i in range(3)) == ["previous"] * 3
        # 1: workers sign with K2 and still verify K1 (and an older K0: several, comma or space).
        scene.start(SKUNQ_SECRET=K2, SKUNQ_SECRET_PREVIOUS=f"{K0}, {K1}")
        legit["old-producer"] = scene.fire(K1, "old-producer")
        # 2: producers move to K2.
        legit["s4"] = scene.fire(K2, "s4")
        for handle in legit.values():
            assert handle.wait(timeout=30) is not None
        # 3: no job signed with an old key is left, so the old keys go.
        assert "previous" not in scene.signatures(SKUNQ_SECRET=K2, SKUNQ_SECRET_PREVIOUS=K1).values()
        scene.start(SKUNQ_SECRET=K2)
        with pytest.raises(ConfigurationError, match="do not accept this process's SKUNQ_SECRET"):
            scene.fire(K1, "never-stored-2")
        legit["s5"] = scene.fire(K2, "s5")
        assert legit["s5"].wait(timeout=30) is not None
    finally:
        scene.stop()

    assert all(h.state == COMPLETE for h in legit.values())
    # Each legitimate job ran exactly once; no forged or refused-at-fire one ran at all.
    assert scene.executions() == sorted(legit)
    for job_id in [bad_signature, *forged]:
        record = scene.record(job_id)
        assert record.state == ERROR and record.error is not None and record.error["type"] == "JobRefused"
        assert record.attempts == 1
    # The refusals of one function are logged once, not once per job.
    second = scene.logs[1].read_text()
    assert second.count(f"refusing jobs of {jobs.mark.name}") == 1, second
    assert second.count("is not signed") == 1, second


def test_previous_keys_without_a_current_one_stop_the_pool_in_one_line(
        backend: BackendUnderTest, tmp_path: Path) -> None:
    pool = PoolProcess(backend, backend.new_queue_name(), ["r"], log_path=tmp_path / "pool.log",
                       env={"SKUNQ_SECRET_PREVIOUS": K1})
    assert pool.wait(30) == 1
    assert "SKUNQ_SECRET_PREVIOUS is set but SKUNQ_SECRET is not" in pool.log()
    assert "Traceback" not in pool.log()


def test_an_async_producer_learns_at_afire_and_a_garbled_notice_blocks_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from skunkqueue import signature_policy

    for name in SIGNING_ENV:
        monkeypatch.delenv(name, raising=False)
    url = str(tmp_path / "q.db")
    store = SkunkQueue("notice", conn_url=url).persistence
    monkeypatch.setenv("SKUNQ_SECRET", K1)
    signature_policy.publish(store)  # what a pool with K1 publishes at start
    monkeypatch.delenv("SKUNQ_SECRET")

    async def fire(secret: str | None) -> str:
        if secret:
            monkeypatch.setenv("SKUNQ_SECRET", secret)
        else:
            monkeypatch.delenv("SKUNQ_SECRET", raising=False)
        add = SkunkQueue("notice", conn_url=url).event(routes=["r"])(jobs.add.func)
        return (await add.afire(1, 2)).id

    with pytest.raises(ConfigurationError, match="run only signed jobs"):
        asyncio.run(fire(None))
    with pytest.raises(ConfigurationError, match="do not accept"):
        asyncio.run(fire(K2))
    assert asyncio.run(fire(K1))
    assert [r.id for r in store.list_jobs()] and len(store.list_jobs()) == 1  # the refused ones stored nothing
    store.put_setting(signature_policy.SETTING, "{not json")  # a store writer's junk decides nothing
    assert asyncio.run(fire(None))
    store.close()


def test_signature_tells_which_key_signed_a_record(monkeypatch: pytest.MonkeyPatch) -> None:
    def record(key: str | None) -> JobRecord:
        made = JobRecord(id=new_id(), queue="q", route="r", func=jobs.add.name,
                         payload=serializer.dumps_call((1, 2), {}, "json"))
        if key is not None:
            signing.sign(key.encode(), made)
        return made

    monkeypatch.setenv("SKUNQ_SECRET", K2)
    monkeypatch.setenv("SKUNQ_SECRET_PREVIOUS", f"{K0},{K1}")
    assert [signing.signature(record(k)) for k in (None, K2, K1, K0, "other")] == [
        "none", "current", "previous", "previous", "unknown"]
    altered = record(K1)
    altered.route = "elsewhere"
    assert signing.signature(altered) == "unknown"
