"""``skunq``, the command: for ``skunq work``, the pool's fork server is forked before anything else.

A worker forked from the server must hold only what a fresh worker imports
(:mod:`skunkqueue.forkserver`), so the server is forked here, before the command line and the
modules it brings (click, the pool, the scheduler's cronsim...) are imported. Run any other way
(``python -m skunkqueue.cli work``), a pool starts its workers as fresh interpreters.
"""

from __future__ import annotations

import sys

from skunkqueue import forkserver


def main() -> None:
    if sys.argv[1:2] == ["work"]:
        forkserver.start_for_pool()
    from skunkqueue import cli  # after the fork: the server must never hold the command line's modules

    cli.main()


if __name__ == "__main__":
    main()
