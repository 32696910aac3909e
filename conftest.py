"""Suite-wide rules that let `make test` run the tests in parallel processes (pytest-xdist).

Every xdist worker is a pytest session of its own: the session-scoped server
fixtures (redis-server, mongod, the FoundationDB stand-in) start once per
worker on free loopback ports with their own temporary directories, and each
test uses queue names of its own. What remains shared between the processes
is handled here:

- the default SQLite path (``$XDG_DATA_HOME/skunkqueue/skunkqueue.db``), which
  a ``skunq`` started without ``--url`` would use: each process of the run
  gets an empty data directory of its own, so no test touches another's (or
  the developer's) default queue;
- a fixture that must not be set up in every worker at once: a test using
  one listed in :data:`GROUPS` is sent, with all tests using it, to a
  single worker (``--dist loadgroup``).

It also marks ``slow`` every test that needs a server or a browser, so that
``make test-fast`` (``-m "not slow"``) is the inner loop: everything on the
embedded SQLite backend and every test that needs no server. A test needs one
when it uses a fixture named ``*_server`` or ``*_cluster`` (name a new
backend's server fixtures so), one in :data:`SERVER_FIXTURES`, or is
parametrized with the name of a backend other than SQLite (the reliability
suite's ``target``, the monitor's ``store``).
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import shutil
import tempfile

import pytest

# fixture name -> xdist group. One Chromium for the browser tests, not one per worker: two
# browsers rendering at once on a 2-core machine only slow each other's page waits. The packaging
# tests' wheels are built once, in the one process that installs them into fresh venvs.
GROUPS = {"browser": "chromium", "built_wheels": "packaging"}

# Server and browser fixtures whose names do not end in _server or _cluster.
SERVER_FIXTURES = {"start_redis", "mongo", "mongo_standalone", "mongo_replset", "mongo_auth", "make_mongo",
                   "real_cluster_file", "fdb_root", "postgres", "make_postgres", "browser", "sentinels",
                   "locked_redis"}
EMBEDDED_BACKENDS = {"sqlite"}

_data_home: str | None = None

# --durations-cpu: nodeid -> CPU seconds (this process and its descendants: pools, workers, servers).
_cpu_started: dict[str, tuple[float, float]] = {}
_cpu_used: dict[str, tuple[float, float]] = {}


def _server_backends() -> set[str]:
    names = {ep.name for ep in importlib.metadata.entry_points(group="skunkqueue.backends")}
    return names - EMBEDDED_BACKENDS


def _needs_server(item: pytest.Item, server_backends: set[str]) -> bool:
    names = getattr(item, "fixturenames", ())
    if any(n in SERVER_FIXTURES or n.endswith(("_server", "_cluster")) for n in names):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(isinstance(v, str) and v in server_backends
                                        for v in callspec.params.values())


def pytest_configure(config: pytest.Config) -> None:
    global _data_home
    _data_home = tempfile.mkdtemp(prefix="skunq-test-data-")
    os.environ["XDG_DATA_HOME"] = _data_home  # inherited by every worker process a test starts
    os.environ.pop("SKUNQ_SQLITE_PATH", None)  # it would override the default path for all of them


def pytest_unconfigure(config: pytest.Config) -> None:
    if _data_home:
        shutil.rmtree(_data_home, ignore_errors=True)


# Tests that spend nearly all of their wall time waiting: on a schedule's slots, on leases running
# out, on a stopped or killed pool, on a failover (a sixth of a core or less while they run, 5-60 s
# each; 7 December, `make test --durations-cpu=0`: 2,000 s of wall time for 220 CPU-s in all).
# Marked `waiting`: scripts/run-tests runs them in processes of their own beside the CPU-bound
# rest, so that they no longer hold one of its six processes idle. The first match of a test id.
WAITING_TESTS = [
    "::test_a_pool_whose_clock_is_a_minute_ahead_fires_nothing_early_and_skips_nothing",
    "::test_every_slot_fires_once_with_three_schedulers_and_a_crash",
    "::test_a_fault_mix_loses_nothing_and_runs_nothing_twice_at_once",
    "::test_slots_of_intervals_that_are_not_whole_seconds_fire_once",
    "::test_a_job_blocking_the_loop_keeps_leases_and_meets_its_time_limit",
    "::test_sigkill_leaves_no_orphans_and_a_new_pool_finishes_the_job",
    "::test_a_promotion_under_load",
    "::test_a_paused_primary_that_comes_back_after_the_failover",
    "::test_a_stopped_pool_never_lets_a_job_run_twice_at_once",
    "::test_sigkilled_async_jobs_are_handed_out_again",
    "::test_kill_then_lost_lease_never_runs_again",
    "::test_attempts_of_killed_workers_show_as_lost",
    "::test_server_restarts_lose_no_job",
    "::test_a_stale_attempt_cannot_overwrite_through_the_fencing_guard",
    "::test_a_blocked_key_does_not_delay_other_keys",
    "::test_postgres_half_open_connection",
    "::test_kill_of_a_prefetched_job_means_it_never_runs",
    "::test_a_job_its_worker_gave_up_on_is_charged_when_that_worker_dies",
    "::test_paused_worker_cannot_overwrite_the_takeover",
    "::test_workers_and_producers_carry_on_through_a_failover",
    "::test_unreachable_server_fails_fast_and_clearly",
    "::test_a_worker_sigkilled_inside_the_transaction_leaves_all_or_nothing",
    "::test_a_skewed_worker_steals_no_live_lease",
    "::test_a_job_holding_the_gil_keeps_its_lease",
    "::test_the_worker_of_a_stopped_pool_claims_nothing",
    "::test_a_route_name_with_spaces_keeps_its_leases",
    "::test_kill_stops_a_job_that_swallows_interrupts",
    "::test_the_time_limit_is_hard_for_a_job_that_ignores_interrupts",
    "::test_rolling_out_and_rotating_the_key_refuses_no_legitimate_job",
    "::test_recycling_under_kill_9_of_replacements_and_a_signal_to_the_whole_group",
    "::test_workers_marks_a_sigkilled_busy_worker_stale_then_it_drops_out",
    "::test_work_against_an_unreachable_server_gives_up_with_the_address_and_no_traceback",
    "::test_a_slow_store_is_polled_less_often",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    server_backends = _server_backends()
    for item in items:
        if _needs_server(item, server_backends):
            item.add_marker(pytest.mark.slow)
        if any(part in item.nodeid for part in WAITING_TESTS):
            item.add_marker(pytest.mark.waiting)
        for fixture, group in GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break


# How long the longest tests take (seconds of wall time in `make test`'s parallel pass, six
# processes on the 2-core machine, 7 December): the first of these that a test's id contains.
# Tests are handed to the xdist processes in order, so the long ones go first (longest first) and
# no process is left with one at the end while the others stand idle; the rest keep pytest's
# order. Figures from the run's --durations.
LONG_TESTS: list[tuple[str, float]] = [
    ("test_workflows_under_sigkill_and_sigstop[mongodb]", 145),
    ("FDBStandInConformance::test_a_large_group_and_its_callback", 105),
    ("test_a_fault_mix_loses_nothing_and_runs_nothing_twice_at_once", 65),
    ("test_bench_smoke.py::test_benchmark_tiny_sqlite", 55),  # 30 s alone, mostly asleep
    ("MongoStandaloneConformance::test_one_finish_ends_or_releases_thousands_of_dependents_once", 44),
    ("test_bench_smoke.py::test_peers_tiny_round_every_library", 30),
    ("test_a_promotion_under_load[async-lagging]", 39),
    ("FDBStandInConformance::test_processes_committing_rows_and_jobs_match_one_to_one", 39),
    ("test_web_scan_budget.py::test_a_filter_matching_almost_nothing_answers_in_bounded_time", 34),
    ("::test_a_pool_whose_clock_is_a_minute_ahead_fires_nothing_early_and_skips_nothing", 32),
    ("::test_group_signals_never_hang_the_pool", 30),
    ("::test_workflows_under_sigkill_and_sigstop", 28),
    ("::test_every_slot_fires_once_with_three_schedulers_and_a_crash", 25),
    ("::test_processes_committing_rows_and_jobs_match_one_to_one", 20),
    ("::test_a_large_group_and_its_callback", 20),
    ("::test_slots_of_intervals_that_are_not_whole_seconds_fire_once", 20),
    ("::test_sigkill_leaves_no_orphans_and_a_new_pool_finishes_the_job", 15),
    ("::test_rolling_out_and_rotating_the_key_refuses_no_legitimate_job", 15),
    ("FDBStandInConformance::test_a_page_costs_the_same_however_many_jobs_come_before_it", 15),
    ("::test_a_chord_callback_runs_once_when_a_pool_is_killed_mid_group", 12),
    ("::test_a_job_blocking_the_loop_keeps_leases_and_meets_its_time_limit", 11),
    ("::test_kill_then_lost_lease_never_runs_again", 10),
    # A fresh venv and pip install, then a pool: 9-10 s on an idle machine.
    ("test_docs_getting_started.py::test_every_block_of_getting_started_runs", 10),
]


def _expected_seconds(nodeid: str) -> float:
    return next((seconds for part, seconds in LONG_TESTS if part in nodeid), 0.0)


# After pytest has grouped the tests by their fixtures' parameters (and after the marks above).
@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_long_tests_first(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return  # not an xdist process: in one process the order would change nothing but set-ups
    items.sort(key=lambda item: -_expected_seconds(item.nodeid))  # stable: the rest keep their order


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--durations-cpu", type=int, default=None, metavar="N",
                     help="list the N tests that used the most CPU time (the test process and the pools, "
                          "workers and servers running under it; 0 for all): on a shared machine CPU "
                          "time, unlike wall time, hardly depends on what else runs")


_TICKS = os.sysconf("SC_CLK_TCK")


def _live_descendants_cpu(pid: int) -> float:
    """CPU seconds so far of ``pid``'s live descendants (and of the children they reaped).

    A server a session fixture started (mongod, redis-server, the FDB stand-in) is reaped only when
    the session ends, so RUSAGE_CHILDREN alone charged its whole life to the last test of each xdist
    process (CI's "top consumers" were three such last tests, 116-144 s each, ~1-2 s alone).
    Counting live descendants too makes the figure continuous: what a server does during a test is
    that test's. A server that daemonizes (PostgreSQL through pg_ctl) leaves the tree: not counted.
    """
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:  # a child belongs to the thread that forked it
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                children = [int(c) for c in fh.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone: reaped, so now in RUSAGE_CHILDREN
            # utime, stime, cutime, cstime: fields 14-17 of stat(5); fields[0] is field 3.
            total += sum(int(f) for f in fields[11:15]) / _TICKS + _live_descendants_cpu(child)
    return total


def _cpu_now() -> tuple[float, float]:
    """(this process, its descendants: reaped or alive) CPU seconds."""
    while True:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        alive = _live_descendants_cpu(os.getpid())
        again = resource.getrusage(resource.RUSAGE_CHILDREN)
        if (again.ru_utime, again.ru_stime) == (reaped.ru_utime, reaped.ru_stime):
            break  # no child was reaped while the tree was read: neither missed nor counted twice
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime + alive


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.config.getoption("durations_cpu", None) is not None:  # else no figure in any report
        _cpu_started[item.nodeid] = _cpu_now()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    if call.when == "teardown" and item.nodeid in _cpu_started:
        (own0, children0), (own1, children1) = _cpu_started.pop(item.nodeid), _cpu_now()
        # Travels with the report to the xdist controller, which lists the figures.
        outcome.get_result().user_properties.append(("cpu_s", (own1 - own0, children1 - children0)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        for name, value in report.user_properties:
            if name == "cpu_s":
                _cpu_used[report.nodeid] = (float(value[0]), float(value[1]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    count = config.getoption("durations_cpu", None)
    if count is None or not _cpu_used:
        return
    ranked = sorted(_cpu_used.items(), key=lambda kv: -sum(kv[1]))
    own = sum(o for o, _ in _cpu_used.values())
    children = sum(c for _, c in _cpu_used.values())
    terminalreporter.write_sep("=", f"CPU time: {own + children:.1f} s in {len(ranked)} tests (test processes "
                                    f"{own:.1f} s, their children {children:.1f} s)"
                                    + (f", the {count} most" if count else ""))
    for nodeid, (own, children) in ranked[:count or None]:
        terminalreporter.write_line(f"{own + children:8.2f}s cpu ({own:6.2f} test, {children:6.2f} children)  {nodeid}")
