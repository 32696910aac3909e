"""Start the monitor: open the store once to fail early, bind, print the address, serve."""

from __future__ import annotations

import os
import socket
import sys
from typing import Sequence

import click
import uvicorn

from skunkqueue import interpreter, periodic, trust
from skunkqueue.config import resolve as resolve_store
from skunkqueue.errors import SkunkQueueError
from skunkqueue.queue import SkunkQueue
from skunkqueue.urls import redact
from skunkqueue_web.app import create_app

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(*, queue: str, backend: str | None, url: str | None, db: str | None, host: str, port: int,
          token: str | None, refresh: float, imports: Sequence[str] = (), paths: Sequence[str] = ()) -> None:
    try:
        resolved = resolve_store(backend, url, db)  # the rule SkunkQueue() and skunq work follow
    except SkunkQueueError as exc:
        raise click.ClickException(str(exc)) from None
    backend, url, db = resolved.backend, resolved.url, resolved.db
    store = resolved.describe()
    try:
        # The job modules are the operator's own code, imported as `skunq work --import` does (trust.py).
        modules = trust.split_imports(imports)
        # After the standard library and site-packages, as for workers: see skunkqueue.interpreter.
        interpreter.add_roots([os.getcwd(), *paths])
        trust.import_allowed(modules)
    except SkunkQueueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        q = SkunkQueue(queue, backend=backend, conn_url=url, dbname=db)
        q.persistence.summary()  # reach the store now: a wrong address is one line here, not a page of errors
    except SkunkQueueError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"Cannot reach the {backend} store at {redact(url)}: {exc}") from None
    allowed = ["127.0.0.1", "localhost", "[::1]"]
    if host not in LOOPBACK:
        click.echo(f"skunq web: listening on {host}, not loopback: anyone who can reach it can read the queue.",
                   err=True)
        allowed = ["*"] if host in ("0.0.0.0", "::") else [*allowed, host]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise click.ClickException(f"Cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    mode = "actions enabled (sign in with the token)" if token else "read-only (no --token)"
    click.echo(f"skunq web: http://{shown}:{bound}/ queue {queue} on {store}, {mode}", err=True)
    sys.stderr.flush()
    app = create_app(q, store=store, token=token, refresh=refresh, allowed_hosts=allowed,
                     schedules=periodic.declared(queue), imports=modules)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
