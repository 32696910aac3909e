"""A/B of MongoDB's workflow count-down on a one-node replica set: a 10,000-member group and its callback.

``python -m benchmarks.mongo_workflow_txn --before DIR [--order before,after,after,before,...]``

``DIR`` holds another version's ``skunkqueue_mongo`` package, e.g. ``git archive d9f66b6
skunkqueue-mongo/src/skunkqueue_mongo | tar -x -C DIR --strip-components=2``; the "before" runs'
pool imports it (``PYTHONPATH``), the "after" runs' pool this tree's (or ``--after DIR``'s). Each run fires the group
first, then starts one ``skunq work`` pool of 2 workers and times it until all members and the
callback are complete; it prints the wall time, mongod's CPU seconds over the same span (from
``/proc``) and the server's command counts (``serverStatus``). One server for all runs: alternate
the order to spread the machine's load over both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import jobs, skunk
from benchmarks.common import stop_process, wait_until
from benchmarks.servers import MongoServer
from skunkqueue import COMPLETE, group

COMMANDS = ("findAndModify", "find", "update", "commitTransaction", "abortTransaction")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _commands(client: Any) -> dict[str, int]:
    found = client.admin.command("serverStatus")["metrics"]["commands"]
    return {name: int(found[name]["total"]) for name in COMMANDS if name in found}


def _all_complete(queue: Any, jobs_fired: int) -> bool:
    return bool(queue.counts().get(("bench", COMPLETE), 0) >= jobs_fired)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mongo_workflow_txn", description=__doc__)
    parser.add_argument("--before", required=True, help="a directory holding the other skunkqueue_mongo")
    parser.add_argument("--after", default=None,
                        help="a directory holding the skunkqueue_mongo of the after runs (default: this tree's)")
    parser.add_argument("--order", default="before,after,after,before,before,after")
    parser.add_argument("--members", type=int, default=10_000)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="skunqbench-mongo-txn-"))
    with MongoServer(replset=True) as server:
        pid = server.starter.process.pid
        target = skunk.Target("mongodb", url=server.url, logdir=workdir, log_level="WARNING")
        with server.starter.client() as admin:
            for variant in args.order.split(","):
                if variant == "before":
                    os.environ["PYTHONPATH"] = args.before
                elif args.after:
                    os.environ["PYTHONPATH"] = args.after
                else:
                    os.environ.pop("PYTHONPATH", None)
                queue = target.queue("wf")
                noop, count = jobs.bind(queue, jobs.noop, "bench"), jobs.bind(queue, jobs.count, "bench")
                handle = group(noop.s(i) for i in range(args.members)).then(count.s()).fire()
                cpu, commands, load = _cpu(pid), _commands(admin), os.getloadavg()[0]
                pool = target.start_workers(queue, "bench", 2)
                started = time.monotonic()
                try:
                    finished = wait_until(partial(_all_complete, queue, args.members + 1), 3600,
                                          "the group and its callback", pause=0.05)
                finally:
                    stop_process(pool)
                after = _commands(admin)
                print(f"{variant}: {finished - started:.1f} s, mongod CPU {_cpu(pid) - cpu:.1f} s, load "
                      f"{load:.0f}-{os.getloadavg()[0]:.0f}, callback given {handle.jobs[-1].result} results, "
                      f"commands {({k: after[k] - commands.get(k, 0) for k in after})}", flush=True)
                queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
