"""The roles Persistence composes: capabilities read from the class, a backend that plays only the
required roles passing the kit's protocol part, old backends' flags, and the docs' role table."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytest

from skunkqueue import SkunkQueue, backends
from skunkqueue.errors import ConfigurationError
from skunkqueue.persistence import IMPLEMENTED_BY, Persistence, roles
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import JobRecord, Outcome, WorkerInfo
from skunkqueue.testing import BackendUnderTest, ProtocolSuite
from skunkqueue.testing.suite import PROVES, ConformanceSuite

ROOT = Path(__file__).resolve().parents[2]


class Hourly(Persistence):
    """A third party's first backend: the required roles only (job store, worker registry, the
    monitor's two reads), each method handed to a store it wraps, here SQLite's. No flags."""

    name = "hourly"

    def __init__(self, queue: str, **options: Any) -> None:
        super().__init__(queue, **options)
        self.inner = SQLitePersistence(queue, url=options.get("url"), result_ttl=self.result_ttl)

    def enqueue(self, records: Sequence[JobRecord]) -> None:
        self.inner.enqueue(records)

    def get(self, job_id: str) -> JobRecord | None:
        return self.inner.get(job_id)

    def purge(self, route: str, *, target: str | None = None) -> int:
        return self.inner.purge(route, target=target)

    def request_kill(self, job_id: str) -> bool:
        return self.inner.request_kill(job_id)

    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        return self.inner.claim(route, worker_id, lease, limit)

    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        return self.inner.renew(worker_id, leases, lease)

    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = "running") -> bool:
        return self.inner.finish(job_id, token, outcome, expect=expect)

    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        return self.inner.expired_leases(now, limit)

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        # Not abstract, but a store that does not expire records by itself must sweep them.
        return self.inner.delete_expired(now, limit)

    def register_worker(self, info: WorkerInfo) -> None:
        self.inner.register_worker(info)

    def heartbeat(self, worker_id: str, state: str) -> bool:
        return self.inner.heartbeat(worker_id, state)

    def unregister_worker(self, worker_id: str) -> None:
        self.inner.unregister_worker(worker_id)

    def workers(self) -> list[WorkerInfo]:
        return self.inner.workers()

    def list_jobs(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 1000) -> list[JobRecord]:
        return self.inner.list_jobs(route=route, state=state, dead=dead, limit=limit)

    def counts(self) -> dict[tuple[str, str], int]:
        return self.inner.counts()

    def close(self) -> None:
        self.inner.close()


def plus(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def hourly_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    found = dict(backends._entry_points())
    entry = type(next(iter(found.values())))(name="hourly", value=f"{__name__}:Hourly", group=backends.GROUP)
    monkeypatch.setattr(backends, "_entry_points", lambda: {**found, "hourly": entry})


class TestAnHourlyBackendPassesTheProtocolPart(ProtocolSuite):
    @pytest.fixture
    def backend(self, hourly_registered: None, tmp_path: Path) -> BackendUnderTest:
        return BackendUnderTest(name="hourly", url=str(tmp_path / "hourly.db"), label="required roles only")


def test_the_optional_roles_of_a_class_are_what_it_implements() -> None:
    assert (Hourly.supports_keys, Hourly.supports_settings, Hourly.keeps_stats) == (False, False, False)

    class WithSettings(Hourly):
        def get_setting(self, name: str) -> str | None:
            return self.inner.get_setting(name)

        def put_setting(self, name: str, value: str | None) -> None:
            self.inner.put_setting(name, value)

    class HalfStats(Hourly):  # counters it cannot read back are no counters
        def add_stats(self, samples: Sequence[Any]) -> None:
            pass

    assert (WithSettings.supports_keys, WithSettings.supports_settings, WithSettings.keeps_stats) == \
        (False, True, False)
    assert not HalfStats.keeps_stats
    assert not Persistence.supports_keys and SQLitePersistence.supports_keys


def test_every_shipped_backend_plays_every_role_it_used_to_declare() -> None:
    for entry in backends.installed():
        cls = backends.load(entry.name)
        assert all(getattr(cls, flag) for flag in IMPLEMENTED_BY), entry.name


def test_a_backend_that_still_sets_the_flags_loads_and_is_told_when_they_are_wrong(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Old(SQLitePersistence):  # the lines every backend had: true, so nothing to say
            supports_keys = True
            supports_settings = True
            keeps_stats = True

    assert Old.supports_keys and Old.supports_settings and Old.keeps_stats
    with pytest.warns(DeprecationWarning, match=r"sets supports_keys = True, .* it does not, so "
                                                r"supports_keys is False\. Remove the line\.") as said:
        class Claims(Hourly):
            supports_keys = True

    assert not Claims.supports_keys and len(said) == 1 and "Claims" in str(said[0].message)
    with pytest.warns(DeprecationWarning, match="sets keeps_stats = False"):
        class OptsOut(SQLitePersistence):
            keeps_stats = False

    assert OptsOut.keeps_stats  # ignored: the class implements add_stats and stats


def test_the_core_refuses_what_a_backend_leaves_out_in_one_line(hourly_registered: None, tmp_path: Path) -> None:
    queue = SkunkQueue("q", backend="hourly", conn_url=str(tmp_path / "q.db"))

    add = queue.event(routes=["r"])(plus)
    with pytest.raises(ConfigurationError, match="does not support idempotency keys") as caught:
        add.fire(1, 2, key="once")
    assert "\n" not in str(caught.value)
    assert add.fire(1, 2).id  # what it plays works
    queue.close()


def test_every_role_is_proved_by_a_part_of_the_kit() -> None:
    parts = [base for base in ConformanceSuite.__bases__]
    assert set(parts) == set(PROVES), "every part of ConformanceSuite says which roles it proves"
    proved = {role for proves in PROVES.values() for role in proves}
    assert proved == set(roles.ROLES)


def test_the_docs_role_table_names_each_role_with_the_parts_that_prove_it() -> None:
    text = (ROOT / "docs" / "writing-a-backend.md").read_text()
    table = text.split("<!-- roles:")[1].split("<!-- /roles -->")[0]
    rows = {}
    for line in table.strip().splitlines()[3:]:  # the marker's end, the head, the rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        role = re.findall(r"`(\w+)`", cells[0])[0]
        rows[role] = set(re.findall(r"`(\w+Suite)`", cells[-1]))
    expected = {role.__name__: {part.__name__ for part, proves in PROVES.items() if role in proves}
                for role in roles.ROLES}
    assert rows == expected
