"""How ``skunq work`` writes its log: ``text`` lines for people, or ``json``, one object per line.

A job's line in JSON carries its fields as keys (``job_id``, ``function``,
``queue``, ``route``, ``attempt``, ``outcome``, ``duration``, and
``error_type``/``trace_id`` when there is one), so a log pipeline needs no
parsing of the message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any

FORMATS = ("text", "json")
FORMAT_ENV = "SKUNQ_LOG_FORMAT"
JOB_FIELDS = "skunq_job"  # the LogRecord attribute (``extra=``) holding a job line's fields
TEXT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "pid": record.process,
            "message": record.getMessage(),
        }
        line.update(getattr(record, JOB_FIELDS, None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # default=str: a field nobody planned for is shown, never allowed to lose the line.
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str, fmt: str | None = None) -> None:
    """Set up the root logger of a pool or worker process (format: ``fmt``, else $SKUNQ_LOG_FORMAT)."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=TEXT)
