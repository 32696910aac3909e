"""The plugin entry point: adds ``skunq web`` to the core's command line.

Plugins are loaded in every worker process too, so this module imports
nothing heavy; the web stack loads only when ``skunq web`` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skunkqueue.hooks import hookimpl

if TYPE_CHECKING:
    import click

DEFAULT_PORT = 8080


@hookimpl
def register_commands(cli: click.Group) -> None:
    # Imported here for start-up speed, not to dodge a cycle: every worker loads this plugin,
    # and only the command line (which has click loaded already) calls this hook.
    import click

    @cli.command()
    @click.option("-q", "--queue", envvar="SKUNQ_QUEUE", required=True, help="Queue name.")
    # No envvar=: skunkqueue.config reads SKUNQ_BACKEND/SKUNQ_URL/SKUNQ_DB, as for skunq work and SkunkQueue().
    @click.option("--backend", help="Backend name (see `skunq backends`); default: the one --url's scheme "
                                    "names, else sqlite. [env var: SKUNQ_BACKEND]")
    @click.option("--url", help="Backend address (a URL whose scheme names the backend; with --backend also "
                                "host:port or a file path). [env var: SKUNQ_URL]")
    @click.option("--db", help="Database name or number. [env var: SKUNQ_DB]")
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
    def web(queue: str, backend: str | None, url: str | None, db: str | None, host: str, port: int,
            token: str | None, imports: tuple[str, ...], paths: tuple[str, ...], refresh: float) -> None:
        """Monitor a queue in the browser, with Prometheus metrics at /metrics.

        \b
        skunq web -q QUEUE [--backend NAME --url URL] [--port 8080] [--token SECRET] [--import MODULE]
        """
        from skunkqueue_web.serve import serve
        serve(queue=queue, backend=backend, url=url, db=db, host=host, port=port,
              token=token or None, refresh=refresh, imports=imports, paths=paths)


