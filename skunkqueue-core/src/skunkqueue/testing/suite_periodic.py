"""Periodic jobs: every slot fires exactly once, with several schedulers and one of them killed."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from skunkqueue.persistence import Persistence
from skunkqueue.testing.workers import KIT_JOBS

PERIODIC_JOBS = "skunkqueue.testing.periodic_jobs"


class PeriodicSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def test_every_slot_fires_once_with_three_schedulers_and_a_crash(
            self, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        if not (store.supports_keys and store.supports_settings):
            pytest.skip(f"periodic jobs need idempotency keys and settings, which the {store.name} "
                        "backend does not implement yet")
        ticks = tmp_path / "ticks"
        env = {"SKUNQ_KIT_TICKS": str(ticks)}
        imports = [KIT_JOBS, PERIODIC_JOBS]
        pools = [start_pool(["r"], imports=imports, env=env) for _ in range(3)]
        begun = time.time()
        time.sleep(8)
        pools[0].signal(signal.SIGKILL)
        pools[0].wait(10)
        time.sleep(4)
        start_pool(["r"], imports=imports, env=env)
        time.sleep(max(0.0, begun + 20 - time.time()))
        ended = time.time()
        time.sleep(3)  # the last slots' jobs run
        runs: dict[float, list[float]] = {}
        for line in ticks.read_text().splitlines():
            slot, started, _pid = line.split()
            runs.setdefault(float(slot), []).append(float(started))
        window = [float(s) for s in range(math.ceil(begun + 1), math.floor(ended))]
        assert len(window) >= 15
        missing = [s for s in window if s not in runs]
        twice = {s: len(r) for s, r in runs.items() if len(r) > 1}
        early = {s: min(r) - s for s, r in runs.items() if min(r) < s}
        assert not missing, f"slots never fired: {missing}"
        assert not twice, f"slots fired more than once: {twice}"
        assert not early, f"slots run before their time: {early}"
