"""One configuration rule for the library, ``skunq work`` and ``skunq web`` (skunkqueue.config).

Explicit arguments, else SKUNQ_BACKEND/SKUNQ_URL/SKUNQ_DB, else the embedded
default; an address alone names its backend by its scheme.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import redis_servers

from skunkqueue import SkunkQueue, backends, config
from skunkqueue.errors import ConfigurationError
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.testing import jobs

PASSWORD = "pa55:w@rd-not-in-logs"
STORE_ENV = ("SKUNQ_BACKEND", "SKUNQ_URL", "SKUNQ_DB", "SKUNQ_SQLITE_PATH")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in STORE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_servers.RedisServer]:
    """A redis-server with a password that contains ':' and '@'."""
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis-config"), password=PASSWORD).start()
    yield server
    server.stop()


def redis_url(server: redis_servers.RedisServer, db: int) -> str:
    from urllib.parse import quote

    return f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/{db}"


@pytest.mark.parametrize(("url", "backend"), [
    ("redis://localhost:6379/0", "redis"),
    ("REDIS://localhost:6379", "redis"),
    ("rediss://user:pw@cache.example:6380", "redis"),
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "redis"),
    ("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster?db=0", "redis"),
    ("unix:///run/redis.sock", "redis"),
    ("mongodb://localhost:27017/app", "mongodb"),
    ("mongodb+srv://user:pw@cluster0.example.net/app", "mongodb"),
    ("sqlite:////var/lib/app/jobs.db", "sqlite"),
    ("./jobs.db", "sqlite"),
    ("jobs.sqlite3", "sqlite"),
    ("/var/lib/app/queue", "sqlite"),
    ("postgresql://app:pw@db.example:5432/app", "postgres"),
    ("postgres://127.0.0.1/app", "postgres"),
    ("fdb:///etc/foundationdb/fdb.cluster", "fdb"),
    ("fdb://", "fdb"),
    ("/etc/foundationdb/fdb.cluster", "fdb"),
])
def test_an_address_alone_names_its_backend(url: str, backend: str, clean_env: pytest.MonkeyPatch) -> None:
    assert config.resolve(url=url) == config.Store(backend, url, None, "arguments")
    clean_env.setenv("SKUNQ_URL", url)
    assert config.resolve() == config.Store(backend, url, None, "environment")


class RoachLike(SQLitePersistence):
    """A stand-in third-party backend: all it adds is the schemes it declares."""

    name = "roachlike"
    url_schemes = ("cockroachdb", "cockroach")


def test_a_third_party_backend_joins_by_declaring_its_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    found = dict(backends._entry_points())
    fake = type(next(iter(found.values())))(name="roachlike", value=f"{__name__}:RoachLike",
                                            group=backends.GROUP)
    monkeypatch.setattr(backends, "_entry_points", lambda: {**found, "roachlike": fake})
    assert config.resolve(url="cockroachdb://app:pw@127.0.0.1/app").backend == "roachlike"
    assert config.resolve(url="cockroach://127.0.0.1/app").backend == "roachlike"
    assert config.resolve(url="redis://127.0.0.1").backend == "redis"


@pytest.mark.parametrize(("url", "says"), [
    ("localhost:6379", "has no scheme"),
    ("queue-file", "has no scheme"),
    ("amqp://guest:guest@localhost", "No installed backend takes amqp:// addresses"),
])
def test_an_address_that_names_no_backend_is_one_line_saying_what_to_do(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        config.resolve(url=url)
    message = str(caught.value)
    assert says in message and "--backend or SKUNQ_BACKEND" in message and "\n" not in message
    assert "guest:guest" not in message  # the password is redacted


def test_arguments_win_as_a_whole_then_the_environment_then_the_default(clean_env: pytest.MonkeyPatch) -> None:
    assert config.resolve() == config.Store("sqlite", None, None, "default")
    clean_env.setenv("SKUNQ_URL", "mongodb://127.0.0.1:27017")
    clean_env.setenv("SKUNQ_DB", "app")
    assert config.resolve() == config.Store("mongodb", "mongodb://127.0.0.1:27017", "app", "environment")
    # An explicit address is not paired with the environment's backend or database...
    assert config.resolve(url="redis://127.0.0.1/4") == config.Store("redis", "redis://127.0.0.1/4", None,
                                                                     "arguments")
    assert config.resolve(backend="sqlite") == config.Store("sqlite", None, None, "arguments")
    # ...while a database alone refines the environment's store.
    assert config.resolve(db="other") == config.Store("mongodb", "mongodb://127.0.0.1:27017", "other",
                                                      "environment")
    clean_env.setenv("SKUNQ_BACKEND", "redis")
    clean_env.setenv("SKUNQ_URL", "127.0.0.1:6379")  # a backend named: host:port needs no scheme
    assert config.resolve() == config.Store("redis", "127.0.0.1:6379", "app", "environment")
    # An explicit scheme-less address says where, SKUNQ_BACKEND (and SKUNQ_DB) which backend...
    assert config.resolve(url="10.0.0.5:6379") == config.Store("redis", "10.0.0.5:6379", "app", "arguments")
    # ...but an address with a scheme speaks for itself.
    assert config.resolve(url="mongodb://10.0.0.5") == config.Store("mongodb", "mongodb://10.0.0.5", None,
                                                                    "arguments")


def test_a_queue_follows_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("SKUNQ_URL", f"sqlite://{tmp_path}/env.db")
    queue = SkunkQueue("cfg")
    assert (queue.backend, queue.conn_url) == ("sqlite", f"sqlite://{tmp_path}/env.db")
    assert queue.persistence.describe() == f"sqlite {tmp_path}/env.db"
    queue.close()


def _python(code: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          cwd=cwd)


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STORE_ENV}
    env.update(values)
    return env


def test_default_cfg_of_the_seed_modules_reads_the_same_variables(tmp_path: Path) -> None:
    code = ("import json\n"
            "from skunkqueue.persistence.redis import default_cfg as r\n"
            "from skunkqueue.persistence.mongodb import default_cfg as m\n"
            "print(json.dumps([r, m]))\n")
    plain = _python(code, _env())
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout) == [
        {"backend": "redis", "conn_url": "localhost:6379", "dbname": "0"},
        {"backend": "mongodb", "conn_url": "localhost:27017", "dbname": "skunkqueue"}]
    on_redis = _python(code, _env(SKUNQ_URL="redis://:pw@10.1.2.3:6390/2"))
    assert on_redis.returncode == 0, on_redis.stderr
    redis_cfg, mongo_cfg = json.loads(on_redis.stdout)
    # The address's own database (/2), not the seed's "0": dbname would override it.
    assert redis_cfg == {"backend": "redis", "conn_url": "redis://:pw@10.1.2.3:6390/2", "dbname": None}
    assert mongo_cfg["conn_url"] == "localhost:27017"
    assert "name the redis backend" in on_redis.stderr and ":pw@" not in on_redis.stderr
    db_only = _python(code, _env(SKUNQ_BACKEND="redis", SKUNQ_DB="7"))
    assert json.loads(db_only.stdout)[0] == {"backend": "redis", "conn_url": "localhost:6379", "dbname": "7"}


JOBS = '''
import os
from skunkqueue import SkunkQueue

queue = SkunkQueue("cfgq")   # no store arguments: the producer and the worker read the same SKUNQ_*

@queue.event(routes=["r"])
def note(word):
    with open(os.environ["CFG_RUNS"], "a") as fh:
        fh.write(word + "\\n")
    return word.upper()
'''


def test_a_producer_worker_and_monitor_in_one_shell_share_the_store(
        locked_redis: redis_servers.RedisServer, tmp_path: Path) -> None:
    """The issue's trap: SKUNQ_URL=redis://... in the shell, and the producer fired into SQLite."""
    (tmp_path / "cfgjobs.py").write_text(JOBS)
    runs = tmp_path / "runs"
    # No SKUNQ_BACKEND: the scheme names it. The SQLite default would live here, and must stay empty.
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = _env(SKUNQ_URL=redis_url(locked_redis, 3), CFG_RUNS=str(runs),
               SKUNQ_SQLITE_PATH=str(tmp_path / "not-this.db"), PYTHONPATH=path)
    log = tmp_path / "pool.log"
    with open(log, "wb") as out:
        pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", "cfgq", "-r", "r",
                                 "--import", "cfgjobs"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        fired = _python("import cfgjobs\n"
                        "h = cfgjobs.note.fire('hello')\n"
                        "print(h.wait(timeout=30), cfgjobs.queue.backend)\n", env, cwd=tmp_path)
        assert fired.returncode == 0, fired.stderr + log.read_text()
        assert fired.stdout.split() == ["HELLO", "redis"]
        assert runs.read_text().split() == ["hello"]
        client = redis.Redis(port=locked_redis.port, password=PASSWORD, db=3)
        assert client.dbsize() > 0  # the job lives in database 3 of this server
        client.close()
        assert not (tmp_path / "not-this.db").exists()
        # The monitor: same variables, same store, the password redacted in what it prints.
        web = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "web", "-q", "cfgq", "--port", "0"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        try:
            assert web.stderr is not None
            banner = web.stderr.readline()
        finally:
            web.terminate()
            web.wait(10)
        assert f"queue cfgq on redis redis://:***@127.0.0.1:{locked_redis.port}/3" in banner, banner
    finally:
        pool.terminate()
        pool.wait(30)
    text = log.read_text()
    started = [line for line in text.splitlines() if "listening on queue cfgq" in line]
    assert started and f"store redis redis://:***@127.0.0.1:{locked_redis.port}/3" in started[0], text
    assert PASSWORD not in text and "pa55" not in text


def test_skunq_work_with_an_explicit_url_ignores_another_backend_in_the_environment(
        locked_redis: redis_servers.RedisServer, tmp_path: Path) -> None:
    env = _env(SKUNQ_BACKEND="mongodb", SKUNQ_URL="mongodb://127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "skunkqueue.cli", "status", "-q", "cfgq",
                           "--url", redis_url(locked_redis, 4)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Queue cfgq has no jobs." in done.stdout


def test_a_queue_opened_from_an_address_alone_reaches_redis(locked_redis: redis_servers.RedisServer,
                                                            clean_env: pytest.MonkeyPatch) -> None:
    queue = SkunkQueue("cfg-direct", conn_url=redis_url(locked_redis, 5))
    assert queue.backend == "redis"
    assert queue.persistence.describe() == f"redis redis://:***@127.0.0.1:{locked_redis.port}/5"
    assert queue.persistence.workers() == []  # a round trip, with the password from the URL
    queue.close()


def test_a_postgresql_address_alone_reaches_postgres(tmp_path_factory: pytest.TempPathFactory,
                                                      clean_env: pytest.MonkeyPatch) -> None:
    import postgres_servers

    if not postgres_servers.available():
        pytest.fail("PostgreSQL is not installed: run scripts/ensure-servers (apt-get install postgresql)")
    server = postgres_servers.PostgresServer(tmp_path_factory.mktemp("postgres-config"),
                                             password="pg-s3cret").start()
    try:
        clean_env.setenv("SKUNQ_URL", server.url)
        queue = SkunkQueue("cfg-pg")  # no arguments: the scheme of SKUNQ_URL names the backend
        assert queue.backend == "postgres"
        fired = queue.event(routes=["r"])(jobs.add.func).fire(1, 2)
        assert queue.handle(fired.id).state == "pending"
        assert queue.persistence.describe() == f"postgres postgresql://postgres:***@127.0.0.1:{server.port}/postgres"
        queue.close()
    finally:
        server.destroy()


@pytest.mark.parametrize(("url", "backend", "drivers"), [
    ("/var/lib/app/jobs.db", "sqlite", []),
    ("sqlite:////var/lib/app/jobs.db", "sqlite", []),
    ("redis://127.0.0.1:6379", "redis", ["redis"]),
    ("mongodb+srv://h.example/app", "mongodb", ["pymongo"]),
])
def test_an_address_imports_only_its_own_backends_driver(url: str, backend: str, drivers: list[str]) -> None:
    """Choosing by scheme must not import every backend (their drivers cost a second or more)."""
    code = ("import sys\n"
            "from skunkqueue import config\n"
            f"print(config.resolve(url={url!r}).backend)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'pymongo', 'psycopg', 'fdb'}))\n")
    done = _python(code, _env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [backend, repr(drivers)]


def test_the_configured_store_failing_under_json_logs_stays_json_and_keeps_the_password(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """SKUNQ_URL alone, --log-format json, and the store SIGKILLed mid-run then restarted.

    While it is down a producer gets one line saying what to do; every line the pool writes is
    one JSON object (no bare traceback); the password appears nowhere; the pool carries on.
    """
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis-fault"), password=PASSWORD).start()
    (tmp_path / "cfgjobs.py").write_text(JOBS)
    runs = tmp_path / "runs"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = _env(SKUNQ_URL=redis_url(server, 5), CFG_RUNS=str(runs), PYTHONPATH=path,
               SKUNQ_SQLITE_PATH=str(tmp_path / "not-this.db"))
    err = tmp_path / "pool.err"
    fire = ("import sys, cfgjobs\n"
            "try:\n"
            "    print(cfgjobs.note.fire(sys.argv[1]).wait(timeout=60))\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc, sep=': ')\n")
    with open(err, "wb") as stderr:
        pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", "cfgq", "-r", "r",
                                 "--import", "cfgjobs", "--log-format", "json"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        before = subprocess.run([sys.executable, "-c", fire, "before"], capture_output=True, text=True,
                                timeout=90, env=env, cwd=tmp_path)
        assert before.stdout.split() == ["BEFORE"], before.stdout + before.stderr + err.read_text()
        server.kill()
        down = subprocess.run([sys.executable, "-c", fire, "down"], capture_output=True, text=True, timeout=90,
                              env=env, cwd=tmp_path)
        [line] = down.stdout.splitlines()
        assert line.startswith("BackendUnavailable: ") and f"127.0.0.1:{server.port}" in line, down.stdout
        assert PASSWORD not in line and down.stderr == "", down.stderr
        time.sleep(3)  # the pool's workers meet the dead store for a while
        assert pool.poll() is None, err.read_text()
        server.start()  # the same port, empty: redis keeps nothing on disk here
        after = subprocess.run([sys.executable, "-c", fire, "after"], capture_output=True, text=True, timeout=90,
                               env=env, cwd=tmp_path)
        assert after.stdout.split() == ["AFTER"], after.stdout + after.stderr + err.read_text()
    finally:
        pool.terminate()
        pool.wait(60)
        server.stop()
    text = err.read_text()
    assert runs.read_text().split() == ["before", "after"]
    lines = [json.loads(line) for line in text.splitlines()]  # raises on any line that is not JSON
    assert len(lines) == len(text.splitlines()) and lines
    assert PASSWORD not in text and "pa55" not in text
    assert any(line["level"] in ("WARNING", "ERROR") for line in lines), "the outage went unlogged"
    assert not (tmp_path / "not-this.db").exists()
