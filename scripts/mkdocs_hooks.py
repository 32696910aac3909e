"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the site read from the code at build time.

``<!-- capabilities -->`` in a page becomes the table of what each installed backend declares on its
``Persistence`` class, so the guide cannot drift from the code. Every first-party backend must be
installed where the site is built (``make docs`` installs them): one missing fails the build rather
than leaving a row out.

The command-line reference (mkdocs-click) copies each command's help into the page as Markdown. A
paragraph that click prints as written, marked by a ``\b`` line, would be reflowed there and its
``[--port 8080]`` read as links: those paragraphs are fenced as code before mkdocs-click reads them,
and its option tables get the environment variable each option reads.

The docstrings use Sphinx's roles (``:meth:`claim```), which mkdocstrings leaves as text: the
rendered pages keep the code and drop the role, as Sphinx would show it.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import click

MARKER = "<!-- capabilities -->"
COLUMNS = (
    ("supports_keys", "idempotency keys"),
    ("supports_settings", "settings (periodic jobs)"),
    ("supports_workflows", "workflows"),
    ("supports_using", "`fire(using=...)`"),
    ("keeps_stats", "throughput counters"),
    ("pages_newest_first", "newest-first pages"),
)


def _size(n: int | None) -> str:
    if n is None:
        return "no limit of its own"
    for unit, size in (("MiB", 1 << 20), ("MB", 10**6), ("kB", 1000)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"


def capabilities_table() -> str:
    from skunkqueue import backends

    entries = backends.installed()
    missing = set(backends.KNOWN_DISTRIBUTIONS) - {e.name for e in entries}
    if missing:
        raise RuntimeError(f"the docs need every first-party backend installed; missing: {', '.join(sorted(missing))}"
                           " (make .venv/.installed)")
    head = ["backend", "distribution", "URL schemes", *(title for _, title in COLUMNS), "largest payload"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in entries:
        cls = backends.load(entry.name)
        cells = [f"`{entry.name}`", f"`{entry.distribution}`",
                 ", ".join(f"`{s}://`" for s in cls.url_schemes) or "-",
                 *("yes" if getattr(cls, attr) else "**no**" for attr, _ in COLUMNS),
                 _size(cls.max_payload)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _verbatim(help_text: str) -> str:
    """``help_text`` with each paragraph click keeps as written (a ``\\b`` line before it) fenced."""
    out: list[str] = []
    verbatim = False
    for line in inspect.cleandoc(help_text).splitlines():
        if line.strip() == "\b":  # click's "do not rewrap the next paragraph"
            verbatim = True
            out.append("```text")
            continue
        if verbatim and not line.strip():
            verbatim = False
            out.append("```")
        out.append(line)
    if verbatim:
        out.append("```")
    return "\n".join(out)


def _for_the_table(command: click.Command) -> None:
    """What mkdocs-click's option tables cannot say by themselves, said on these objects."""
    if command.help:
        command.help = _verbatim(command.help)
    # --help is made on first use and then kept (click 8.2+): make it now, to fix its default too.
    for param in command.get_params(click.Context(command, info_name=command.name)):
        if not isinstance(param, click.Option):
            continue
        # Click 8.2+ marks "no default given" with a sentinel, which the table would print as such.
        if repr(param.default) == "Sentinel.UNSET":
            param.default = False if param.is_flag and not param.multiple else None
        if param.envvar and param.help and "env var" not in param.help:
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            param.help += " Environment: " + ", ".join(f"`{name}`" for name in names) + "."
    for sub in getattr(command, "commands", {}).values():
        _for_the_table(sub)


def on_config(config: Any) -> Any:
    # mkdocs-click reads the help from these same objects (it imports skunkqueue.cli by name).
    from skunkqueue.cli import main

    _for_the_table(main)
    return config


ROLE = re.compile(r":(?:py:)?(?:mod|attr|class|meth|func|data|exc|obj):<code>(~?)([^<]*)</code>")


def _unrole(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rpartition('.')[2] if tilde else target}</code>"


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return ROLE.sub(_unrole, html)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, capabilities_table())
    return markdown
