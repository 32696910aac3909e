"""The entry point of a worker process: the pool starts ``interpreter.command("skunkqueue.worker_main", CONFIG)``.

It sits above both kinds of worker, so that neither needs to know the other:
a :class:`~skunkqueue.worker.Worker` for sync jobs, an
:class:`~skunkqueue.async_worker.AsyncWorker` for ``--async-concurrency`` above 1.
"""

from __future__ import annotations

import logging
import os
import sys

from skunkqueue import logformat
from skunkqueue.errors import BackendUnavailable, SkunkQueueError
from skunkqueue.worker import EXIT_UNREACHABLE, Worker, WorkerConfig

log = logging.getLogger("skunkqueue.worker")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = WorkerConfig.from_json(argv[0])
    logformat.configure(os.environ.get("SKUNQ_LOG_LEVEL", "INFO"))
    if config.async_concurrency > 1:
        # Imported here for speed, not to dodge a cycle: a worker of sync jobs never loads asyncio.
        from skunkqueue.async_worker import AsyncWorker

        worker: Worker = AsyncWorker(config)
    else:
        worker = Worker(config)
    worker.install_signal_handlers()
    try:
        return worker.run()
    except BackendUnavailable as exc:
        log.error("worker for route %s cannot reach the backend: %s", config.route, exc)
        return EXIT_UNREACHABLE
    except SkunkQueueError as exc:
        log.error("worker for route %s: %s", config.route, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
