"""The plugin entry point: adds ``skunq web`` to the core's command line.

Plugins are loaded in every worker process too, so this module imports
nothing heavy; the web stack loads only when ``skunq web`` runs.
"""

from __future__ import annotations

import click

from skunkqueue.hooks import hookimpl

DEFAULT_PORT = 8080


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.option("-q", "--queue", envvar="SKUNQ_QUEUE", required=True, help="Queue name.")
    @click.option("--backend", envvar="SKUNQ_BACKEND", default="sqlite", show_default=True,
                  help="Backend name (see `skunq backends`).")
    @click.option("--url", envvar="SKUNQ_URL", help="Backend address (host:port, URL, or file path).")
    @click.option("--db", envvar="SKUNQ_DB", help="Database name or number.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on. Anything but loopback exposes the monitor to the network.")
    @click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
                  help="Port to listen on (0: any free port, printed at start).")
    @click.option("--token", envvar="SKUNQ_WEB_TOKEN",
                  help="Enables actions (kill, retry, purge) for whoever signs in with it; "
                       "without it the monitor is read-only.")
    @click.option("--import", "imports", multiple=True, envvar="SKUNQ_IMPORT",
                  help="Module declaring the queue's periodic jobs (repeatable), as for skunq work: "
                       "the schedules view lists them.")
    @click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False),
                  help="Directory to import it from (repeatable; the current one is always used).")
    @click.option("--refresh", default=2.0, show_default=True, type=click.FloatRange(0.2, 3600),
                  help="Seconds between live updates while the page is visible.")
    def web(queue: str, backend: str, url: str | None, db: str | None, host: str, port: int,
            token: str | None, imports: tuple[str, ...], paths: tuple[str, ...], refresh: float) -> None:
        """Monitor a queue in the browser, with Prometheus metrics at /metrics.

        \b
        skunq web -q QUEUE [--backend NAME --url URL] [--port 8080] [--token SECRET] [--import MODULE]
        """
        from skunkqueue_web.serve import serve
        serve(queue=queue, backend=backend, url=url, db=db, host=host, port=port,
              token=token or None, refresh=refresh, imports=imports, paths=paths)


