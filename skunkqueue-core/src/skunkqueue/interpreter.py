"""How SkunkQueue starts another Python interpreter, and where job modules' folders go on its path.

``python -m module`` (and ``-c``) puts the working directory first on
``sys.path``, so a ``uuid.py`` or ``json.py`` lying there would replace the
standard library module in every worker. ``-P`` and ``PYTHONSAFEPATH`` stop
that only from Python 3.11 on, and ``-I`` would also drop ``PYTHONPATH``,
which users rely on. So a child runs a short ``-c`` program that removes the
entry ``-c`` added before anything else is imported, then calls the module's
``main()``.

The folders job modules are imported from (the working directory and
``--path`` roots) go *after* the standard library and site-packages, so a
job module's own imports still find its neighbours but can never replace an
installed module. Bare mode does not rely on them: it finds a record's module
by explicit lookup under the roots (see :mod:`skunkqueue.trust`).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

# Run as ``python -c BOOT MODULE ARGS...``: nothing but the builtin ``sys`` is
# imported before the working directory leaves sys.path (-c puts '' first
# unless safe_path, 3.11+, already kept it out).
BOOT = (
    "import sys\n"
    "if not getattr(sys.flags, 'safe_path', False): del sys.path[0]\n"
    "sys.argv[0:2] = [sys.argv[1]]\n"
    "from importlib import import_module\n"
    "sys.exit(import_module(sys.argv[0]).main())\n"
)


def command(module: str, *args: str) -> list[str]:
    """The argv that runs ``module.main()`` in a new interpreter without the working directory on its path."""
    return [sys.executable, "-c", BOOT, module, *args]


def add_roots(roots: Sequence[str]) -> None:
    """Put job module folders on ``sys.path`` after everything installed (see the module's docstring)."""
    for root in roots:
        root = os.path.abspath(root)
        if root not in sys.path:
            sys.path.append(root)
