"""Worker processes whose clocks are off, for the kit and the backends' clock tests.

The skew is simulated per process: a ``sitecustomize.py`` put first on a
pool's PYTHONPATH shifts its ``time.time`` by ``$SKUNQ_TEST_CLOCK_SKEW``
seconds, in the pool and in every worker it starts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from skunkqueue.testing.kit import BackendUnderTest

SKEW_ENV = "SKUNQ_TEST_CLOCK_SKEW"

SITECUSTOMIZE = f'''\
import os
import time

_skew = float(os.environ.get("{SKEW_ENV}", "0") or 0)
if _skew:
    _real = time.time
    time.time = lambda: _real() + _skew
'''


def skewed(backend: BackendUnderTest, seconds: float, folder: Path) -> BackendUnderTest:
    """``backend`` whose worker processes' clocks are off by ``seconds``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # The backend's own path entries (the fdb stand-in's) stay behind the sitecustomize folder.
    path = os.pathsep.join(filter(None, [str(folder), backend.env.get("PYTHONPATH", ""),
                                         os.environ.get("PYTHONPATH", "")]))
    env = {**backend.env, "PYTHONPATH": path, SKEW_ENV: repr(seconds)}
    return dataclasses.replace(backend, env=env)


def true_time() -> float:
    """This host's real clock inside a skewed process (time.time() anywhere else): what a kit
    job writes down, so that the test compares times on one clock."""
    return time.time() - float(os.environ.get(SKEW_ENV, "0") or 0)
