"""`skunq work --log-format json`: one JSON object per line, a job's with its fields as keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from skunkqueue import SkunkQueue, headers
from skunkqueue.record import COMPLETE, ERROR
from skunkqueue.testing import jobs


def test_every_line_of_a_json_pool_is_one_object_and_job_lines_carry_their_fields(tmp_path: Path) -> None:
    name = f"logs-{uuid.uuid4().hex[:8]}"
    db = str(tmp_path / "q.db")
    err = tmp_path / "pool.err"
    env = {**os.environ, "SKUNQ_KIT_QUEUE": name, "SKUNQ_KIT_ROUTES": "r"}
    env.pop("SKUNQ_SECRET", None)
    with open(err, "wb") as stderr:
        pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", name, "-r", "r", "--url", db,
                                 "--import", "skunkqueue.testing.jobs", "--log-format", "json"],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=tmp_path)
    queue = SkunkQueue(name, backend="sqlite", conn_url=db)
    try:
        add = queue.event(routes=["r"])(jobs.add.func)
        fail = queue.event(routes=["r"], retries=1, retry_backoff=0)(jobs.fail.func)
        ok, bad = add.fire(2, 3), fail.fire("a message with \"quotes\"\nand a newline")
        deadline = time.monotonic() + 60
        while (ok.state, bad.state) != (COMPLETE, ERROR):
            assert time.monotonic() < deadline and pool.poll() is None, (ok.state, bad.state, err.read_text())
            time.sleep(0.1)
    finally:
        queue.close()
        pool.send_signal(signal.SIGTERM)
        pool.wait(timeout=60)
    text = err.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line, the pool's and the worker's
    assert len(lines) == len(text.splitlines()) >= 4
    assert all({"time", "level", "logger", "pid", "message"} <= set(line) for line in lines)
    by_job: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        if "job_id" in line:
            by_job.setdefault(str(line["job_id"]), []).append(line)
    [done] = by_job[ok.id]
    assert done["function"] == "skunkqueue.testing.jobs:add" and done["route"] == "r" and done["queue"] == name
    assert done["attempt"] == 1 and done["outcome"] == COMPLETE and isinstance(done["duration"], float)
    assert "trace_id" not in done and "error_type" not in done  # no trace context: no trace id
    assert [(j["attempt"], j["outcome"], j["error_type"]) for j in by_job[bad.id]] == [
        (1, "pending", "ValueError"), (2, "error", "ValueError")]
    record = queue.get(ok.id)
    assert record is not None and headers.of(record) == {}
