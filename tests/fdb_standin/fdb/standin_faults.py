"""Fault injection and emulated latency for the FoundationDB STAND-IN. Not FoundationDB.

A healthy stand-in never shows the failures a real cluster shows, so tests arm
them here, per process (``fdb.standin_faults.FAULTS``) or, for worker
processes, through ``SKUNKQUEUE_FDB_STANDIN`` (JSON, read at import)::

    {"request_latency_ms": 0.5, "commit_latency_ms": 1.0, "client_max_api": 730,
     "watch_limit": 10000, "spurious_watch_rate": 0.1, "spurious_watch_error": 1009,
     "rules": [{"kind": "apply_then_1021", "key_contains": "lease", "rate": 0.3, "times": -1}],
     "stats_file": "/tmp/counts"}   # each process appends its counts (a JSON line) at exit

Rule kinds are what a real cluster can do to a transaction:

- ``apply_then_1021``: the commit applies, then the client sees commit_unknown_result;
- ``fail_then_1021``: the commit does not apply, and the client sees 1021 all the same;
- ``apply_then_1031`` / ``fail_then_1031``: transaction_timed_out raised during commit,
  after it applied or before;
- ``read_1007``: a read (get or range read) fails with transaction_too_old.

A rule fires on a commit that mutates a key containing ``key_contains`` (bytes
of the UTF-8 string; "" matches every commit), or for ``read_1007`` on a read
whose begin key contains it; ``skip`` matching events pass first, then it
fires with probability ``rate`` until it has fired ``times`` times (-1: no end).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

ENV = "SKUNKQUEUE_FDB_STANDIN"
COMMIT_KINDS = frozenset({"apply_then_1021", "fail_then_1021", "apply_then_1031", "fail_then_1031"})
READ_KINDS = frozenset({"read_1007"})


@dataclass
class Rule:
    kind: str
    key_contains: str = ""
    rate: float = 1.0
    times: int = 1
    skip: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in COMMIT_KINDS | READ_KINDS:
            raise ValueError(f"stand-in: unknown fault kind {self.kind!r}")

    def matches(self, keys: list[bytes]) -> bool:
        needle = self.key_contains.encode()
        return any(needle in key for key in keys)


@dataclass
class Faults:
    request_latency: float = 0.0   # seconds added to every request to the server
    commit_latency: float = 0.0    # seconds added to every commit, on top
    client_max_api: int = 730      # the newest API version "the installed libfdb_c" supports
    watch_limit: int = 10_000      # FoundationDB's default per-database limit (1032 beyond)
    spurious_watch_rate: float = 0.0   # chance that an armed watch fires with no change
    spurious_watch_error: int | None = None  # ... and then with this error instead of success
    rules: list[Rule] = field(default_factory=list)
    stats_file: str | None = None  # where this process appends its stats (a JSON line) at exit
    stats: dict[str, int] = field(default_factory=lambda: {"commits": 0, "conflicts": 0, "injected": 0,
                                                           "requests": 0, "spurious_watches": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=random.Random)

    def configure(self, **settings: Any) -> None:
        for name, value in settings.items():
            if name == "rules":
                self.rules = [Rule(**r) if isinstance(r, dict) else r for r in value]
            elif name.endswith("_ms"):
                setattr(self, name[:-3], float(value) / 1000)
            elif name == "seed":
                self.rng.seed(value)
            elif hasattr(self, name) and name not in ("stats", "lock", "rng"):
                setattr(self, name, value)
            else:
                raise ValueError(f"stand-in: unknown setting {name!r}")

    def inject(self, kind: str, key_contains: str = "", **options: Any) -> Rule:
        rule = Rule(kind, key_contains, **options)
        with self.lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self.lock:
            self.rules = []
            for name in self.stats:
                self.stats[name] = 0
        self.request_latency = self.commit_latency = 0.0
        self.spurious_watch_rate, self.spurious_watch_error = 0.0, None
        self.watch_limit = 10_000

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def pick(self, kinds: frozenset[str], keys: list[bytes]) -> str | None:
        """The kind of fault to inject into this event, if a rule fires."""
        with self.lock:
            for rule in self.rules:
                if rule.kind not in kinds or rule.times == 0 or not rule.matches(keys):
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if self.rng.random() >= rule.rate:
                    continue
                rule.fired += 1
                if rule.times > 0:
                    rule.times -= 1
                self.stats["injected"] += 1
                return rule.kind
        return None

    def spurious(self) -> bool:
        return self.spurious_watch_rate > 0 and self.rng.random() < self.spurious_watch_rate


def _from_env() -> Faults:
    faults = Faults()
    raw = os.environ.get(ENV)
    if raw:
        try:
            settings = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{ENV} is not JSON: {exc}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{ENV} must be a JSON object of settings, not {raw!r}")
        faults.configure(**settings)
    if faults.stats_file:
        atexit.register(_write_stats, faults)
    return faults


def _write_stats(faults: Faults) -> None:
    assert faults.stats_file is not None
    with open(faults.stats_file, "a") as fh:
        fh.write(json.dumps({**faults.stats, "pid": os.getpid()}) + "\n")


FAULTS = _from_env()
