"""The Lua scripts, one file per atomic step, and how they are put together.

Each ``<name>.lua`` defines ``local function <name>(KEYS, ARGV)`` and opens
with a header giving its KEYS and ARGV. A script sent to Redis is
``common.lua`` (shared helpers and the arguments every script receives first),
the files of the functions it needs, then the call of its entry function with
its own arguments. Redis has no include, hence this composition.
"""

from __future__ import annotations

from importlib.resources import files

# Entry function -> the other functions it calls.
NEEDS: dict[str, tuple[str, ...]] = {
    "claim": (),
    "enqueue": ("release",),
    "finish": ("release",),
    "finish_and_claim": ("release", "finish", "claim"),
    "renew": (),
    "kill": (),
    "purge": (),
    "quarantine": (),
    "heartbeat": (),
    "register": (),
    "expired": (),
    "now": (),
    "summary": (),
    "reindex": (),
    "delete": (),
}
# A file whose function is not named like the file (it would shadow common.lua's quarantine()).
ENTRY = {"quarantine": "quarantine_record"}


def read(name: str) -> str:
    return (files(__package__) / f"{name}.lua").read_text(encoding="utf-8")


def compose(name: str) -> str:
    """The source of script ``name``, ready for SCRIPT LOAD."""
    parts = [read("common"), *(read(need) for need in NEEDS[name]), read(name)]
    parts.append(f"return {ENTRY.get(name, name)}(KEYS, args())\n")
    return "\n".join(parts)
