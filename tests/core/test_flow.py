"""Flow control's rules in core (skunkqueue.flow), `skunq pause/resume/limit/limits`, and a pool that
refuses what its store cannot enforce. The behaviour on each store is the kit's FlowControlSuite."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from skunkqueue import Limit, SkunkQueue, flow
from skunkqueue.cli import main
from skunkqueue.errors import ConfigurationError
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.pool import WorkerPool
from skunkqueue.testing import jobs
from skunkqueue.testing.suite_flow import most_in_window
from skunkqueue.testing.suite_support import declare
from skunkqueue.worker import WorkerConfig


@pytest.mark.parametrize(("text", "count", "period"), [
    ("100/m", 100, 60.0), ("50/s", 50, 1.0), ("10/h", 10, 3600.0), ("1/d", 1, 86400.0),
    ("5/10s", 5, 10.0), (" 7 / 2 min ", 7, 120.0), ("3/0.5s", 3, 0.5)])
def test_rates_parse(text: str, count: int, period: float) -> None:
    rate = flow.parse_rate(text)
    assert (rate.count, rate.period) == (count, period)
    assert flow.parse_rate(str(rate)) == rate


@pytest.mark.parametrize("text", ["100", "/s", "0/s", "-1/s", "5/0s", "5/week", "five/m", "", None, 5, "1e3/s"])
def test_bad_rates_get_one_line(text: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        flow.parse_rate(text)
    assert "\n" not in str(info.value) and "rate" in str(info.value)


def test_gcra_never_lets_more_than_burst_plus_rate_through_any_window() -> None:
    # Random arrivals against rate "10/s" with bursts 1..4: the admitted starts obey the documented bound.
    rng = random.Random(7)
    for burst in (1, 2, 4):
        interval, tat, admitted, now = 0.1, None, [], 1000.0
        for _ in range(3000):
            now += rng.expovariate(30.0)
            ok, value = flow.gcra(tat, now, interval, burst)
            if ok:
                tat = value
                admitted.append(now)
            else:
                assert value > now  # the time it names is later
        assert len(admitted) > 500
        for window in (0.05, 0.3, 1.0, 5.0):
            assert most_in_window(admitted, window) <= burst + window / interval + 1e-9
        assert most_in_window(admitted, 1e-6) <= burst


def test_limit_keys_are_namespaced_by_function_and_safe_for_any_text() -> None:
    limit = Limit(key=lambda tenant: tenant, concurrency=1)
    nasty = ['a", "b', "{x}:$.y", "a", "ä\n", ""]
    keys = [limit.key_for("m:f", (value,), {}) for value in nasty]
    assert len(set(keys)) == len(keys)
    assert [json.loads(key) for key in keys] == [["m:f", value] for value in nasty]
    assert limit.key_for("m:g", ("a",), {}) != limit.key_for("m:f", ("a",), {})
    assert Limit(concurrency=1).key_for("m:f", (1, 2), {}) == '["m:f", ""]'
    assert limit.key_for("m:f", (3,), {}) == '["m:f", "3"]'
    with pytest.raises(ConfigurationError, match="bytes long"):
        limit.key_for("m:f", ("x" * (flow.MAX_KEY_BYTES + 1),), {})


def test_fire_puts_the_limit_and_priority_in_the_record(tmp_path: Path) -> None:
    queue = SkunkQueue("flow-fields", backend="sqlite", conn_url=str(tmp_path / "q.db"))
    job = declare(queue, jobs.add, priority=-3,
                  limit=Limit(key=lambda first, second: first, concurrency=2, rate="30/m", burst=5))
    plain = queue.get(job.fire(1, 2).id)
    urgent = queue.get(job.fire(4, 2, priority=9).id)
    assert plain is not None and urgent is not None
    assert (plain.priority, urgent.priority) == (-3, 9)
    assert (plain.limit_key, plain.limit_concurrency, plain.limit_interval, plain.limit_burst) == (
        f'["{job.name}", "1"]', 2, 2.0, 5)
    assert urgent.limit_key == f'["{job.name}", "4"]'
    many = job.fire_many([(5, 6), (7, 8)], priority=4)
    assert [queue.get(h.id).priority for h in many] == [4, 4]  # type: ignore[union-attr]
    periodic_copy = job.on(queue)
    assert (periodic_copy.priority, periodic_copy.limit) == (job.priority, job.limit)
    queue.close()


@pytest.mark.parametrize(("text", "burst"), [
    ("20/s", 1), ("100/s", 1), ("100/m", 1), ("5/10s", 1), ("300/s", 3), ("1000/s", 10), ("1000000/s", 10_000)])
def test_a_rate_given_without_a_burst_may_start_10_ms_worth_at_once(text: str, burst: int) -> None:
    assert flow.default_burst(flow.parse_rate(text)) == burst
    route_limit = flow.make_route_limit(None, text, None)
    assert route_limit is not None and route_limit.burst == burst
    assert Limit(rate=text).fields("f", (), {})["limit_burst"] == burst
    assert flow.make_route_limit(None, text, 2) == flow.RouteLimit(None, flow.parse_rate(text), 2)  # given: kept


def test_one_claim_under_a_fast_route_rate_takes_the_default_burst_and_no_more(tmp_path: Path) -> None:
    """A route rate of 1000/s must not turn a claim of 16 into a claim of 1 (it did with a burst of 1:
    a limit set but never reached cost a prefetching worker most of its batching), nor let 16 through."""
    queue = SkunkQueue("flow-burst", backend="sqlite", conn_url=str(tmp_path / "q.db"))
    add = declare(queue, jobs.add, route="api")
    add.fire_many([(n, n) for n in range(40)])
    queue.limit("api", rate="1000/s")
    claimed = queue.persistence.claim("api", "w", 30, 16)
    assert len(claimed) == 10, f"{len(claimed)} claimed at once under 1000/s (default burst 10)"
    queue.close()


def test_skunq_pause_resume_limit_and_limits(tmp_path: Path) -> None:
    url = str(tmp_path / "q.db")
    queue = SkunkQueue("flow-cli", backend="sqlite", conn_url=url)
    add = declare(queue, jobs.add, route="api")
    for n in range(3):
        add.fire(n, n)
    base = ["-q", "flow-cli", "--url", url]
    runner = CliRunner()
    paused = runner.invoke(main, ["pause", *base, "-r", "api"])
    assert paused.exit_code == 0 and "api: paused" in paused.output
    limited = runner.invoke(main, ["limit", *base, "-r", "api", "--concurrency", "20", "--rate", "50/s"])
    assert limited.exit_code == 0 and "concurrency=20 rate=50/s" in limited.output, limited.output
    shown = runner.invoke(main, ["limits", *base])
    assert shown.exit_code == 0
    [header, row] = shown.output.strip().splitlines()
    assert header.split() == ["route", "paused", "concurrency", "rate", "burst", "waiting"]
    assert row.split() == ["api", "yes", "20", "50/s", "1", "3"]
    as_json = json.loads(runner.invoke(main, ["limits", *base, "--json"]).output)
    assert as_json == [{"route": "api", "paused": True, "waiting": 3, "concurrency": 20, "rate": "50/s", "burst": 1}]
    assert runner.invoke(main, ["resume", *base, "-r", "api"]).exit_code == 0
    assert runner.invoke(main, ["limit", *base, "-r", "api"]).exit_code == 0  # neither: no limit any more
    assert json.loads(runner.invoke(main, ["limits", *base, "--json"]).output)[0] == {
        "route": "api", "paused": False, "waiting": 0, "concurrency": None, "rate": None, "burst": None}
    bad = runner.invoke(main, ["limit", *base, "-r", "api", "--rate", "lots"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    queue.close()


def test_a_pool_refuses_a_limit_its_store_cannot_enforce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bundled stores all enforce limits; one that did not is played by SQLite with its flags off.
    queue = SkunkQueue("flow-refuse", backend="sqlite", conn_url=str(tmp_path / "q.db"))
    job = declare(queue, jobs.add, route="api", limit=Limit(concurrency=2))  # held: declarations are weak
    monkeypatch.setattr(SQLitePersistence, "supports_limits", False)
    config = WorkerConfig(queue="flow-refuse", route="api", backend="sqlite", url=str(tmp_path / "q.db"))
    pool = WorkerPool(config, ["api"])
    with pytest.raises(ConfigurationError) as info:
        pool.run()
    message = str(info.value)
    assert "supports_limits" in message and "Limit(concurrency=2)" in message and "\n" not in message
    assert all(child.process is None for child in pool.children), "workers started anyway"
    assert job.limit is not None
    queue.close()


def prioritised(message: str, priority: str = "normal") -> str:
    return f"{priority}: {message}"


def test_a_job_with_its_own_priority_parameter_is_not_silently_given_the_queues(tmp_path: Path) -> None:
    queue = SkunkQueue("flow-names", backend="sqlite", conn_url=str(tmp_path / "q.db"))
    job = queue.event(routes=["r"])(prioritised)
    with pytest.raises(ConfigurationError, match="parameter named priority") as info:
        job.fire("hello", priority=5)
    assert "\n" not in str(info.value)
    record = queue.get(job.fire("hello", "high").id)  # positionally: the function's own argument
    assert record is not None and record.priority == 0
    queue.close()
