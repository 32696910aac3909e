"""The ``skunq`` command line."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import sys
from typing import Any, Callable

import click

from skunkqueue import backends as backend_registry
from skunkqueue.errors import SkunkQueueError
from skunkqueue.pool import DEFAULT_GRACE, WorkerPool
from skunkqueue.queue import SkunkQueue
from skunkqueue.urls import redact
from skunkqueue.worker import WorkerConfig


def _store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--backend/--url/--db, with SKUNQ_* environment defaults, for every command."""
    func = click.option("--db", envvar="SKUNQ_DB", help="Database name or number.")(func)
    func = click.option("--url", envvar="SKUNQ_URL",
                        help="Backend address (host:port, URL, or file path).")(func)
    func = click.option("--backend", envvar="SKUNQ_BACKEND", default=backend_registry.DEFAULT_BACKEND,
                        show_default=True, help="Backend name (see `skunq backends`).")(func)
    return func


def _queue_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-q", "--queue", envvar="SKUNQ_QUEUE", required=True, help="Queue name.")(func)


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Our own errors become one clear line (exit 1), never a traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SkunkQueueError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def _open(queue: str, backend: str, url: str | None, db: str | None) -> SkunkQueue:
    return SkunkQueue(queue, backend=backend, conn_url=url, dbname=db)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@click.group()
@click.version_option(package_name="skunkqueue")
def main() -> None:
    """SkunkQueue: task scheduling for humans who use Python."""


@main.command()
@_queue_option
@click.option("-r", "--route", "route_opts", multiple=True, help="Route to work on (repeatable).")
@click.argument("more_routes", nargs=-1)
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes per route.")
@click.option("--path", "paths", multiple=True, type=click.Path(file_okay=False),
              help="Directory to import job modules from (repeatable; the current one is always used).")
@click.option("--lease", default=30.0, show_default=True, type=click.FloatRange(0.5, 3600),
              help="Seconds a job stays claimed without a renewal before another worker may take it.")
@click.option("--prefetch", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Jobs claimed per round trip.")
@click.option("--allow-pickle", is_flag=True,
              help="Run jobs of queues created with serializer='pickle' (only if nobody untrusted can write "
                   "to the store: unpickling runs code).")
@click.option("--grace", default=DEFAULT_GRACE, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds an interrupted job (SIGINT, kill, time limit, lost lease) gets to stop before "
                   "its worker is killed; a second SIGINT kills at once.")
@click.option("--connect-attempts", default=5, show_default=True, type=click.IntRange(1, 100),
              help="Tries to reach the backend at start-up (with back-off) before giving up.")
@click.option("--log-level", envvar="SKUNQ_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@_store_options
@_friendly
def work(queue: str, route_opts: tuple[str, ...], more_routes: tuple[str, ...], concurrency: int,
         paths: tuple[str, ...], lease: float, prefetch: int, allow_pickle: bool, grace: float,
         connect_attempts: int, log_level: str,
         backend: str, url: str | None, db: str | None) -> None:
    """Start a WorkerPool: one worker process per route listed.

    \b
    skunq work -q QUEUE -r ROUTE [ROUTE ...]
    """
    routes = list(route_opts) + list(more_routes)
    if not routes:
        raise click.UsageError("Name at least one route: skunq work -q QUEUE -r ROUTE [ROUTE ...]")
    backend_registry.load(backend)  # an unknown name fails here with the list of installed ones
    os.environ["SKUNQ_LOG_LEVEL"] = log_level.upper()
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    config = WorkerConfig(queue=queue, route=routes[0], backend=backend, url=url, db=db, lease=lease,
                          prefetch=prefetch, paths=[os.path.abspath(p) for p in paths],
                          connect_attempts=connect_attempts,
                          allow_pickle=allow_pickle)
    logging.getLogger("skunkqueue.pool").info(
        "pool: queue %s routes %s on %s %s", queue, " ".join(routes), backend, redact(url))
    sys.exit(WorkerPool(config, routes, concurrency, grace=grace).run())


@main.command("backends")
def list_backends() -> None:
    """List installed backends and the distribution that provides each."""
    for entry in backend_registry.installed():
        click.echo(f"{entry.name:10} {entry.distribution:20} {entry.value}")


@main.command()
@_queue_option
@_store_options
@_friendly
def workers(queue: str, backend: str, url: str | None, db: str | None) -> None:
    """List the live workers of a queue."""
    rows = _open(queue, backend, url, db).workers()
    if not rows:
        click.echo(f"No live workers on queue {queue}.")
    for w in rows:
        click.echo(f"{w.id}  route={w.route} host={w.host} pid={w.pid} state={w.state} "
                   f"last_seen={_when(w.last_seen)}")


@main.command()
@_queue_option
@_store_options
@_friendly
def status(queue: str, backend: str, url: str | None, db: str | None) -> None:
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
def kill(job_id: str, queue: str, backend: str, url: str | None, db: str | None) -> None:
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
def purge(queue: str, route: str, backend: str, url: str | None, db: str | None) -> None:
    """Delete the pending jobs of a route."""
    n = _open(queue, backend, url, db).purge(route)
    click.echo(f"Purged {n} pending job(s) from {queue}/{route}.")


@main.command()
@_queue_option
@_store_options
@_friendly
def dead(queue: str, backend: str, url: str | None, db: str | None) -> None:
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
@_store_options
@_friendly
def retry(job_id: str, queue: str, backend: str, url: str | None, db: str | None) -> None:
    """Requeue a finished (e.g. dead-letter) job with fresh attempts."""
    if not _open(queue, backend, url, db).retry(job_id):
        raise click.ClickException(f"No finished job {job_id} on queue {queue} to retry.")
    click.echo(f"{job_id}: requeued")


# -- commands from plugins (kept last: they may build on everything above) ----

def _plugin_commands() -> None:
    """Let installed plugins add commands; a broken plugin must not take the whole CLI down."""
    from skunkqueue.hooks import plugin_manager
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

if __name__ == "__main__":
    main()
