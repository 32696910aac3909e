"""How many jobs a worker claims per round trip: ``--prefetch auto`` (the default) or a fixed number.

A claim of several jobs saves a round trip per job, but the jobs held behind the running one wait for
it. ``auto`` claims one job at a time until recent jobs show themselves short, then more: as many as
the recent jobs' pace says will all have started within :data:`HELD_WAIT` of the claim, at most
:data:`AUTO_MAX`; one job that takes :data:`HELD_WAIT` or longer sets it back to one at once. What a
wrong guess costs is bounded elsewhere: a held job the worker has not started within
``channel.START_WITHIN`` of its claim goes back to the queue uncharged (``pool.leases``), and the
pool renews the leases of held jobs as of running ones.
"""

from __future__ import annotations

AUTO = 0            # WorkerConfig.prefetch for --prefetch auto
AUTO_MAX = 16       # the most jobs --prefetch auto claims at once
HELD_WAIT = 0.005   # seconds the jobs held behind the running one may take together, by recent pace
_WEIGHT = 0.25      # weight of the latest job in the running mean of a job's time


def parse(text: str) -> int:
    """``auto`` -> :data:`AUTO`; a number 1..1000 -> itself; anything else: ValueError (one line)."""
    if text.strip().lower() == "auto":
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--prefetch takes auto or a number of jobs from 1 to 1000, not {text!r}") from None
    if not 1 <= value <= 1000:
        raise ValueError(f"--prefetch takes auto or a number of jobs from 1 to 1000, not {value}")
    return value


class Prefetch:
    """The claim size of one worker: fixed, or adapted to the time its recent jobs took."""

    def __init__(self, setting: int) -> None:
        self.fixed = setting if setting != AUTO else None
        self._size = self.fixed or 1
        self._pace: float | None = None  # running mean of a job's time, start to recorded outcome

    def size(self, limit: int | None = None) -> int:
        """Jobs to claim now (at most ``limit``, e.g. what --max-jobs-per-child leaves)."""
        return max(1, min(self._size, limit)) if limit is not None else self._size

    def ran(self, seconds: float) -> None:
        """One job took ``seconds`` from its start to its recorded outcome."""
        if self.fixed is not None:
            return
        if seconds >= HELD_WAIT:  # a long one: whatever the mean says, hold nothing behind the next
            # Remembered as a few times HELD_WAIT: enough that a mix of long and short jobs stays at one,
            # little enough that a run of short jobs after one long job soon claims several again.
            self._pace, self._size = min(seconds, 4 * HELD_WAIT), 1
            return
        pace = seconds if self._pace is None else self._pace + _WEIGHT * (seconds - self._pace)
        self._pace = pace
        # The last of n jobs claimed together waits for the n - 1 before it.
        fits = 1 + int(HELD_WAIT / max(pace, 1e-6))
        self._size = max(1, min(AUTO_MAX, fits, self._size * 2))
