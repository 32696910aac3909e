"""The ``skunq`` command line."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import click

from skunkqueue import backends as backend_registry
from skunkqueue import (
    dependencies,
    forkserver,
    headers,
    hooks,
    interpreter,
    logformat,
    prefetch,
    serializer,
    signing,
    trust,
)
from skunkqueue import periodic as schedules  # the command group is named periodic
from skunkqueue.config import resolve as resolve_store
from skunkqueue.errors import SkunkQueueError
from skunkqueue.hooks import plugin_manager
from skunkqueue.persistence.sqlite import resolve_path
from skunkqueue.pool import DEFAULT_GRACE, HEARTBEAT_EVERY, WorkerPool
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import STATES, JobRecord
from skunkqueue.urls import redact
from skunkqueue.worker import WorkerConfig

# `skunq workers` calls a worker stale once two heartbeats in a row are missing:
# one late heartbeat (a slow store, a busy machine) is not yet news.
STALE_AFTER = 2 * HEARTBEAT_EVERY


def _store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--backend/--url/--db for every command. Not click's envvar: the SKUNQ_* variables are read by
    skunkqueue.config, the one rule the library and the monitor follow too (an explicit --url must
    not be paired with another backend's SKUNQ_BACKEND)."""
    func = click.option("--db", help="Database name or number. [env var: SKUNQ_DB]")(func)
    func = click.option("--url", help="Backend address: a URL whose scheme names the backend (redis://, "
                                      "rediss://, redis+cluster://, unix://, mongodb://, mongodb+srv://, "
                                      "sqlite:///PATH, fdb:///CLUSTER_FILE...), or with --backend also "
                                      "host:port or a file path. [env var: SKUNQ_URL]")(func)
    func = click.option("--backend", help="Backend name (see `skunq backends`); default: the one --url's "
                                          "scheme names, else sqlite. [env var: SKUNQ_BACKEND]")(func)
    return func


def _need_queue(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    if not value:
        raise click.UsageError("Name a queue: -q QUEUE, or set SKUNQ_QUEUE.", ctx=ctx)
    return value


def _queue_option(func: Callable[..., Any]) -> Callable[..., Any]:
    # Not required=True: click would mark -q "[required]" although SKUNQ_QUEUE does as well.
    return click.option("-q", "--queue", envvar="SKUNQ_QUEUE", show_envvar=True, callback=_need_queue,
                        help="Queue name.")(func)


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Our own errors become one clear line (exit 1), never a traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SkunkQueueError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def _open(queue: str, backend: str | None, url: str | None, db: str | None) -> SkunkQueue:
    return SkunkQueue(queue, backend=backend, conn_url=url, dbname=db)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@click.group()
@click.version_option(package_name="skunkqueue")
def main() -> None:
    """SkunkQueue: task scheduling for humans who use Python.

    \b
    Every option can come from the environment instead:
    SKUNQ_QUEUE, SKUNQ_BACKEND, SKUNQ_URL, SKUNQ_DB (all commands),
    SKUNQ_IMPORT, SKUNQ_LOG_LEVEL (skunq work), SKUNQ_SQLITE_PATH (where the
    default sqlite backend keeps its file when --url is not given).

    \b
    The store: --backend/--url if given, else SKUNQ_BACKEND/SKUNQ_URL, else the
    embedded sqlite file; the same rule as SkunkQueue('q') in your code, so
    producers and workers started in one shell share one store. A URL alone
    names its backend by its scheme.
    """


def _prefetch(value: str | int) -> int:
    try:
        return prefetch.parse(str(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--prefetch takes "), param_hint="'--prefetch'") from None


@main.command()
@_queue_option
@click.option("-r", "--route", "route_opts", multiple=True, help="Route to work on (repeatable).")
@click.argument("more_routes", nargs=-1)
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes per route.")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Directory to import job modules from (repeatable; the current one is always used).")
@click.option("--import", "imports", multiple=True, envvar=trust.IMPORT_ENV, show_envvar=True,
              help="Job module to import at start (repeatable, or several separated by spaces or commas). "
                   "With it, workers import nothing else; without it, only modules under the current "
                   "directory and --path.")
@click.option("--lease", default=30.0, show_default=True, type=click.FloatRange(0.5, 3600),
              help="Seconds a job stays claimed without a renewal before another worker may take it.")
@click.option("--prefetch", default="auto", show_default=True, metavar="auto|N",
              callback=lambda ctx, param, value: _prefetch(value),
              help="Jobs claimed per round trip: N (1-1000), or auto: one until the recent jobs "
                   f"prove short, then as many as start within {prefetch.HELD_WAIT * 1000:g} ms by "
                   f"their pace (at most {prefetch.AUTO_MAX}).")
@click.option("--allow-pickle", is_flag=True,
              help="Run jobs of queues created with serializer='pickle' (only if nobody untrusted can write "
                   "to the store: unpickling runs code).")
@click.option("--grace", default=DEFAULT_GRACE, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds an interrupted job (SIGINT, kill, time limit, lost lease) gets to stop before "
                   "its worker is killed; a second SIGINT kills at once.")
@click.option("--async-concurrency", default=1, show_default=True, type=click.IntRange(1, 10000),
              help="async def jobs each worker runs at once on its event loop (1: one job at a time).")
@click.option("--no-schedule", is_flag=True,
              help="Do not fire the periodic jobs declared in the imported modules (other pools do).")
@click.option("--burst", is_flag=True,
              help="Run until the routes have no due job, then exit 0 (jobs held back by a limit count as "
                   "due; jobs due later or on a paused route stay queued; periodic jobs are not fired).")
@click.option("--max-jobs-per-child", type=click.IntRange(1, None), default=None,
              help="Replace a worker process after it ran this many jobs (after its current job: "
                   "nothing lost, nothing charged).")
@click.option("--max-memory-per-child", type=click.FloatRange(1, None), default=None, metavar="MB",
              help="Replace a worker process once, after a job, its resident memory exceeds MB megabytes.")
@click.option("--connect-attempts", default=5, show_default=True, type=click.IntRange(1, 100),
              help="Tries to reach the backend at start-up (with back-off) before giving up.")
@click.option("--log-level", envvar="SKUNQ_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", envvar=logformat.FORMAT_ENV, default="text", show_default=True,
              type=click.Choice(logformat.FORMATS),
              help="text lines, or json: one object per line (a job's carries job_id, function, route, "
                   "attempt, outcome, duration, and trace_id when the job has one).")
@_store_options
@_friendly
def work(queue: str, route_opts: tuple[str, ...], more_routes: tuple[str, ...], concurrency: int,
         paths: tuple[str, ...], imports: tuple[str, ...], lease: float, prefetch: int, allow_pickle: bool,
         grace: float, async_concurrency: int, no_schedule: bool, burst: bool,
         max_jobs_per_child: int | None, max_memory_per_child: float | None,
         connect_attempts: int, log_level: str, log_format: str,
         backend: str | None, url: str | None, db: str | None) -> None:
    """Start a WorkerPool: one worker process per route listed.

    \b
    skunq work -q QUEUE -r ROUTE [ROUTE ...]
    """
    routes = list(route_opts) + list(more_routes)
    if not routes:
        raise click.UsageError("Name at least one route: skunq work -q QUEUE -r ROUTE [ROUTE ...]")
    store = resolve_store(backend, url, db)
    backend, url, db = store.backend, store.url, store.db
    backend_registry.load(backend)  # an unknown name fails here with the list of installed ones
    found = backend_registry.entry_point(backend)
    os.environ["SKUNQ_LOG_LEVEL"] = log_level.upper()
    os.environ[logformat.FORMAT_ENV] = log_format  # the pool's workers log the same way
    logformat.configure(log_level.upper(), log_format)
    # The fork server skunq forked at start (skunkqueue.command), if any: it imports the store's
    # backend now, while this process goes on, as every worker does before its jobs.
    forks = forkserver.take()
    if forks is not None:
        forks.preload(([found.value.partition(":")[0]] if found is not None else [])
                      + (["skunkqueue.async_worker"] if async_concurrency > 1 else []))
    modules = trust.split_imports(imports)
    config = WorkerConfig(queue=queue, route=routes[0], backend=backend, url=url, db=db, lease=lease,
                          prefetch=prefetch, paths=[os.path.abspath(p) for p in paths],
                          connect_attempts=connect_attempts,
                          allow_pickle=allow_pickle, imports=modules, async_concurrency=async_concurrency,
                          burst=burst, max_jobs=max_jobs_per_child, max_memory_mb=max_memory_per_child,
                          # looked up once here, not in every worker (see WorkerConfig.entry)
                          entry=found.value if found is not None else None,
                          plugins=[[name, value] for name, value in hooks.entries()])
    if modules:
        # Import them here as well, so that a typo fails at once with one line
        # instead of in every worker, restarted over and over by the pool.
        interpreter.add_roots([os.getcwd(), *config.paths])
        trust.import_allowed(modules)
    where = str(resolve_path(url)) if backend == "sqlite" else redact(url)
    logging.getLogger("skunkqueue.pool").info(
        "pool: queue %s routes %s on %s %s; jobs from %s", queue, " ".join(routes), backend, where,
        f"--import {' '.join(modules)}" if modules else "modules under " + ", ".join([os.getcwd(), *config.paths]))
    sys.exit(WorkerPool(config, routes, concurrency, grace=grace, schedule=not no_schedule, forks=forks).run())


@main.command("backends")
def list_backends() -> None:
    """List installed backends and the distribution that provides each."""
    for entry in backend_registry.installed():
        click.echo(f"{entry.name:10} {entry.distribution:20} {entry.value}")


@main.command()
@_queue_option
@_store_options
@_friendly
def workers(queue: str, backend: str | None, url: str | None, db: str | None) -> None:
    """List the workers of a queue; `stale` marks one whose heartbeats stopped.

    A worker sends a heartbeat every few seconds. One silent for longer than two
    heartbeats is shown as `stale` with the time since its last one (its last
    reported state may be a lie: a SIGKILLed busy worker never says so); after
    15 s of silence it is dropped from the registry.
    """
    rows = _open(queue, backend, url, db).workers()
    if not rows:
        click.echo(f"No live workers on queue {queue}.")
    now = time.time()
    for w in rows:
        age = now - w.last_seen
        state = f"stale ({age:.0f}s since last heartbeat)" if age > STALE_AFTER else w.state
        click.echo(f"{w.id}  route={w.route} host={w.host} pid={w.pid} state={state} "
                   f"last_seen={_when(w.last_seen)}")


def _decoded(data: bytes | None, record: JobRecord, what: str) -> Any:
    """A payload or result for display; never unpickled (that would run code from the store)."""
    if data is None:
        return None
    if record.serializer != "json":
        return f"<{record.serializer}, {len(data)} bytes, not decoded>"
    try:
        return serializer.loads(data, "json", what=what)
    except SkunkQueueError as exc:
        return f"<undecodable: {exc}>"


def _job_fields(record: JobRecord) -> dict[str, Any]:
    try:
        args = _decoded(headers.arguments(record.payload), record, "job arguments")
    except SkunkQueueError as exc:
        args = f"<undecodable: {exc}>"

    if isinstance(args, list) and len(args) == 2:
        args = {"args": args[0], "kwargs": args[1]}
    return {
        "id": record.id, "queue": record.queue, "function": record.func, "route": record.route,
        "state": record.state, "dead": record.dead, "arguments": args,
        "signed": signing.body(record.payload) != record.payload, "signature": signing.signature(record),
        "headers": headers.of(record),
        "result": _decoded(record.result, record, "result"), "error": record.error,
        "attempts": record.attempts, "retries": record.retries, "token": record.token,
        "owner": record.owner, "target": record.target, "fired": record.created, "due": record.due,
        "started": record.started, "finished": record.finished, "timeout": record.timeout,
        "history": record.history, "history_dropped": record.history_dropped,
    }


def _history_lines(history: list[dict[str, Any]], dropped: int) -> list[str]:
    """``skunq job``'s table of attempts, oldest first; each error's traceback is in ``--json``."""
    lines = [f"{'attempt':>7}  {'outcome':8} {'started':19} {'took':>9}  {'worker':30} error"]
    if dropped:
        lines.append(f"{'':7}  ({dropped} earlier attempt(s) dropped: the last {len(history)} are kept)")
    for entry in history:
        started, finished = entry.get("started"), entry.get("finished")
        took = f"{finished - started:.3f} s" if isinstance(started, (int, float)) and \
            isinstance(finished, (int, float)) else "-"
        error = f"{entry.get('error_type')}: {entry.get('message', '')}" if entry.get("error_type") else ""
        lines.append(f"{entry.get('attempt', '?')!s:>7}  {entry.get('outcome', '?')!s:8} {_when(started):19} "
                     f"{took:>9}  {entry.get('worker') or '-'!s:30} {error}".rstrip())
    return lines


@main.command("job")
@click.argument("job_id")
@_queue_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (times in epoch seconds).")
@_store_options
@_friendly
def job_command(job_id: str, queue: str, as_json: bool, backend: str | None, url: str | None, db: str | None) -> None:
    """Show one job: function, route, state, arguments, result or error, attempts, owner, times,
    and its history: each attempt's worker, outcome, times and error (the last 20)."""
    store = _open(queue, backend, url, db)
    record = store.get(job_id)
    if record is None:
        raise click.ClickException(f"No job {job_id} on queue {queue} (never fired, or expired).")
    fields = _job_fields(record)
    dependents = store.persistence.dependents(job_id)
    if record.parents or record.workflow or dependents:
        # Workflows: who it waits for (or waited for), and who waits for it.
        fields.update(workflow=record.workflow, parents=record.parents or [], dependents=dependents)
    waiting = dependencies.waiting(record)
    if as_json:
        click.echo(json.dumps(fields, indent=2, sort_keys=True, default=repr))
        return
    error = fields.pop("error") or {}
    history, dropped = fields.pop("history"), fields.pop("history_dropped")
    for name in ("fired", "due", "started", "finished"):
        fields[name] = _when(fields[name])
    if waiting:
        fields["due"] = "when its parents have finished"
    for name, value in fields.items():
        if name in ("arguments", "result"):
            value = json.dumps(value, default=repr)
        elif name in ("parents", "dependents"):
            value = " ".join(value) or "-"
        click.echo(f"{name + ':':11} {value if value is not None else '-'}")
    if error:
        click.echo(f"{'error:':11} {error.get('type', '')}: {error.get('message', '')}")
        if error.get("traceback"):
            click.echo(error["traceback"].rstrip())
    if history:
        click.echo("history:")
        for line in _history_lines(history, dropped):
            click.echo(f"  {line}")


@main.command("jobs")
@_queue_option
@click.option("-r", "--route", help="Only this route.")
@click.option("-s", "--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000),
              help="At most this many jobs (ordered by due time).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (times in epoch seconds).")
@_store_options
@_friendly
def jobs_command(queue: str, route: str | None, state: str | None, limit: int, as_json: bool,
                 backend: str | None, url: str | None, db: str | None) -> None:
    """List a queue's jobs: id, function, route, state, due time, attempts."""
    records = _open(queue, backend, url, db).jobs(route=route, state=state, limit=limit)
    if as_json:
        keys = ("id", "function", "route", "state", "due", "attempts", "signature")
        rows = [{k: v for k, v in _job_fields(r).items() if k in keys} for r in records]
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not records:
        click.echo(f"No matching jobs on queue {queue}.")
        return
    width = max(len(r.func) for r in records)
    click.echo(f"{'id':26}  {'function':{width}}  {'route':12} {'state':9} {'due':19} attempts")
    for r in records:
        click.echo(f"{r.id:26}  {r.func:{width}}  {r.route:12} {r.state:9} {_when(r.due):19} {r.attempts:>8}")


@main.command()
@_queue_option
@_store_options
@_friendly
def status(queue: str, backend: str | None, url: str | None, db: str | None) -> None:
    """Count a queue's jobs per route and state."""
    counts = _open(queue, backend, url, db).counts()
    if not counts:
        click.echo(f"Queue {queue} has no jobs.")
        return
    click.echo(f"{'route':20} {'state':10} {'jobs':>8}")
    for (route, state), n in sorted(counts.items()):
        click.echo(f"{route:20} {state:10} {n:>8}")


@main.command()
@click.argument("job_id")
@_queue_option
@_store_options
@_friendly
def kill(job_id: str, queue: str, backend: str | None, url: str | None, db: str | None) -> None:
    """Kill a job: pending ones never run, running ones are interrupted."""
    state = _open(queue, backend, url, db).kill(job_id)
    if state is None:
        raise click.ClickException(f"No job {job_id} on queue {queue}.")
    click.echo({"running": f"{job_id}: kill requested; its worker interrupts it within a second",
                "killed": f"{job_id}: killed"}.get(state, f"{job_id}: already {state}"))


@main.command()
@_queue_option
@click.option("-r", "--route", required=True, help="Route whose pending jobs are deleted.")
@_store_options
@_friendly
def purge(queue: str, route: str, backend: str | None, url: str | None, db: str | None) -> None:
    """Delete the pending jobs of a route."""
    n = _open(queue, backend, url, db).purge(route)
    click.echo(f"Purged {n} pending job(s) from {queue}/{route}.")


@main.command()
@_queue_option
@_store_options
@_friendly
def dead(queue: str, backend: str | None, url: str | None, db: str | None) -> None:
    """List the dead-letter jobs of a queue (failed after their last attempt)."""
    records = _open(queue, backend, url, db).dead_letters()
    if not records:
        click.echo(f"No dead-letter jobs on queue {queue}.")
    for r in records:
        err = r.error or {}
        click.echo(f"{r.id}  {r.func} route={r.route} attempts={r.attempts} "
                   f"finished={_when(r.finished)}  {err.get('type', '')}: {err.get('message', '')}")


@main.command()
@click.argument("job_id")
@_queue_option
@click.option("--force", is_flag=True, help="Also requeue a complete or killed job (it runs again).")
@_store_options
@_friendly
def retry(job_id: str, queue: str, force: bool, backend: str | None, url: str | None, db: str | None) -> None:
    """Requeue a failed (e.g. dead-letter) job with fresh attempts."""
    if not _open(queue, backend, url, db).retry(job_id, force=force):
        raise click.ClickException(f"No finished job {job_id} on queue {queue} to retry.")
    click.echo(f"{job_id}: requeued")


# -- flow control (skunkqueue.flow) ----------------------------------------------


@main.command("pause")
@_queue_option
@click.option("-r", "--route", required=True, help="Route whose claims stop (running jobs finish).")
@_store_options
@_friendly
def pause_command(queue: str, route: str, backend: str | None, url: str | None, db: str | None) -> None:
    """Pause a route: every pool stops claiming its jobs, which wait pending, until `skunq resume`."""
    _open(queue, backend, url, db).pause(route)
    click.echo(f"{queue}/{route}: paused; workers claim none of its jobs from within a second")


@main.command("resume")
@_queue_option
@click.option("-r", "--route", required=True, help="Route whose claims go on.")
@_store_options
@_friendly
def resume_command(queue: str, route: str, backend: str | None, url: str | None, db: str | None) -> None:
    """Resume a paused route."""
    _open(queue, backend, url, db).resume(route)
    click.echo(f"{queue}/{route}: resumed")


@main.command("limit")
@_queue_option
@click.option("-r", "--route", required=True, help="Route to limit.")
@click.option("--concurrency", type=int, default=None, help="At most this many of its jobs running at once.")
@click.option("--rate", default=None, help="At most this many starting per period, e.g. 50/s, 100/m.")
@click.option("--burst", type=int, default=None,
              help="With --rate: this many may start at once (default: 10 ms of the rate, at least 1).")
@_store_options
@_friendly
def limit_command(queue: str, route: str, concurrency: int | None, rate: str | None, burst: int | None,
                  backend: str | None, url: str | None, db: str | None) -> None:
    """Set a route's limits for every pool (neither --concurrency nor --rate: remove them)."""
    q = _open(queue, backend, url, db)
    q.limit(route, concurrency=concurrency, rate=rate, burst=burst)
    shown = q.limits([route])[route]
    click.echo(f"{queue}/{route}: limit {shown.limit or 'none'}")


@main.command("limits")
@_queue_option
@click.option("-r", "--route", "routes", multiple=True, help="Only this route (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_store_options
@_friendly
def limits_command(queue: str, routes: tuple[str, ...], as_json: bool, backend: str | None, url: str | None,
                   db: str | None) -> None:
    """Per route: paused, its limits, and the due jobs a pause or a limit holds back."""
    flows = _open(queue, backend, url, db).limits(list(routes) or None)
    if as_json:
        click.echo(json.dumps([f.to_dict() for f in flows.values()], indent=2))
        return
    if not flows:
        click.echo(f"Queue {queue} has no routes with jobs or workers.")
        return
    click.echo(f"{'route':20} {'paused':6} {'concurrency':>11} {'rate':>10} {'burst':>5} {'waiting':>8}")
    for f in flows.values():
        shown = f.to_dict()
        click.echo(f"{f.route:20} {'yes' if f.paused else 'no':6} {shown['concurrency'] or '-'!s:>11} "
                   f"{shown['rate'] or '-':>10} {shown['burst'] or '-'!s:>5} {f.waiting:>8}")


# -- commands from plugins (kept last: they may build on everything above) ----

def _plugin_commands() -> None:
    """Let installed plugins add commands; a broken plugin must not take the whole CLI down."""
    try:
        impls = plugin_manager().hook.register_commands.get_hookimpls()
    except Exception as exc:  # a plugin that cannot even be imported
        click.echo(f"skunq: cannot load plugins: {exc}", err=True)
        impls = []
    for impl in impls:  # one at a time, so one plugin's bug cannot hide another's commands
        try:
            impl.function(cli=main)
        except Exception as exc:
            click.echo(f"skunq: plugin {impl.plugin_name} failed to add its commands: {exc}", err=True)
    if "web" not in main.commands:
        @main.command("web", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        def web_missing() -> None:
            """The browser monitor (needs: pip install skunkqueue-web)."""
            raise click.ClickException("skunq web needs the monitor plugin: pip install skunkqueue-web")


_plugin_commands()


@main.group(invoke_without_command=True)
@_queue_option
@click.option("--import", "imports", multiple=True, envvar="SKUNQ_IMPORT", show_envvar=True,
              help="Module declaring the schedules (repeatable), as for skunq work.")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Directory to import it from (repeatable; the current one is always used).")
@_store_options
@click.pass_context
@_friendly
def periodic(ctx: click.Context, queue: str, imports: tuple[str, ...], paths: tuple[str, ...], backend: str | None,
             url: str | None, db: str | None) -> None:
    """List a queue's periodic jobs: spec, routes, last slot fired, next slot, paused.

    \b
    skunq periodic -q QUEUE --import myapp.jobs
    skunq periodic -q QUEUE --import myapp.jobs pause|resume|run NAME
    """
    modules = trust.split_imports(imports)
    if not modules:
        raise click.UsageError("Name the module that declares the schedules: --import MODULE (or SKUNQ_IMPORT).")
    interpreter.add_roots([os.getcwd(), *paths])
    trust.import_allowed(modules)
    here = _open(queue, backend, url, db)
    store = here.persistence
    if not store.supports_settings:
        raise click.ClickException(f"The {here.backend} backend keeps no schedule state yet: periodic jobs need "
                                   "a backend with idempotency keys and settings (sqlite).")
    found = {s.name: s for s in schedules.declared(queue)}
    ctx.obj = (store, found, here)
    if ctx.invoked_subcommand is not None:
        return
    if not found:
        click.echo(f"No periodic jobs declared on queue {queue} in {', '.join(modules)}.")
        return
    now = store.now()  # the clock the schedulers reckon slots on
    for name, schedule in sorted(found.items()):
        last = schedules.last_slot(store, name)
        paused = schedules.is_paused(store, name)
        click.echo(f"{name}  {schedule.spec}  routes={','.join(schedule.job.routes)}  last={_when(last)}  "
                   f"next={'-' if paused else _when(schedule.next_slot(now))}{'  paused' if paused else ''}")


def _schedule(ctx: click.Context, name: str) -> tuple[Any, Any]:
    """The schedule ``name`` names: its full ``module:qualname``, or a short name (the qualname, or its
    last part) that only one schedule has."""
    store, found, _ = ctx.obj
    if name in found:
        return store, found[name]
    matches = sorted(full for full in found
                     if name in (full.partition(":")[2], full.partition(":")[2].rpartition(".")[2]))
    if len(matches) == 1:
        return store, found[matches[0]]
    if matches:
        raise click.ClickException(f"{name} names several periodic jobs: {', '.join(matches)}; give the full name.")
    raise click.ClickException(f"No periodic job {name}; known: {', '.join(sorted(found)) or 'none'}.")


def _set_paused(ctx: click.Context, name: str, paused: bool) -> None:
    store, schedule = _schedule(ctx, name)
    schedules.set_paused(store, schedule.name, paused)
    click.echo(f"{schedule.name}: {'paused' if paused else 'resumed'}")


@periodic.command("pause")
@click.argument("name")
@click.pass_context
@_friendly
def periodic_pause(ctx: click.Context, name: str) -> None:
    """Stop firing NAME's slots (every pool) until resumed."""
    _set_paused(ctx, name, True)


@periodic.command("resume")
@click.argument("name")
@click.pass_context
@_friendly
def periodic_resume(ctx: click.Context, name: str) -> None:
    """Fire NAME's slots again (missed ones follow the misfire rules)."""
    _set_paused(ctx, name, False)


@periodic.command("run")
@click.argument("name")
@click.pass_context
@_friendly
def periodic_run(ctx: click.Context, name: str) -> None:
    """Fire NAME once now, outside its slot sequence."""
    _, schedule = _schedule(ctx, name)
    handle = schedules.fire_now(schedule, ctx.obj[2])
    click.echo(f"{schedule.name}: fired as {handle.id}")


if __name__ == "__main__":  # last: `python -m skunkqueue.cli` must see every command defined above
    main()
