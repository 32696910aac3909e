"""Rules written once in core and used by every backend: quarantine outcome, password scrubbing."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from skunkqueue import policy
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, RUNNING, STATES, State
from skunkqueue.urls import redact, scrub


def test_a_quarantined_record_is_a_dead_malformed_record_error() -> None:
    outcome = policy.quarantined("record 'x' has unreadable JSON")
    assert (outcome.state, outcome.dead) == (ERROR, True)
    assert outcome.error == {"type": "MalformedRecord", "message": "record 'x' has unreadable JSON", "traceback": ""}


@pytest.mark.parametrize(("url", "message", "secrets"), [
    ("redis://:s3cret@host:6379", "auth failed for s3cret", ["s3cret"]),
    # Drivers quote the password percent-decoded as well as as given.
    ("mongodb://user:p%40ss%3Aw0rd@host/?authSource=admin", "bad password p@ss:w0rd (sent p%40ss%3Aw0rd)",
     ["p@ss:w0rd", "p%40ss%3Aw0rd", "w0rd"]),
    # An unescaped '@' inside the password: no piece of it may stay behind.
    ("redis://user:p@ss:w0rd@host", "AUTH p@ss:w0rd refused", ["p@ss", "w0rd"]),
    ("user:topsecret@host:27017", "topsecret was rejected", ["topsecret"]),
])
def test_scrub_leaves_no_piece_of_the_password_in_a_driver_message(url: str, message: str,
                                                                    secrets: list[str]) -> None:
    cleaned = scrub(message, url)
    assert "***" in cleaned
    assert [s for s in secrets if s in cleaned] == []


@pytest.mark.parametrize("url", [None, "", "redis://host:6379", "mongodb://host/?appname=a"])
def test_scrub_without_a_password_changes_nothing(url: str | None) -> None:
    assert scrub("Cannot reach host:6379 (appname=a)", url) == "Cannot reach host:6379 (appname=a)"


def test_redact_and_scrub_agree_on_an_ordinary_address() -> None:
    url = "redis://alice:hunter2@cache.example:6380/0"
    assert redact(url) == "redis://alice:***@cache.example:6380/0"
    assert scrub(f"error talking to {url}", url) == f"error talking to {redact(url)}"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:p@ss:w@rd@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),  # unescaped @ and : inside
    ("mongodb://app:s3cr3t@db1:27017,db2:27017/app?replicaSet=rs", "mongodb://app:***@db1:27017,db2:27017/app?replicaSet=rs"),
    ("redis://user@host:6379", "redis://user@host:6379"),  # no password: nothing to hide
])
def test_redact_hides_the_whole_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_a_misspelt_state_is_a_type_error(tmp_path: Path) -> None:
    """States are a Literal type: mypy refuses a record or outcome in a state that does not exist."""
    from mypy import api

    snippet = tmp_path / "states.py"
    snippet.write_text("from skunkqueue.record import PENDING, Outcome\n"
                       "good = Outcome(PENDING)\n"
                       "bad = Outcome('pendng')\n")
    out, _, status = api.run([str(snippet), "--no-incremental", "--cache-dir", str(tmp_path / ".mypy_cache")])
    assert status == 1 and "states.py:3: error" in out and "states.py:2" not in out, out


def test_the_state_constants_are_the_literal_types_values() -> None:
    assert STATES == get_args(State) == (PENDING, RUNNING, COMPLETE, ERROR, KILLED)
